"""Tests for noise_morph.py (CPU, tiny models; the whole file runs in well under a minute on 2 cores)."""
import itertools
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import noise_morph as nm

TINY = ["--width", "16", "--morph-width", "16", "--batch-size", "32", "--eval-samples", "200"]


def tiny_args(*extra):
    return nm.parse_args(TINY + list(extra))


def run(tmp_path, *argv):
    return nm.main(TINY + ["--out", str(tmp_path), "--device", "cpu"] + list(argv))


def saturate(morpher, sign):
    """Make the morpher's MLP output a huge value with the given sign pattern, whatever the input."""
    last = morpher.net[-1]
    nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(1e9 * sign)


# ---------------------------------------------------------------- morpher

@pytest.mark.parametrize("scale,bound", [(1.0, 1.0), (50.0, 1.0), (3.0, 0.5)])
def test_morpher_stays_in_box_with_huge_outputs(scale, bound):
    d = 3
    args = tiny_args("--latent-dim", str(d), "--morph-scale", str(scale), "--morph-bound", str(bound))
    morpher = nm.NoiseMorpher(args)
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)))
    near_wall = corners * (1 - 1e-7)
    z = torch.cat([corners, near_wall, torch.zeros(1, d), torch.rand(500, d) * 2 - 1,
                   torch.tensor([[0.3, -0.3, 0.7], [-0.9999, 0.5, 1.0]])])
    for sign in itertools.product([-1.0, 1.0], repeat=d):
        saturate(morpher, torch.tensor(sign))
        out = morpher(z)
        assert out.abs().max() <= 1, f"left the box for sign {sign}"
        assert torch.equal(out[: len(corners)].abs(), corners.abs()), "an all-wall coordinate must not move"
        # the centre moves by exactly the bound (softsign(1e9) rounds to 1 in float32)
        assert torch.allclose(out[2 * len(corners)], min(scale, bound) * torch.tensor(sign))
    with torch.no_grad():  # random huge weights, not only huge biases
        for p in morpher.parameters():
            p.normal_(0, 1e4)
    assert morpher(z).abs().max() <= 1


def test_morpher_is_identity_when_mlp_outputs_zero():
    args = tiny_args("--latent-dim", "5", "--morph-scale", "7")
    morpher = nm.NoiseMorpher(args)
    z = torch.rand(64, 5) * 2 - 1
    assert torch.equal(morpher(z), z)  # fresh morpher: last layer starts at zero
    with torch.no_grad():
        for p in morpher.parameters():
            p.normal_()
        morpher.net[-1].weight.zero_()
        morpher.net[-1].bias.zero_()
    assert torch.equal(morpher(z), z)
    with torch.no_grad():
        morpher.net[-1].bias.fill_(0.1)
    assert not torch.equal(morpher(z), z)


def models(args, seed=0):
    torch.manual_seed(seed)
    return nm.Generator(args), nm.Critic(args), nm.NoiseMorpher(args)


def adam(module, lr=1e-4):
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.9))


