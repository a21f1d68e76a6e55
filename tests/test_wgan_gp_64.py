"""Tests for wgan_gp_64.py: the penalty against analytic cases, the ProGAN layers, the schedule, the data
pipeline, short real runs, exact resume and every bad input. CPU, tiny models, a few steps each."""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import wgan_gp_64 as w

TINY = ["--image-size", "32", "--g-channels", "8", "--d-channels", "8", "--latent-dim", "16",
        "--batch-size", "4", "--critic-its", "2", "--num-workers", "0", "--log-every", "2"]


def tiny_args(*extra):
    return w.parse_args(TINY + list(extra))


def make_folder(root, count=24, seed=0):
    """Random images of assorted sizes and formats, nested one level."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w_ = rng.integers(20, 90, size=2)
        sub = Path(root) / f"class_{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8))
        img.save(sub / f"img_{i}.{'png' if i % 2 else 'jpg'}")
    return Path(root)


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def run(tmp_path, data, *extra, name="r"):
    w.main(TINY + ["--data", str(data), "--out", str(tmp_path / "runs"), "--run-name", name] + list(extra))
    return tmp_path / "runs" / name


def expect_exit(capsys, argv, code=2):
    with pytest.raises(SystemExit) as e:
        w.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wgan_gp_64.py: error:"), err
    return err[0]


# ----------------------------------------------------------------------------------------------- penalty
class Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        return x.flatten(1) @ self.weight.flatten()


def test_penalty_of_linear_critic_is_norm_minus_one_squared():
    torch.manual_seed(0)
    weight = torch.randn(3, 8, 8, dtype=torch.float64)
    real, fake = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    gp = w.gradient_penalty(Linear(weight), real, fake)
    assert gp.item() == pytest.approx((weight.norm().item() - 1) ** 2, rel=1e-12)
    # a norm over dim=1 only (the common bug) gives a different number here
    wrong = (weight.expand(5, -1, -1, -1).norm(dim=1) - 1).square().mean()
    assert abs(wrong.item() - gp.item()) > 1


def test_penalty_is_zero_for_unit_gradient_critics():
    real, fake = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    unit = torch.randn(3, 4, 4, dtype=torch.float64)
    assert w.gradient_penalty(Linear(unit / unit.norm()), real, fake).item() == pytest.approx(0, abs=1e-20)
    centre = torch.full((1, 3, 4, 4), 10.0, dtype=torch.float64)  # distance to a far point: |grad| = 1
    distance = lambda x: (x - centre).flatten(1).norm(dim=1)  # noqa: E731
    assert w.gradient_penalty(distance, real, fake).item() == pytest.approx(0, abs=1e-20)


def test_alpha_is_one_per_sample_and_fake_is_detached():
    torch.manual_seed(1)
    real, fake = torch.zeros(8, 3, 5, 5), torch.ones(8, 3, 5, 5)
    x_hat = w.interpolate(real, fake)
    per_sample = x_hat.flatten(1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))  # one alpha broadcast over C, H, W
    assert per_sample[:, 0].unique().numel() == 8 and ((x_hat >= 0) & (x_hat <= 1)).all()
    fake = torch.randn(4, 3, 8, 8, requires_grad=True)
    w.gradient_penalty(Linear(torch.randn(3, 8, 8)), torch.randn(4, 3, 8, 8), fake).backward()
    assert fake.grad is None


def test_critic_step_builds_no_generator_graph():
    torch.manual_seed(0)
    args = tiny_args()
    generator, critic = w.Generator(args), w.Critic(args)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-4)
    stats = w.critic_step(generator, critic, opt, torch.rand(4, 3, 32, 32) * 2 - 1, args)
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None for p in critic.parameters())
    assert set(stats) == {"loss_critic", "wasserstein", "gp", "drift"}
    assert all(v.shape == () and not v.requires_grad for v in stats.values())
    w.generator_step(generator, critic, torch.optim.Adam(generator.parameters()), args)
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen again after the generator step


def test_one_pass_equals_separate_passes():
    torch.manual_seed(0)
    critic = w.Critic(tiny_args("--critic-dropout", "0"))
    parts = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    fused = critic(torch.cat(parts), groups=2)
    separate = torch.cat([critic(p) for p in parts])
    assert torch.allclose(fused, separate, atol=1e-5)


def test_critic_steps_raise_the_wasserstein_estimate():
    """Against a fixed generator the critic maximises D(real) - D(fake): the estimate must grow."""
    torch.manual_seed(0)
    args = tiny_args("--critic-dropout", "0")
    generator, critic = w.Generator(args), w.Critic(args)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.99))
    real = torch.rand(4, 3, 32, 32) * 0.2 + 0.6  # bright, flat images: easy to tell from fakes
    estimates = [w.critic_step(generator, critic, opt, real, args)["wasserstein"].item() for _ in range(40)]
    assert np.mean(estimates[-5:]) > np.mean(estimates[:5]) + 0.5


def test_generator_steps_raise_the_critic_score_of_fakes():
    """Against a fixed critic the generator minimises -mean D(G(z)): the score of its samples must grow."""
    torch.manual_seed(0)
    args = tiny_args("--critic-dropout", "0")
    generator, critic = w.Generator(args), w.Critic(args)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    losses = [w.generator_step(generator, critic, opt, args)["loss_gen"].item() for _ in range(30)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert all(p.grad is None for p in critic.parameters())


# ------------------------------------------------------------------------------------------------ layers
def test_pixel_norm_gives_unit_mean_square_per_pixel():
    x = torch.randn(3, 16, 5, 5) * 7
    assert torch.allclose(w.pixel_norm(x).square().mean(dim=1), torch.ones(3, 5, 5), atol=1e-5)


def test_minibatch_stddev_matches_hand_computation():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1).clone()
    x[:, 1] *= 3
    out = w.minibatch_stddev(x, group_size=2)
    assert out.shape == (4, 3, 1, 1) and torch.equal(out[:, :2], x)
    # strided groups: {0, 2} = {1, 4} and {1, 3} = {2, 8}; biased std, eps inside, mean over channels
    std = lambda a, b, k: math.sqrt(((k * a - k * b) / 2) ** 2 + 1e-8)  # noqa: E731
    g0 = (std(1, 4, 1) + std(1, 4, 3)) / 2
    g1 = (std(2, 8, 1) + std(2, 8, 3)) / 2
    assert out[:, 2].flatten().tolist() == pytest.approx([g0, g1, g0, g1], rel=1e-6)
    halves = w.minibatch_stddev(torch.cat([x, x + 100]), group_size=2, groups=2)
    assert torch.allclose(halves[:, 2].flatten(), torch.tensor([g0, g1, g0, g1] * 2), rtol=1e-5)


def test_minibatch_stddev_rejects_indivisible_batch(capsys):
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        w.minibatch_stddev(torch.zeros(6, 2, 4, 4), group_size=4)
    line = expect_exit(capsys, TINY + ["--batch-size", "6", "--data", "x"])
    assert "--batch-size 6" in line and "group size 4" in line


def test_equalized_lr_init_and_runtime_scale():
    torch.manual_seed(0)
    conv = w.Conv(64, 64, 3, equalized=True)
    fan_in = 64 * 9
    assert conv.scale == pytest.approx(math.sqrt(2 / fan_in))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.02)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.02)
    x = torch.randn(2, 64, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * math.sqrt(2 / fan_in), conv.bias, padding=1),
                          atol=1e-5)
    plain = w.Conv(64, 64, 3)
    assert plain.scale == 1.0 and plain.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    head = w.Critic(tiny_args("--equalized-lr")).head
    assert head.scale == pytest.approx(1 / math.sqrt(head.weight.shape[1]))  # gain 1 for the last layer


def test_ema_update_is_exact():
    args = tiny_args()
    generator = w.Generator(args)
    ema = w.Generator(args)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(torch.randn_like(p))  # biases start at zero in both: make every tensor differ
    before = [p.detach().clone().double() for p in ema.parameters()]
    w.update_ema(ema, generator, 0.999)
    for avg, new, g in zip(before, ema.parameters(), generator.parameters()):
        expected = 0.999 * avg + 0.001 * g.detach().double()
        assert torch.allclose(new.double(), expected, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(new.double(), avg, rtol=1e-6, atol=1e-9)


def test_training_uses_the_ema_decay_and_its_warmup(tmp_path, folder, monkeypatch):
    decays = []
    update = w.update_ema
    monkeypatch.setattr(w, "update_ema", lambda ema, g, d: (decays.append(d), update(ema, g, d)))
    run(tmp_path, folder, "--iters", "3", "--sample-every", "0", name="warm")
    run(tmp_path, folder, "--iters", "2", "--sample-every", "0", "--no-ema-warmup", "--ema", "0.99", name="flat")
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 0.99, 0.99])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_and_output_range(size):
    args = tiny_args("--image-size", str(size))
    generator, critic = w.Generator(args), w.Critic(args)
    x = generator(torch.randn(4, 16) * 50)  # large z: tanh must still bound it
    assert x.shape == (4, 3, size, size) and x.min() >= -1 and x.max() <= 1
    assert critic(x).shape == (4,)
    doublings = int(math.log2(size // 8))
    convs = sum(isinstance(m, w.Conv) for m in generator.modules())
    assert convs == 2 + doublings + 1 + 1  # 8x8 pair, one per doubling, one extra, to-RGB


# ------------------------------------------------------------------------------------------- lr schedule
def test_seed_schedule_boundaries():
    stages = w.parse_schedule("seed")
    expect = {0: 1e-4, 99: 1e-4, 100: 5e-5, 399: 5e-5, 800: 2.5e-5, 1099: 2.5e-5, 1100: 2e-5, 9999: 2e-5}
    for epoch, lr in expect.items():
        assert w.lr_at(stages, epoch) == lr, epoch
    draws = [w.lr_at(stages, e) for e in [400] * 50 + [799] * 50]
    assert all(2e-5 <= d <= 6e-5 for d in draws) and len(set(draws)) == 100


@pytest.mark.parametrize("text", ["100:1e-4,", "abc", "100:rand(1e-4)", "0:1e-4", "10:rand(5e-5,1e-5)",
                                  "10:fast"])
def test_malformed_schedule_is_refused(text, capsys):
    with pytest.raises(ValueError):
        w.parse_schedule(text)
    assert "--lr-schedule" in expect_exit(capsys, TINY + ["--lr-schedule", text, "--data", "x"])


# ---------------------------------------------------------------------------------------------------- data
def test_augmentation_keeps_shape_and_range_and_is_seeded(folder):
    files = w.scan_folder(folder)
    augmented = w.ImageFolder(files, tiny_args())
    plain = w.ImageFolder(files, tiny_args("--no-augment"))
    a, b, c = augmented[(0, 1)], augmented[(0, 1)], augmented[(0, 2)]
    assert a.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, plain[(0, 1)])
    assert torch.equal(plain[(0, 1)], plain[(0, 2)])  # no augmentation: seeds do not matter
    assert plain[(0, 1)].min() >= -1 and plain[(0, 1)].max() <= 1
    assert w.build_augment(tiny_args("--no-augment")) is None


def test_image_modes_are_converted(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(gray)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((10, 12, 3), 100, np.uint8), np.zeros((10, 12), np.uint8)])).save(rgba)
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((10, 12), 65535 // 2, np.uint16)).save(deep)
    for path, value in ((gray, 200), (rgba, 0), (deep, 128)):
        im = w.load_image(path, 3)
        assert im.mode == "RGB" and abs(int(np.asarray(im)[0, 0, 0]) - value) <= 1, path
    assert w.load_image(gray, 1).mode == "L"
    assert w.fit_square(w.load_image(deep, 3), 32, "pad").shape == (3, 32, 32)


def test_exif_orientation_is_applied(tmp_path):
    left_red = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high, red on the left half
    left_red[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": shown 20 wide, 40 high, red on top
    Image.fromarray(left_red).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(w.load_image(tmp_path / "phone.jpg", 3))
    assert shown.shape == (40, 20, 3)
    assert shown[5, 10, 0] > 200 and shown[35, 10, 0] < 50


# ------------------------------------------------------------------------------------------------ runs
def real_subset(tmp_path, fish_dir, count=32):
    if fish_dir is None:
        return make_folder(tmp_path / "fish", count)
    dest = tmp_path / "fish"
    for species in sorted(fish_dir.iterdir())[:4]:
        (dest / species.name).mkdir(parents=True)
        for f in sorted(species.iterdir())[:count // 4]:
            shutil.copy(f, dest / species.name / f.name)
    return dest


def test_short_real_run_writes_everything(tmp_path, fish_dir):
    data = real_subset(tmp_path, fish_dir)
    out = run(tmp_path, data, "--iters", "6", "--sample-every", "3", "--ckpt-every", "3")
    for name in ("args.json", "metrics.jsonl", "ckpt/last.pt", "progress.gif", "interpolation.png",
                 "nearest_neighbours.png", "samples/iter_000003.png", "samples/iter_000006.png"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 6]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss_critic", "loss_gen", "wasserstein", "gp", "images_per_s"))
    assert Image.open(out / "interpolation.png").size == (10 * 32 + 11 * 2, 4 * 32 + 5 * 2)
    assert json.loads((out / "args.json").read_text())["iters"] == 6


def weights(run_dir):
    ckpt = torch.load(run_dir / "ckpt" / "last.pt", weights_only=True)
    return {f"{part}.{k}": v for part in ("generator", "critic", "ema") for k, v in ckpt[part].items()}


def test_resume_is_bit_exact(tmp_path, folder):
    common = ["--torch-deterministic", "--lr-schedule", "1:1e-4,1:rand(1e-5,1e-4)", "--sample-every", "0"]
    straight = run(tmp_path, folder, "--iters", "6", *common, name="straight")
    run(tmp_path, folder, "--iters", "3", *common, name="split")
    w.main(["--resume", str(tmp_path / "runs" / "split"), "--iters", "6"])
    a, b = weights(straight), weights(tmp_path / "runs" / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "runs" / "split" / "ckpt" / "last.pt", weights_only=True)["iteration"] == 6
    # and the check can fail: a different seed gives different weights
    other = run(tmp_path, folder, "--iters", "6", "--seed", "2", *common, name="other")
    assert not all(torch.equal(a[k], v) for k, v in weights(other).items())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, folder, monkeypatch, capsys):
    step = w.critic_step
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        stats = step(*args)
        if calls["n"] > 2 * 4:  # critic-its 2: from iteration 5 on
            stats["loss_critic"] = stats["loss_critic"] * float("nan")
        return stats

    monkeypatch.setattr(w, "critic_step", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, folder, "--iters", "12", "--ckpt-every", "4", "--log-every", "3")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 5" in err
    ckpt = torch.load(tmp_path / "runs" / "r" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["critic"].values())


def test_sample_mode_writes_pngs(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0")
    w.main(["--resume", str(out), "--sample", "5", "--sample-out", str(tmp_path / "gen")])
    pngs = sorted((tmp_path / "gen").glob("*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (32, 32)


def test_config_file_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"critic-its": 4, "gp_lambda": 3.0, "image-size": 128, "run_name": "ignored"}))
    args = w.parse_args(["--config", str(cfg), "--image-size", "32"])
    assert (args.critic_its, args.gp_lambda, args.image_size, args.run_name) == (4, 3.0, 32, None)
    yml = tmp_path / "c.yaml"
    yml.write_text("critic_its: 7\nlr: 0.0002\n")
    args = w.parse_args(["--config", str(yml)])
    assert (args.critic_its, args.lr) == (7, 2e-4)
    saved = tmp_path / "args.json"
    saved.write_text(json.dumps(vars(tiny_args("--critic-its", "3"))))
    assert w.parse_args(["--config", str(saved)]).critic_its == 3  # a run's args.json is a config


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_get_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"critic_its": 2, "warp_speed": 9}')
    cases = {
        "--data is required": [],
        "no such folder": ["--data", str(tmp_path / "missing")],
        "no readable images": ["--data", str(tmp_path / "empty")],
        "no readable images (": ["--data", str(tmp_path / "notes")],
        "invalid choice: 48": ["--data", str(tmp_path), "--image-size", "48"],
        "--batch-size must be at least 1": ["--data", str(tmp_path), "--batch-size", "0"],
        "unknown setting(s) warp_speed": ["--config", str(cfg)],
        "--critic-its must be at least 1": ["--critic-its", "0"],
    }
    for expected, argv in cases.items():
        assert expected in expect_exit(capsys, TINY + argv), expected


@pytest.mark.parametrize("flag, values", [
    ("--batch-size", "0"), ("--critic-its", "0"), ("--gp-every", "0"), ("--latent-dim", "0"), ("--g-channels", "0"),
    ("--d-channels", "0"), ("--mbstd-group", "0"), ("--log-every", "0"), ("--iters", "-1"), ("--fade", "-1"),
    ("--gp-lambda", "-1"), ("--drift", "-0.5"), ("--rotation", "-1"), ("--shear", "-2"), ("--sample-every", "-1"),
    ("--ckpt-every", "-1"), ("--fid-every", "-1"), ("--sample", "-1"), ("--ema", "1"), ("--critic-dropout", "-0.1"),
    ("--shift-x", "1"), ("--shift-y", "-0.1"), ("--color-gain", "1.5"), ("--lr", "0"), ("--fid-samples", "1"),
    ("--zoom", "1.2 1.0"), ("--zoom", "0 1"), ("--brightness", "1.4 0.8"), ("--seed", "-1"), ("--lr", "nan"),
    ("--drift", "nan"), ("--ema", "nan"), ("--betas", "0.5 1.0")])
def test_each_value_out_of_range_is_one_line_naming_its_flag(tmp_path, capsys, flag, values):
    line = expect_exit(capsys, ["--data", str(tmp_path), flag, *values.split()])
    assert f"error: {flag} " in line, line
    if " " not in values:  # a one-number flag says the value it got
        said, given = float(line.rsplit("got ", 1)[1]), float(values)
        assert said == given or (math.isnan(said) and math.isnan(given)), line


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    data = make_folder(tmp_path / "mixed", 12)
    (data / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "class_1" / "junk.jpg").write_bytes(b"garbage")
    out = run(tmp_path, data, "--iters", "2")
    assert "skipped 2 unreadable image file(s) of 14" in capsys.readouterr().out
    assert (out / "ckpt" / "last.pt").is_file()


def test_truncated_checkpoint_is_refused(tmp_path, folder, capsys):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0")
    ckpt = out / "ckpt" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(out)])
    assert "not a readable checkpoint" in line and "last.pt" in line


def test_command_line_error_has_no_traceback(tmp_path):
    script = Path(w.__file__)
    result = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"wgan_gp_64.py: error: --data {tmp_path / 'nowhere'}: "
                                                  "no such folder"]


# ------------------------------------------------------------------------------- time budget, lazy penalty
def test_max_time_ends_like_iters_and_resume_gets_a_new_budget(tmp_path, folder, monkeypatch, capsys):
    from conftest import check_max_time
    argv = TINY + ["--data", str(folder), "--out", str(tmp_path / "runs"), "--run-name", "t", "--critic-its", "1",
                   "--sample-every", "1000"]
    run_dir = tmp_path / "runs" / "t"
    check_max_time(w, argv, run_dir, "iteration", capsys, monkeypatch)
    assert (run_dir / "progress.gif").is_file() and (run_dir / "interpolation.png").is_file()


@pytest.mark.parametrize("every, paid", [(1, 6), (3, 2), (4, 2)])
def test_gp_every_pays_the_penalty_on_every_kth_critic_step(tmp_path, folder, monkeypatch, every, paid):
    calls, original = [], w.gradient_penalty
    monkeypatch.setattr(w, "gradient_penalty", lambda *a: calls.append(1) or original(*a))
    run(tmp_path, folder, "--iters", "3", "--gp-every", str(every), "--sample-every", "0")
    assert len(calls) == paid  # critic-its 2: critic steps 0..5; paid at 0, K, 2K, ...
    args = tiny_args("--gp-every", str(every), "--critic-dropout", "0")
    generator, critic = w.Generator(args), w.Critic(args)
    opt = torch.optim.Adam(critic.parameters())
    out = w.critic_step(generator, critic, opt, torch.rand(4, 3, 32, 32) * 2 - 1, args)
    expected = -out["wasserstein"] + 10 * every * out["gp"] + args.drift * out["drift"]
    assert torch.allclose(out["loss_critic"], expected)
    assert "gp" not in w.critic_step(generator, critic, opt, torch.rand(4, 3, 32, 32), args, penalize=False)


# ------------------------------------------------------------------------------ nothing lost, nothing silent
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_and_resume_is_bit_exact(tmp_path, folder, monkeypatch, capsys, sig, code):
    common = ["--torch-deterministic", "--sample-every", "0", "--iters", "6", "--ckpt-every", "100"]
    straight = run(tmp_path, folder, *common, name="straight")
    step, calls = w.critic_step, [0]

    def signalled(*a, **k):
        calls[0] += 1
        if calls[0] == 5:  # the first critic step of iteration 3
            os.kill(os.getpid(), sig)
        return step(*a, **k)

    monkeypatch.setattr(w, "critic_step", signalled)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, folder, *common, name="split")
    assert e.value.code == code and "after iteration 3" in capsys.readouterr().err
    monkeypatch.setattr(w, "critic_step", step)
    split = tmp_path / "runs" / "split"
    assert torch.load(split / "ckpt" / "last.pt", weights_only=True)["iteration"] == 3
    w.main(["--resume", str(split)])
    a, b = weights(straight), weights(split)
    torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_stays_in_the_checkpoints_folder(tmp_path, folder, monkeypatch):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    w.main(["--resume", str(out), "--iters", "3"])
    assert torch.load(out / "ckpt" / "last.pt", weights_only=True)["iteration"] == 3
    assert not any(elsewhere.iterdir())  # nothing written where the command ran


def test_reusing_a_run_name_is_refused_and_lr_on_resume_is_in_force(tmp_path, folder, capsys):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    before = (out / "ckpt" / "last.pt").read_bytes()
    capsys.readouterr()
    line = expect_exit(capsys, TINY + ["--data", str(folder), "--out", str(tmp_path / "runs"), "--run-name", "r"])
    assert "--resume" in line and (out / "ckpt" / "last.pt").read_bytes() == before
    w.main(["--resume", str(out), "--iters", "2", "--lr", "3e-4"])
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert {g["lr"] for k in ("opt_generator", "opt_critic") for g in ckpt[k]["param_groups"]} == {3e-4}
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 3e-4


@pytest.mark.parametrize("values, needle", [({"image_size": 48}, "--image-size"), ({"device": "gpu"}, "--device"),
                                            ({"channels": 2}, "--channels"), ({"zoom": 1.0}, "--zoom"),
                                            ({"fit": "stretch"}, "--fit"), ({"batch_size": 4.5}, "--batch-size"),
                                            ({"augment": "maybe"}, "--augment")])
def test_config_values_get_the_flags_checks(tmp_path, capsys, values, needle):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(values))
    assert needle in expect_exit(capsys, ["--config", str(cfg), "--data", str(tmp_path)])


def test_fid_and_figures_leave_the_training_rng_alone(tmp_path, folder, fid_weights):
    common = ["--torch-deterministic", "--iters", "4", "--sample-every", "1"]
    plain = run(tmp_path, folder, *common, name="plain")
    measured = run(tmp_path, folder, *common, "--fid-every", "2", "--fid-samples", "8", "--fid-weights",
                   str(fid_weights), name="fid")
    a, b = weights(plain), weights(measured)
    torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fids = [json.loads(x) for x in (measured / "metrics.jsonl").read_text().splitlines() if "fid" in x]
    assert [r["iter"] for r in fids] == [2, 4] and all(r["fid"] > 0 for r in fids)


def test_fid_equals_torch_fidelity_calculate_metrics(tmp_path, folder, fid_weights):
    import torch_fidelity
    args = tiny_args("--data", str(folder), "--out", str(tmp_path), "--fid-samples", "12",
                     "--fid-weights", str(fid_weights))
    data = w.ImageFolder(w.scan_folder(folder), args, augment=False, cache=True)
    generator, inception = w.Generator(args), w.load_inception(args, torch.device("cpu"))
    got = w.compute_fid(inception, generator, data, args, torch.device("cpu"))
    fake = w.to_uint8_rgb(w.generate(generator, w.noise(12, args, "cpu", 7)))
    real = torch.stack([data.uint8(i) for i in np.linspace(0, len(data) - 1, 12).astype(int)])

    class Items(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref = torch_fidelity.calculate_metrics(input1=Items(fake), input2=Items(real), fid=True, kid=True,
                                           kid_subset_size=12, feature_extractor_weights_path=str(fid_weights),
                                           cuda=False, save_cpu_ram=True, verbose=False)
    assert got["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert got["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-3, abs=1e-5)


def test_failures_are_found_at_start_with_one_line(tmp_path, folder, capsys):
    not_weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, not_weights)
    (tmp_path / "file").write_text("x")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for i, src in enumerate(sorted(folder.rglob("*.jpg"))[:6]):
        data = src.read_bytes()
        (truncated / f"{i}.jpg").write_bytes(data[:len(data) * 6 // 10])  # header and part of the scan
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    cases = {"--fid-weights": ["--data", str(folder), "--fid-every", "1", "--fid-weights", str(tmp_path / "no.pth")],
             "Inception": ["--data", str(folder), "--fid-every", "1", "--fid-weights", str(not_weights)],
             "is a file": ["--data", str(tmp_path / "file")],
             "--out": ["--data", str(folder), "--out", str(tmp_path / "file" / "runs")],
             "/proc/nope": ["--data", str(folder), "--out", "/proc/nope"],
             "decodes": ["--data", str(truncated), "--batch-size", "2", "--out", str(tmp_path / "t")],
             "--sample-out": ["--resume", str(out), "--sample", "2", "--sample-out", str(tmp_path / "file" / "g")]}
    capsys.readouterr()
    for needle, argv in cases.items():
        assert needle in expect_exit(capsys, TINY + argv), needle
    assert not (tmp_path / "t").exists()


def test_truncated_files_without_the_cache_are_replaced_iteratively(tmp_path, folder):
    files = w.scan_folder(folder)
    for f in files[:-1]:  # every file but the last is truncated after its header
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) * 6 // 10])
    data = w.ImageFolder(files, tiny_args("--no-augment"), augment=False, cache=False)
    assert torch.equal(data.uint8(0), data.uint8(len(files) - 1))  # the next file that decodes, no recursion


def test_ema_of_a_run_without_one_starts_from_the_generator(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0", "--ema", "0")
    args = w.parse_args(["--resume", str(out), "--ema", "0.999"])
    ckpt = w.load_checkpoint(args.resume)
    generator, critic = w.Generator(args), w.Critic(args)
    nets = argparse.Namespace(generator=generator, critic=critic, ema=w.Generator(args),
                              opt_g=torch.optim.Adam(generator.parameters()), opt_d=torch.optim.Adam(critic.parameters()))
    w.restore(ckpt, nets, args, 0, 1, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(nets.ema.parameters(), generator.parameters()))


# ------------------------------------------------------------------------------ GPU code paths, on a CPU
@pytest.mark.parametrize("size", [32, 64])
def test_bf16_penalty_gradient_matches_float32(size):
    """--amp's critic weight gradients from the penalty agree with float32's (on a CPU the penalty's pass is kept
    in float32: oneDNN's bf16 double backward of the padded stride-1 convs is wrong, cosine about 0)."""
    args = tiny_args("--critic-dropout", "0", "--image-size", str(size))
    torch.manual_seed(0)
    critic = w.Critic(args)
    real, fake = torch.rand(4, 3, size, size) * 2 - 1, torch.rand(4, 3, size, size) * 2 - 1
    results = {}
    for amp in (False, True):
        torch.manual_seed(5)
        with w.autocast(torch.device("cpu"), amp):
            gp = w.gradient_penalty(critic, real, fake)
        weights_ = [p for p in critic.parameters() if p.dim() > 1]
        results[amp] = (gp.detach().float(), torch.autograd.grad(gp, weights_, allow_unused=True))
    assert results[True][0] == pytest.approx(results[False][0].item(), rel=0.05)
    for a, b in zip(results[False][1], results[True][1]):
        if a is not None:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(), dim=0) > 0.98


