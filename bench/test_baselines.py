"""The time-to-quality baselines are the architectures and settings their descriptions give (issues 12, 13)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dcgan_wgan_gp as dcgan  # noqa: E402
import mlp_wgan_gp as mlp  # noqa: E402


def layers(module):
    """(type name, the numbers that define it) for each leaf layer, in order."""
    out = []
    for m in module.modules():
        if isinstance(m, (nn.Linear,)):
            out.append(("Linear", m.in_features, m.out_features))
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            out.append((type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                        m.padding[0]))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append((type(m).__name__, m.num_features, m.eps))
        elif isinstance(m, nn.LeakyReLU):
            out.append(("LeakyReLU", m.negative_slope))
        elif isinstance(m, (nn.ReLU, nn.Tanh, nn.Flatten)):
            out.append((type(m).__name__,))
    return out


def test_mlp_baseline_is_pytorch_gans_wgan_gp():
    lrelu = ("LeakyReLU", 0.2)
    assert layers(mlp.Generator()) == [
        ("Linear", 100, 128), lrelu, ("Linear", 128, 256), ("BatchNorm1d", 256, 0.8), lrelu,
        ("Linear", 256, 512), ("BatchNorm1d", 512, 0.8), lrelu, ("Linear", 512, 1024), ("BatchNorm1d", 1024, 0.8),
        lrelu, ("Linear", 1024, 784), ("Tanh",)]
    assert layers(mlp.Critic()) == [("Flatten",), ("Linear", 784, 512), lrelu, ("Linear", 512, 256), lrelu,
                                    ("Linear", 256, 1)]
    assert (mlp.LATENT, mlp.BATCH, mlp.N_CRITIC, mlp.LAMBDA, mlp.LR, mlp.BETAS) == (100, 64, 5, 10.0, 2e-4,
                                                                                    (0.5, 0.999))
    assert mlp.Generator()(torch.randn(3, 100)).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("size", [32, 64])
def test_dcgan_baseline_is_seed_002s_design(size):
    doublings = {32: 2, 64: 3}[size]
    c = 64 * 2 ** doublings
    expect = [("ConvTranspose2d", 256, c, 4, 1, 0), ("BatchNorm2d", c, 1e-5), ("ReLU",)]
    for _ in range(doublings):
        expect += [("ConvTranspose2d", c, c // 2, 4, 2, 1), ("BatchNorm2d", c // 2, 1e-5), ("ReLU",)]
        c //= 2
    assert layers(dcgan.Generator(size)) == expect + [("ConvTranspose2d", 64, 3, 4, 2, 1), ("Tanh",)]
    lrelu, critic, c_in, c = ("LeakyReLU", 0.2), [], 3, 64
    for _ in range(doublings + 1):  # stride-2 4x4 convs, 64 feature maps doubling, no BatchNorm
        critic += [("Conv2d", c_in, c, 4, 2, 1), lrelu]
        c_in, c = c, 2 * c
    assert layers(dcgan.Critic(size)) == critic + [("Conv2d", c_in, 1, 4, 1, 0)]
    assert (dcgan.LATENT, dcgan.BATCH, dcgan.N_CRITIC, dcgan.LAMBDA, dcgan.LR, dcgan.BETAS) == (
        256, 16, 5, 10.0, 2e-4, (0.5, 0.999))
    x = dcgan.Generator(size)(torch.randn(2, 256))
    assert x.shape == (2, 3, size, size) and dcgan.Critic(size)(x).shape == (2,)


@pytest.mark.parametrize("module", [mlp, dcgan])
def test_baseline_penalty_is_the_wgan_gp_one(module):
    """A linear critic D(x) = w . x has input gradient w everywhere: the penalty is (||w|| - 1)^2 exactly."""
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    critic = lambda x: x.flatten(1) @ w.flatten()  # noqa: E731
    real, fake = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    assert module.gradient_penalty(critic, real, fake).item() == pytest.approx((w.norm().item() - 1) ** 2)


def test_dcgan_baseline_trains_on_a_folder_and_reloads(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    summary = dcgan.main(["--data", str(tmp_path), "--image-size", "32", "--iters", "2", "--out", str(tmp_path / "o")])
    assert summary["generator_steps"] == 2 and summary["images"] == 40
    images = dcgan.sample(dcgan.load_generator(tmp_path / "o"), 5)
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1


@pytest.mark.parametrize("module", [mlp, dcgan])
def test_baseline_clock_leaves_out_the_time_off_it(module):
    now = [100.0]
    clock = module.Clock(now=lambda: now[0])
    now[0] = 103.0
    assert clock.seconds() == 3
    with clock.off():
        now[0] = 150.0
    assert clock.seconds() == 3
    now[0] = 151.0
    assert clock.seconds() == 4


def test_dcgan_baseline_snapshots_off_the_clock(tmp_path, monkeypatch):
    """A snapshot that takes longer than the whole budget still leaves the budget to train in."""
    import time
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    original = dcgan.save_snapshot

    def slow(*a, **k):
        time.sleep(3)
        return original(*a, **k)

    monkeypatch.setattr(dcgan, "save_snapshot", slow)
    summary = dcgan.main(["--data", str(tmp_path), "--max-time", "2", "--snapshot-at", "0", "--device", "cpu",
                          "--out", str(tmp_path / "o")])
    assert summary["device"] == "cpu" and 2 <= summary["seconds"] < 5, summary
    assert summary["generator_steps"] >= 2, summary  # it trained on after the 3 s snapshot
    (snap,) = summary["snapshots"]
    assert snap["generator_steps"] == 1 and snap["seconds"] < 2, snap
    images = dcgan.sample(dcgan.load_generator(tmp_path / "o" / snap["file"]), 3)
    assert images.shape == (3, 3, 32, 32)