def test_morph_steps_lower_the_critic_score_and_leave_g_and_d_alone():
    args = tiny_args("--batch-size", "256")
    generator, critic, morpher = models(args)
    g_before = [p.clone() for p in generator.parameters()]
    d_before = [p.clone() for p in critic.parameters()]
    z = nm.sample_z(2000, 2, "cpu", torch.Generator().manual_seed(0))
    score = lambda: critic(generator(morpher(z))).mean().item()  # noqa: E731
    start = score()
    side = torch.linspace(-1, 1, 101)
    with torch.no_grad():  # the best the morpher could do: the lowest score over the latent square
        floor = critic(generator(torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2))).min()
    opt = adam(morpher, lr=1e-2)
    for _ in range(30):
        out = nm.morph_step(generator, critic, morpher, opt, args)
    assert set(out) == {"loss_morph"}
    assert start - score() > 0.4 * (start - floor.item()) > 0, (start, score(), floor)
    assert all(torch.equal(a, b) for a, b in zip(g_before, generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(d_before, critic.parameters()))
    assert all(p.grad is None for p in [*generator.parameters(), *critic.parameters()])
    assert all(p.requires_grad for p in [*generator.parameters(), *critic.parameters()])


def test_generator_step_is_fed_morphed_noise():
    args = tiny_args()
    generator, critic, morpher = models(args)
    with torch.no_grad():
        morpher.net[-1].bias.fill_(0.5)  # a visible move
    seen = {}
    morpher.register_forward_hook(lambda m, inp, out: seen.update(z=inp[0].clone(), nmz=out.clone()))
    generator.register_forward_hook(lambda m, inp, out: seen.update(g_in=inp[0].clone()))
    out = nm.generator_step(generator, critic, adam(generator), args, morpher=morpher)
    assert torch.equal(seen["g_in"], seen["nmz"]) and not torch.equal(seen["nmz"], seen["z"])
    assert all(p.grad is None for p in [*morpher.parameters(), *critic.parameters()])
    assert all(p.grad is not None for p in generator.parameters())
    assert torch.isfinite(out["loss_gen"])
    nm.generator_step(generator, critic, adam(generator), args)  # without a morpher: plain z
    assert seen["g_in"].abs().max() <= 1 and not torch.equal(seen["g_in"], seen["nmz"])


def test_no_morph_never_touches_the_morpher(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(nm.NoiseMorpher, "forward", lambda self, z: calls.append("forward") or z)
    monkeypatch.setattr(nm, "morph_step", lambda *a, **k: calls.append("step"))
    run_dir = run(tmp_path, "--no-morph", "--iters", "4", "--log-every", "2", "--sample-every", "4", "--seed", "3")
    assert calls == []
    ckpt = torch.load(f"{run_dir}/ckpt/last.pt", weights_only=False)
    _, _, fresh = models(nm.parse_args(TINY), seed=3)  # same build order and seed as main
    (state, opt_state) = ckpt["models"][2]
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    assert opt_state["state"] == {}
    lines = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    assert lines[-1]["d_gnmz"] is None and lines[-1]["morph_gap"] is None and "loss_morph" not in lines[-1]


# ---------------------------------------------------------------- data and metrics

def test_gaussian_mixture_samplers_have_stated_centres_and_spread():
    rng = np.random.RandomState(0)
    angles = np.arange(8) * math.pi / 4
    stated = {"8gaussians": (2 * np.stack([np.cos(angles), np.sin(angles)], 1) / 1.414, 0.02 / 1.414),
              "25gaussians": (np.array([(2 * i, 2 * j) for i in range(-2, 3) for j in range(-2, 3)]) / 2.828,
                              0.05 / 2.828)}
    for name, (centres, std) in stated.items():
        x = nm.sample_toy(name, 40000, rng).double().numpy()
        idx = np.linalg.norm(x[:, None] - centres[None], axis=2).argmin(1)
        counts = np.bincount(idx, minlength=len(centres))
        assert counts.min() > 0.8 * len(x) / len(centres), name
        for k, c in enumerate(centres):
            pts = x[idx == k]
            assert np.abs(pts.mean(0) - c).max() < 4 * std / math.sqrt(len(pts)) + 1e-6, (name, k)
            assert np.allclose(pts.std(0), std, rtol=0.1), (name, k, pts.std(0), std)


def test_swissroll_sampler_lies_on_the_scaled_roll():
    x = nm.sample_toy("swissroll", 5000, np.random.RandomState(1)).double().numpy() * 7.5
    r = np.linalg.norm(x, axis=1)
    assert 1.5 * math.pi - 1 < r.min() < 1.5 * math.pi + 0.5 and 4.5 * math.pi - 0.5 < r.max() < 4.5 * math.pi + 1
    m = nm.toy_metrics("swissroll", torch.from_numpy(x / 7.5).float())
    expected = 0.25 / 7.5 * math.sqrt(2 / math.pi)  # mean |normal noise component|
    assert abs(m["manifold_dist"] - expected) < 0.15 * expected and m["hq_share"] > 0.98
    off = nm.toy_metrics("swissroll", torch.zeros(10, 2))  # the centre is far from the roll
    assert off["manifold_dist"] > 0.5 and off["hq_share"] == 0


def test_mode_coverage_on_hand_made_samples():
    angles = np.arange(8) * math.pi / 4
    centres = torch.tensor(2 * np.stack([np.cos(angles), np.sin(angles)], 1) / 1.414, dtype=torch.float32)
    std = 0.02 / 1.414
    m = nm.toy_metrics("8gaussians", centres.repeat(100, 1) + 0.5 * std)
    assert m == {"modes_covered": 8, "hq_share": 1.0}
    assert nm.toy_metrics("8gaussians", centres[3].repeat(800, 1)) == {"modes_covered": 1, "hq_share": 1.0}
    off = centres.repeat(100, 1) + torch.tensor([3.5 * std, 0.0])  # just outside 3 std
    assert nm.toy_metrics("8gaussians", off) == {"modes_covered": 0, "hq_share": 0.0}
    half = torch.cat([centres[:4].repeat(100, 1), torch.zeros(400, 2)])  # origin is no mode
    assert nm.toy_metrics("8gaussians", half) == {"modes_covered": 4, "hq_share": 0.5}
    few = torch.cat([centres[0].repeat(790, 1), centres[1].repeat(10, 1)])  # 10 < 0.2 * 800 / 8
    assert nm.toy_metrics("8gaussians", few)["modes_covered"] == 1
    grid = torch.tensor([(2 * i, 2 * j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float32) / 2.828
    assert nm.toy_metrics("25gaussians", grid.repeat(40, 1)) == {"modes_covered": 25, "hq_share": 1.0}


# ---------------------------------------------------------------- losses

def test_gradient_penalty_of_a_linear_critic():
    torch.manual_seed(0)
    critic = nn.Linear(3, 1)
    real, fake = torch.randn(64, 3), torch.randn(64, 3)
    w = critic.weight.detach().norm()
    assert torch.allclose(nm.gradient_penalty(critic, real, fake), (w - 1) ** 2, atol=1e-6)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.6, 0.8, 0.0]]))  # ||w|| = 1
    assert nm.gradient_penalty(critic, real, fake).item() < 1e-12