def test_channels_last_and_fused_adam_give_the_same_step():
    args = tiny_args("--critic-dropout", "0")
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        memory = torch.channels_last if fast else torch.contiguous_format
        generator, critic = w.Generator(args).to(memory_format=memory), w.Critic(args).to(memory_format=memory)
        opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, fused=fast)
        opt_d = torch.optim.Adam(critic.parameters(), lr=1e-3, fused=fast)
        real = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(
            memory_format=memory)
        torch.manual_seed(1)
        w.critic_step(generator, critic, opt_d, real, args)
        w.generator_step(generator, critic, opt_g, args)
        results.append([p.detach().clone() for p in [*generator.parameters(), *critic.parameters()]])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*results))


def test_nets_are_channels_last_on_a_cpu():  # 1.1-1.3x the CPU recipes' steps (bench/RESULTS.md)
    nets = w.build_nets(tiny_args(), torch.device("cpu"))
    convs = [m.weight for net in (nets.generator, nets.critic) for m in net.modules() if isinstance(m, w.Conv)]
    assert nets.memory == torch.channels_last and convs
    assert all(c.is_contiguous(memory_format=torch.channels_last) and not c.is_contiguous() for c in convs
               if c.shape[-1] > 1)


def test_amp_trains_on_a_cpu(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0", "--amp")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss_critic"]) for r in rows)