def test_gradient_penalty_alpha_per_sample_and_norm_over_all_dims():
    critic = lambda x: 0.5 * x.pow(2).flatten(1).sum(1)  # noqa: E731  gradient = x_hat
    real, fake = torch.zeros(16, 2, 3, 3), torch.ones(16, 2, 3, 3)
    torch.manual_seed(5)
    gp = nm.gradient_penalty(critic, real, fake)
    torch.manual_seed(5)
    alpha = torch.rand(16)
    assert torch.allclose(gp, (alpha * math.sqrt(18) - 1).pow(2).mean(), atol=1e-5)


def test_zero_pull_adds_coef_times_mean_squared_score():
    args = tiny_args("--zero-pull", "2.5")
    generator, critic, _ = models(args)
    real = nm.sample_toy("8gaussians", 32)
    out = nm.critic_step(generator, critic, adam(critic), real, args)
    expected = -out["wasserstein"] + args.gp_lambda * out["gp"] + 2.5 * out["zero_pull"]
    assert out["zero_pull"] > 0 and torch.allclose(out["loss_critic"], expected)
    assert "zero_pull" not in nm.critic_step(generator, critic, adam(critic), real, tiny_args())



def test_zero_lambda_skips_the_penalty_pass(monkeypatch):
    args = tiny_args("--gp-lambda", "0")
    generator, critic, _ = models(args)
    real = nm.sample_toy("8gaussians", 32)

    def forbidden(*_):
        raise AssertionError("the penalty was computed with --gp-lambda 0")

    monkeypatch.setattr(nm, "gradient_penalty", forbidden)
    out = nm.critic_step(generator, critic, adam(critic), real, args)
    assert out["gp"] == 0 and torch.allclose(out["loss_critic"], -out["wasserstein"])
    with pytest.raises(AssertionError, match="penalty was computed"):
        nm.critic_step(generator, critic, adam(critic), real, tiny_args())

# ---------------------------------------------------------------- runs

def test_short_8gaussians_run_writes_plots_and_metrics(tmp_path):
    run_dir = run(tmp_path, "--iters", "20", "--log-every", "10", "--sample-every", "10", "--run-name", "r")
    for name in ("scores.png", "critic_contour.png", "latent.png", "samples/iter_000010.png",
                 "samples/iter_000020.png", "args.json", "ckpt/last.pt"):
        assert (tmp_path / "r" / name).stat().st_size > 0, name
    lines = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    assert [x["iter"] for x in lines] == [10, 20]
    for key in ("loss_critic", "loss_gen", "loss_morph", "wasserstein", "gp", "lr", "images_per_s", "seconds",
                "d_gz", "d_gnmz", "modes_covered", "hq_share"):
        assert isinstance(lines[-1][key], (int, float)), key
    assert lines[-1]["morph_gap"] == pytest.approx(lines[-1]["d_gz"] - lines[-1]["d_gnmz"])
    assert json.load(open(f"{run_dir}/args.json"))["width"] == 16


def test_swissroll_and_25gaussians_log_their_metrics(tmp_path):
    for name, key in (("swissroll", "manifold_dist"), ("25gaussians", "modes_covered")):
        run_dir = run(tmp_path, "--dataset", name, "--iters", "2", "--critic-its", "1", "--morph-its", "1",
                      "--sample-every", "0", "--run-name", name)
        assert key in json.loads(open(f"{run_dir}/metrics.jsonl").readline())


def test_mnist_run_writes_grid_and_latent_walk(tmp_path, mnist_root):
    run_dir = run(tmp_path, "--dataset", "mnist", "--data", str(mnist_root), "--width", "4", "--latent-dim", "8",
                  "--batch-size", "8", "--eval-samples", "16", "--iters", "2", "--critic-its", "1",
                  "--morph-its", "1", "--run-name", "m")
    for name in ("samples/iter_000002.png", "latent_walk.gif", "scores.png"):
        assert (tmp_path / "m" / name).stat().st_size > 0, name