def test_cpu_recipe_trains_on_a_mixed_folder(tmp_path, capsys):
    data = make_folder(tmp_path / "mixed", count=20)
    Image.fromarray(np.full((33, 47), 90, np.uint8)).save(data / "class_0" / "gray.png")  # grayscale, odd size
    flags = w.CPU_RECIPE.replace("--max-time 2h", "--iters 3").split()
    w.main(flags + ["--data", str(data), "--out", str(tmp_path / "runs"), "--run-name", "recipe",
                    "--num-workers", "0", "--sample-every", "3"])
    out = capsys.readouterr().out
    assert "CPU recipe" not in out  # the hint is for runs above 32px that do not grow
    args = json.loads((tmp_path / "runs" / "recipe" / "args.json").read_text())
    assert (args["image_size"], args["critic_dropout"], args["gp_every"], args["augment"]) == (64, 0, 4, False)
    assert (args["critic_its"], args["lr"], args["slim_above"], args["ema"]) == (1, 8e-4, 32, 0.9999)
    assert args["grow"] == "16:4500,32:6500,64" and "--max-time 2h" in w.CPU_RECIPE
    records = [json.loads(line) for line in (tmp_path / "runs" / "recipe" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["loss_critic"]) for r in records)
    assert (tmp_path / "runs" / "recipe" / "samples" / "iter_000003.png").is_file()


@pytest.mark.parametrize("bf16", [True, False])
def test_cpu_hint_for_large_images_on_a_cpu(tmp_path, folder, capsys, monkeypatch, bf16):
    monkeypatch.setattr(w, "bf16_cpu", lambda: bf16)
    run(tmp_path, folder, "--image-size", "64", "--iters", "1")
    hint = next(line for line in capsys.readouterr().out.splitlines() if "CPU recipe" in line)
    assert hint.endswith(w.CPU_RECIPE + " --amp" if bf16 else w.CPU_RECIPE)  # --amp only where bf16 units pay


def test_no_bf16_hint_on_a_torch_without_onednn(monkeypatch):
    class Missing:
        def __getattr__(self, name):
            raise AttributeError(name)
    monkeypatch.setattr(torch.ops, "mkldnn", Missing())
    assert w.bf16_cpu() is False


# ------------------------------------------------------------------------------------ progressive growing
GROWN = ["--grow", "8:3,16:3,32", "--fade", "2", "--sample-every", "1", "--torch-deterministic"]


def opt_steps(opt):
    """Adam's step count per parameter (0: never updated, no state)."""
    return [int(opt.state[p]["step"]) if p in opt.state else 0 for g in opt.param_groups for p in g["params"]]


def test_growth_follows_the_schedule():
    args = tiny_args("--grow", "8:3,16:4,32", "--fade", "2")
    got = [w.growth(args, done) for done in range(10)]
    assert got == [(8, 1.0)] * 3 + [(16, 0.5), (16, 1.0), (16, 1.0), (16, 1.0), (32, 0.5), (32, 1.0), (32, 1.0)]
    assert w.growth(tiny_args(), 123) == (32, 1.0)
    assert [w.growth(tiny_args("--grow", "16:2,32", "--fade", "0"), d) for d in (1, 2)] == [(16, 1.0), (32, 1.0)]