def test_mnist_fid_is_against_the_test_split(tmp_path, mnist_root, fid_weights, monkeypatch):
    """The reference images are wgan_mnist.py's test subset; the numbers are torch-fidelity's calculate_metrics'."""
    import torch_fidelity
    import torchvision
    real_features, seen = nm.inception_features, []
    monkeypatch.setattr(nm, "inception_features", lambda net, x, d: seen.append(nm.to_uint8(x)) or real_features(net, x, d))
    run(tmp_path, "--dataset", "mnist", "--data", str(mnist_root), "--width", "4", "--latent-dim", "8",
        "--batch-size", "8", "--eval-samples", "16", "--iters", "2", "--critic-its", "1", "--morph-its", "1",
        "--fid-every", "2", "--fid-samples", "10", "--fid-weights", str(fid_weights), "--run-name", "f")
    row = json.loads(open(tmp_path / "f" / "metrics.jsonl").read().splitlines()[-1])
    assert row["fid_n"] == 10 and row["fid"] > 0 and row["kid"] == row["kid"]
    test = torchvision.datasets.MNIST(str(mnist_root), train=False).data
    expected = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:10]]
    fake, real = seen
    assert torch.equal(real[:, 0], expected)  # the same subset wgan_mnist.py uses

    class RGB(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x.expand(-1, 3, -1, -1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref = torch_fidelity.calculate_metrics(input1=RGB(fake), input2=RGB(real), fid=True, kid=True, kid_subset_size=10,
                                           feature_extractor_weights_path=str(fid_weights), cuda=False,
                                           save_cpu_ram=True, verbose=False)
    assert row["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert row["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "moons"], "--dataset"),
    (["--critic-its", "0"], "--critic-its"),
    (["--morph-its", "-1"], "--morph-its"),
    (["--zero-pull", "-0.5"], "--zero-pull"),
    (["--batch-size", "0"], "--batch-size"),
    (["--morph-bound", "1.5"], "--morph-bound"),
    (["--lr", "nan"], "--lr"),
    (["--iters", "x"], "--iters"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--fid-every", "10"], "--fid-every"),
    (["--config", "/nonexistent/cfg.json"], "--config"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        nm.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("noise_morph.py: error:") and needle in err, err


def test_bad_files_exit_2_with_one_line(tmp_path, capsys):
    bad_ckpt = tmp_path / "last.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"critic-its": 3, "bogus_key": 1}))
    for argv, needle in ((["--resume", str(bad_ckpt)], "--resume"), (["--config", str(cfg)], "bogus_key"),
                         (["--dataset", "mnist", "--data", str(tmp_path)], "--data")):
        with pytest.raises(SystemExit) as e:
            nm.main(argv + ["--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_config_file_and_command_line_priority(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"critic-its": 3, "morph_scale": 2.0, "dataset": "mnist", "run_name": "ignored"}))
    args = nm.parse_args(["--config", str(cfg), "--critic-its", "4"])
    assert (args.critic_its, args.morph_scale, args.dataset, args.latent_dim, args.run_name) == (4, 2.0, "mnist", 128, None)


def test_resume_is_bit_exact(tmp_path):
    common = ["--iters", "6", "--torch-deterministic", "--seed", "7", "--ckpt-every", "3", "--sample-every", "0"]
    straight = run(tmp_path, *common, "--run-name", "straight")
    half = run(tmp_path, *common, "--run-name", "half", "--iters", "3")
    assert nm.main(["--resume", half, "--iters", "6"]) == half
    a = torch.load(f"{straight}/ckpt/last.pt", weights_only=False)
    b = torch.load(f"{half}/ckpt/last.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 6
    for (sa, oa), (sb, ob) in zip(a["models"], b["models"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        for pa, pb in zip(oa["state"].values(), ob["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [json.loads(x)["iter"] for x in open(f"{half}/metrics.jsonl")] == [3, 6]


def test_nan_loss_stops_with_exit_1_naming_the_iteration(tmp_path, monkeypatch, capsys):
    real_step, calls = nm.critic_step, []

    def poisoned(*a, **k):
        out = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 7:  # second critic step of iteration 2 (critic-its 5)
            out["loss_critic"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(nm, "critic_step", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--iters", "5", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "1", "--run-name", "n")
    assert e.value.code == 1
    assert "non-finite loss at iteration 2" in capsys.readouterr().err
    assert torch.load(tmp_path / "n" / "ckpt" / "last.pt", weights_only=False)["iter"] == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_and_resume_is_bit_exact(tmp_path, monkeypatch, capsys, sig, code):
    common = ["--iters", "6", "--torch-deterministic", "--seed", "7", "--sample-every", "0", "--critic-its", "2",
              "--morph-its", "2"]
    straight = run(tmp_path, *common, "--run-name", "straight")
    real_step, calls = nm.morph_step, []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # the first morpher step of iteration 3
            os.kill(os.getpid(), sig)
        return real_step(*a, **k)

    monkeypatch.setattr(nm, "morph_step", signalled)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *common, "--run-name", "split")
    assert e.value.code == code and "after iteration 3" in capsys.readouterr().err
    assert torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=False)["iter"] == 3
    monkeypatch.setattr(nm, "morph_step", real_step)
    nm.main(["--resume", str(tmp_path / "split")])
    a = torch.load(f"{straight}/ckpt/last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=False)
    torch.use_deterministic_algorithms(False)
    assert b["iter"] == 6
    for (sa, _), (sb, _) in zip(a["models"], b["models"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reusing_a_run_name_is_refused_and_lr_on_resume_is_in_force(tmp_path, capsys):
    run_dir = run(tmp_path, "--iters", "1", "--critic-its", "1", "--morph-its", "1", "--run-name", "u")
    before = open(f"{run_dir}/metrics.jsonl").read()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--iters", "1", "--run-name", "u")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--resume" in err and err.count("\n") == 1
    assert open(f"{run_dir}/metrics.jsonl").read() == before
    nm.main(["--resume", run_dir, "--iters", "2", "--lr", "3e-4"])
    ckpt = torch.load(f"{run_dir}/ckpt/last.pt", weights_only=False)
    assert {g["lr"] for _, opt in ckpt["models"] for g in opt["param_groups"]} == {3e-4}
    assert json.loads(open(f"{run_dir}/metrics.jsonl").read().splitlines()[-1])["lr"] == 3e-4


@pytest.mark.parametrize("values, needle", [({"dataset": "cifar"}, "--dataset"), ({"batch_size": 4.5}, "--batch-size"),
                                            ({"device": "gpu"}, "--device"), ({"morph_bound": 2}, "--morph-bound")])
def test_config_values_get_the_flags_checks(tmp_path, capsys, values, needle):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as e:
        nm.parse_args(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_failures_found_at_start_and_clear_lines(tmp_path, capsys, monkeypatch):
    not_weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, not_weights)
    other = tmp_path / "other.pt"
    torch.save({"generator": {}, "iteration": 1, "args": {"fit": "crop"}}, other)
    (tmp_path / "file").write_text("x")
    cases = [(["--dataset", "mnist", "--fid-every", "1", "--fid-weights", str(tmp_path / "none.pth")], "--fid-weights"),
             (["--dataset", "mnist", "--fid-every", "1", "--fid-weights", str(not_weights)], "--fid-weights"),
             (["--resume", str(other)], "not a checkpoint of noise_morph.py"),
             (["--out", str(tmp_path / "file" / "runs")], "--out"), (["--out", "/proc/nope"], "--out")]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            nm.main(TINY + ["--iters", "1"] + (["--out", str(tmp_path)] if "--out" not in argv else []) + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, (argv, err)
    assert nm.parse_args([]).fid_weights is None  # a copied script must not point into this repository

    def nan_step(*a, **k):
        out = real_step(*a, **k)
        out["loss_critic"] = out["loss_critic"] * float("nan")
        return out

    real_step = nm.critic_step
    monkeypatch.setattr(nm, "critic_step", nan_step)
    with pytest.raises(SystemExit):
        run(tmp_path, "--iters", "3", "--log-every", "1", "--run-name", "nan")
    assert "no checkpoint was written" in capsys.readouterr().err


# ---------------------------------------------------------------- time budget and lazy penalty

def test_max_time_ends_like_iters_and_resume_gets_a_new_budget(tmp_path, monkeypatch, capsys):
    from conftest import check_max_time
    argv = TINY + ["--out", str(tmp_path), "--device", "cpu", "--run-name", "t", "--critic-its", "1",
                   "--morph-its", "1", "--sample-every", "0"]
    check_max_time(nm, argv, tmp_path / "t", "iter", capsys, monkeypatch)
    assert (tmp_path / "t" / "critic_contour.png").is_file()


@pytest.mark.parametrize("every, paid", [(1, 6), (3, 2), (4, 2)])
def test_gp_every_pays_the_penalty_on_every_kth_critic_step(tmp_path, monkeypatch, every, paid):
    calls, original = [], nm.gradient_penalty
    monkeypatch.setattr(nm, "gradient_penalty", lambda *a: calls.append(1) or original(*a))
    run(tmp_path, "--iters", "3", "--critic-its", "2", "--morph-its", "1", "--gp-every", str(every),
        "--sample-every", "0", "--run-name", "k")
    assert len(calls) == paid  # critic steps 0..5; paid at 0, K, 2K, ...
    args = tiny_args("--gp-every", str(every))
    generator, critic, _ = models(args)
    out = nm.critic_step(generator, critic, adam(critic), nm.sample_toy("8gaussians", 32), args)
    assert torch.allclose(out["loss_critic"], -out["wasserstein"] + args.gp_lambda * every * out["gp"])