@pytest.mark.parametrize("grow, needle", [
    ("8:10,16", "ends at 16 px, not --image-size 32"),  # TINY trains at 32 px
    ("8:10,32", "must double"),
    ("16:10,32:10,64", "above --image-size 32"),
    ("4:10,8:10,16:10,32", "at least 8"),
    ("12:10,24", "power of two"),
    ("16,32", "cannot read '16'"),
    ("16:10,32:10", "cannot read '32:10'"),
    ("16:ten,32", "cannot read"),
    ("32", "at least two resolutions"),
    ("16:0,32", "at least 1 step"),
])
def test_bad_grow_schedules_get_one_line_and_exit_2(grow, needle, capsys):
    assert needle in expect_exit(capsys, TINY + ["--data", ".", "--grow", grow])


def test_a_fade_longer_than_its_stage_is_refused(capsys):
    line = expect_exit(capsys, TINY + ["--data", ".", "--grow", "8:5,16:3,32", "--fade", "4"])
    assert "the 16 px stage (3 steps) is shorter than its --fade 4" in line


def test_grown_nets_blend_the_old_and_new_resolution():
    """alpha 0 is the smaller net exactly (generator: upsampled; critic: on the input averaged down), alpha 1
    the new block alone, and the stage's size is the output's."""
    args = tiny_args("--grow", "8:3,16:3,32", "--fade", "2")
    torch.manual_seed(0)
    generator, critic = w.Generator(args).eval(), w.Critic(args).eval()
    z, x = torch.randn(4, 16), torch.rand(4, 3, 16, 16) * 2 - 1
    generator.res, generator.alpha = 8, 1.0
    small, small_score = generator(z), critic(F.avg_pool2d(x, 2))
    assert small.shape == (4, 3, 8, 8)
    generator.res, generator.alpha, critic.alpha = 16, 0.0, 0.0
    assert torch.allclose(generator(z), F.interpolate(small, scale_factor=2))
    assert torch.allclose(critic(x), small_score, atol=1e-6)
    generator.alpha = critic.alpha = 1.0
    new, new_score = generator(z), critic(x)
    assert new.shape == (4, 3, 16, 16) and not torch.allclose(new, F.interpolate(small, scale_factor=2))
    generator.alpha = critic.alpha = 0.25
    assert torch.allclose(generator(z), torch.lerp(F.interpolate(small, scale_factor=2), new, 0.25), atol=1e-6)
    assert not torch.allclose(critic(x), new_score)
    generator.res = 32
    assert generator(z).shape == (4, 3, 32, 32) and critic(torch.zeros(4, 3, 32, 32)).shape == (4,)


def test_growing_changes_the_resolution_on_schedule_and_keeps_the_shared_layers(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "3", *GROWN, "--ckpt-every", "0")
    first = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    args = w.parse_args(["--resume", str(out)])
    fresh = w.build_nets(args, torch.device("cpu"))  # the initial weights, from the seed
    for part, net in (("generator", fresh.generator), ("critic", fresh.critic)):
        for name, value in net.state_dict().items():  # layers of later stages are untouched, the first's trained
            grown_later = name.split(".")[0] in ("blocks", "to_rgb", "from_rgb", "down")
            assert torch.equal(first[part][name], value) == grown_later, (part, name)
    w.main(["--resume", str(out), "--iters", "8"])
    sizes = {int(p.stem[5:]): Image.open(p).size[0] for p in (out / "samples").glob("iter_*.png")}
    grid = {8: 8 * 8 + 9 * 2, 16: 8 * 16 + 9 * 2, 32: 8 * 32 + 9 * 2}  # 8 tiles and 2 px padding a row
    assert sizes == {1: grid[8], 2: grid[8], 3: grid[8], 4: grid[16], 5: grid[16], 6: grid[16],
                     7: grid[32], 8: grid[32]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["res"], r["alpha"]) for r in rows] == [(2, 8, 1.0), (3, 8, 1.0), (4, 16, 0.5),
                                                                  (6, 16, 1.0), (8, 32, 1.0)]
    ckpt = w.load_checkpoint(out / "ckpt" / "last.pt")
    nets = w.build_nets(args, torch.device("cpu"))
    w.restore(ckpt, nets, args, 0, 1, torch.device("cpu"))
    # optimizer state carried through the doublings: the 8 px layers have all 8 steps, each later block its own
    names = [n for n, _ in nets.generator.named_parameters()]
    steps = dict(zip(names, opt_steps(nets.opt_g)))
    assert steps["fc.weight"] == 8 and steps["blocks.0.1.weight"] == 5 and steps["blocks.1.1.weight"] == 2
    assert steps["to_rgb.0.0.weight"] == 4 and steps["net.8.weight"] == 4  # to-RGBs also feed their next fade
    gif = Image.open(out / "progress.gif")
    assert gif.n_frames == 8 and gif.size == (grid[32],) * 2  # the early frames upsampled


def test_the_ema_warm_up_restarts_at_each_doubling(tmp_path, folder, monkeypatch):
    decays, update = [], w.update_ema
    monkeypatch.setattr(w, "update_ema", lambda ema, gen, decay: (decays.append(decay), update(ema, gen, decay)))
    run(tmp_path, folder, "--iters", "8", *GROWN, "--sample-every", "0")
    assert decays == pytest.approx([t / (t + 9) for t in (1, 2, 3, 1, 2, 3, 1, 2)])
    decays.clear()
    run(tmp_path, folder, "--iters", "4", "--sample-every", "0", name="plain")  # without --grow: the run's step
    assert decays == pytest.approx([t / (t + 9) for t in (1, 2, 3, 4)])


def test_resume_inside_a_fade_is_bit_exact(tmp_path, folder):
    common = [*GROWN, "--fade", "3", "--sample-every", "0"]
    straight = run(tmp_path, folder, "--iters", "8", *common, name="straight")
    run(tmp_path, folder, "--iters", "5", *common, name="split")
    assert [w.growth(w.parse_args(["--resume", str(tmp_path / "runs" / "split")]), d)[1] for d in (4, 5)] == \
        [2 / 3, 1.0]  # stopped after step 5, inside the 16 px fade
    w.main(["--resume", str(tmp_path / "runs" / "split"), "--iters", "8"])
    a, b = weights(straight), weights(tmp_path / "runs" / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_32px_run_continues_at_64px(tmp_path, folder, capsys):
    out = run(tmp_path, folder, "--iters", "3", "--sample-every", "0")
    before = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(out), "--image-size", "64", "--iters", "5"])
    assert "--image-size 64 differs from the checkpoint's 32" in line
    line = expect_exit(capsys, ["--resume", str(out), "--image-size", "64", "--grow", "32:2,64", "--iters", "5"])
    assert "write --grow 32:3,... to grow the run" in line
    line = expect_exit(capsys, ["--resume", str(out), "--image-size", "64", "--grow", "16:3,32:3,64", "--fade", "3"])
    assert "--image-size 64 differs from the checkpoint's 32" in line  # grown from another size than its own
    w.main(["--resume", str(out), "--image-size", "64", "--grow", "32:3,64", "--fade", "1", "--iters", "5",
            "--sample-every", "1"])
    assert Image.open(out / "samples" / "iter_000005.png").size == (8 * 64 + 18,) * 2
    args = w.parse_args(["--resume", str(out)])
    assert (args.image_size, args.grow) == (64, "32:3,64")
    nets = w.build_nets(args, torch.device("cpu"))
    w.restore(w.load_checkpoint(args.resume), nets, args, 0, 1, torch.device("cpu"))
    steps = dict(zip([n for n, _ in nets.critic.named_parameters()], opt_steps(nets.opt_d)))
    assert steps["features.3.weight"] == 10 and steps["from_rgb.0.0.weight"] == 4  # 2 critic steps a step
    assert set(before["critic"]) < set(nets.critic.state_dict())
    w.main(["--resume", str(out), "--sample", "2", "--sample-out", str(tmp_path / "gen")])
    assert Image.open(tmp_path / "gen" / "000000.png").size == (64, 64)


def test_sample_mode_of_a_run_stopped_mid_growth_draws_its_resolution(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "4", *GROWN)
    w.main(["--resume", str(out), "--sample", "2", "--sample-out", str(tmp_path / "gen")])
    assert Image.open(tmp_path / "gen" / "000001.png").size == (16, 16)


def conv_shapes(net, part):
    return [tuple(m.weight.shape) for m in getattr(net, part).modules() if isinstance(m, w.Conv)]


def test_slim_above_halves_the_width_and_shrinks_the_kernels_above_it_only():
    grow = ["--image-size", "64", "--grow", "16:3,32:3,64", "--fade", "2"]
    default, slim32, slim16 = (tiny_args(*grow, *extra) for extra in ([], ["--slim-above", "32"],
                                                                      ["--slim-above", "16"]))
    assert [conv_shapes(w.Generator(default), p) for p in ("blocks", "to_rgb")] == \
        [[(8, 8, 5, 5)] * 2, [(3, 8, 5, 5)] * 2]  # without the flag: as before, full width, 5x5
    assert [conv_shapes(w.Critic(default), p) for p in ("from_rgb", "down")] == \
        [[(8, 3, 5, 5)] * 2, [(8, 8, 4, 4), (8, 8, 3, 3), (8, 8, 4, 4)]]
    assert [conv_shapes(w.Generator(slim32), p) for p in ("blocks", "to_rgb")] == \
        [[(8, 8, 5, 5), (4, 8, 3, 3)], [(3, 8, 5, 5), (3, 4, 3, 3)]]  # only the 64 px block is slim
    assert [conv_shapes(w.Critic(slim32), p) for p in ("from_rgb", "down")] == \
        [[(8, 3, 5, 5), (4, 3, 3, 3)], [(8, 8, 4, 4), (8, 8, 3, 3), (8, 4, 4, 4)]]
    assert conv_shapes(w.Generator(slim16), "blocks") == [(4, 8, 3, 3), (2, 4, 3, 3)]  # halved per doubling
    assert conv_shapes(w.Critic(slim16), "down") == [(8, 4, 4, 4), (8, 8, 3, 3), (4, 2, 4, 4)]
    for args in (slim32, slim16):  # every stage and fade runs at its size, the sizes up to R as in the default net
        torch.manual_seed(0)
        generator = w.Generator(args)
        torch.manual_seed(0)
        critic = w.Critic(args)
        for res, alpha in ((16, 1.0), (32, 0.5), (64, 0.5), (64, 1.0)):
            generator.res, generator.alpha, critic.alpha = res, alpha, alpha
            x = generator(torch.randn(4, 16))
            assert x.shape == (4, 3, res, res) and critic(x).shape == (4,)
    torch.manual_seed(0)
    plain = w.Generator(default).state_dict()
    torch.manual_seed(0)
    slim = w.Generator(slim32).state_dict()
    assert slim.keys() == plain.keys()
    assert all(slim[k].shape == plain[k].shape for k in plain if not k.startswith(("blocks.1", "to_rgb.1")))
    before = [k for k in plain if not k.startswith(("blocks.1", "to_rgb"))]  # built before the first slim layer
    assert all(torch.equal(plain[k], slim[k]) for k in before)


def test_a_slim_run_grows_resumes_and_keeps_its_shape(tmp_path, folder, capsys):
    out = run(tmp_path, folder, "--iters", "5", *GROWN, "--slim-above", "8", "--sample-every", "0")
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["generator"]["blocks.1.1.weight"].shape == (2, 4, 3, 3)  # 8 -> 4 at 16 px -> 2 at 32 px
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(out), "--slim-above", "0", "--iters", "6"])
    assert "--slim-above 0 differs from the checkpoint's 8" in line
    w.main(["--resume", str(out), "--iters", "8"])
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["res"] == 32
    capsys.readouterr()
    assert "--slim-above: invalid choice: 24" in expect_exit(capsys, TINY + ["--data", ".", "--slim-above", "24"])
    assert "give --grow too" in expect_exit(capsys, TINY + ["--data", ".", "--slim-above", "16"])


def test_a_finished_plain_run_grows_into_slim_layers(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0")  # 32 px, no --slim-above
    w.main(["--resume", str(out), "--image-size", "64", "--grow", "32:2,64", "--fade", "1", "--slim-above", "32",
            "--iters", "3", "--sample-every", "0"])
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["generator"]["blocks.0.1.weight"].shape == (4, 8, 3, 3)  # the new 64 px block: half width, 3x3
    assert ckpt["critic"]["from_rgb.0.0.weight"].shape == (4, 3, 3, 3) and ckpt["args"]["slim_above"] == 32
