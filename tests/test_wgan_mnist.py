"""Tests for wgan_mnist.py (CPU, tiny sizes). Tiny IDX files in torchvision's layout stand in for MNIST
where the real data is not the point; one test trains briefly on the real ../shared/data/MNIST."""
import json
import math
import os
import signal
import struct

import pytest
import torch
import torch.nn as nn

import wgan_mnist as wm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two threads on two shared cores oversubscribe and run ~20x slower here; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_idx(path, array, magic):
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
                     + array.numpy().tobytes())


@pytest.fixture
def tiny_root(tmp_path):
    """MNIST/raw and FashionMNIST/raw, each 96 train and 32 test images of bright squares at random places."""
    g = torch.Generator().manual_seed(0)
    for folder in ("MNIST", "FashionMNIST"):
        raw = tmp_path / "data" / folder / "raw"
        raw.mkdir(parents=True)
        for prefix, n in (("train", 96), ("t10k", 32)):
            images = torch.zeros(n, 28, 28, dtype=torch.uint8)
            for i, (r, c) in enumerate(torch.randint(2, 18, (n, 2), generator=g).tolist()):
                images[i, r:r + 8, c:c + 8] = 255
            write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x803)
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.zeros(n, dtype=torch.uint8), 0x801)
    return tmp_path / "data"


def tiny_argv(root, tmp_path, *extra, name="r"):
    return ["--data", str(root), "--out", str(tmp_path / "runs"), "--run-name", name, "--batch-size", "8",
            "--latent-dim", "8", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "0", *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fake_batch(n=4, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ clipping
def test_every_critic_step_clips_critic_only(tiny_root, tmp_path, monkeypatch):
    c, original, seen = 0.01, wm.critic_step, []

    def checked(generator, critic, opt, real, args, *rest):
        if not seen:  # make the clip do work: push critic weights far outside [-c, c]
            with torch.no_grad():
                for p in critic.parameters():
                    p.normal_(0, 1)
        out = original(generator, critic, opt, real, args, *rest)
        seen.append(max(p.abs().max().item() for p in critic.parameters()))
        checked.generator = generator
        return out

    monkeypatch.setattr(wm, "critic_step", checked)
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "3", "--critic-its", "2", "--clip-value", str(c)))
    assert len(seen) == 6 and all(m <= c for m in seen)
    # generator weights are initialised well above c and must not be clipped
    assert max(p.abs().max().item() for p in checked.generator.parameters()) > 10 * c


@pytest.mark.parametrize("penalty", ["clip", "gp"])
def test_gp_mode_switches_clipping_off(penalty):
    args = wm.parse_args(["--penalty", penalty, "--batch-size", "4", "--latent-dim", "8"])
    gen, critic = wm.Generator(args), wm.Critic(args)
    with torch.no_grad():
        for p in critic.parameters():
            p.normal_(0, 1)
    _, opt_c = wm.make_optimizers(gen, critic, args)
    out = wm.critic_step(gen, critic, opt_c, fake_batch(), args)
    largest = max(p.abs().max().item() for p in critic.parameters())
    if penalty == "clip":
        assert largest <= args.clip_value and "gp" not in out
    else:
        assert largest > 1.0
        assert torch.allclose(out["loss_critic"], -out["wasserstein"] + 10 * args.gp_every * out["gp"])


@pytest.mark.parametrize("argv, norm", [([], "batch"), (["--penalty", "gp"], "none"), (["--arch", "mlp"], "none"),
                                        (["--critic-norm", "none"], "none")])
def test_critic_norm_follows_the_penalty(argv, norm):
    """BatchNorm only in the clipped dcgan critic (the paper's; its parameters are clipped too, checked by
    test_every_critic_step_clips_critic_only), never with the per-sample gradient penalty."""
    args = wm.parse_args(argv)
    critic = wm.Critic(args)
    assert args.critic_norm == norm
    assert any(isinstance(m, nn.BatchNorm2d) for m in critic.modules()) == (norm == "batch")


@pytest.mark.parametrize("lam, passes", [("10", 3), ("0", 2)])
def test_gp_lambda_zero_skips_the_penalty_pass(lam, passes):
    args = wm.parse_args(["--penalty", "gp", "--gp-lambda", lam, "--batch-size", "4", "--latent-dim", "8"])
    gen, critic = wm.Generator(args), wm.Critic(args)
    calls = []
    critic.register_forward_hook(lambda *_: calls.append(1))
    out = wm.critic_step(gen, critic, wm.make_optimizers(gen, critic, args)[1], fake_batch(), args)
    assert len(calls) == passes and ("gp" in out) == (passes == 3)
    assert torch.allclose(out["loss_critic"], -out["wasserstein"] + float(lam) * args.gp_every * out.get("gp", 0))


# ---------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("argv, cls, lr", [
    ([], torch.optim.RMSprop, 2e-4),
    (["--optimizer", "adam"], torch.optim.Adam, 2e-4),
    (["--lr", "5e-5"], torch.optim.RMSprop, 5e-5),
    (["--penalty", "gp"], torch.optim.Adam, 8e-4),
    (["--penalty", "gp", "--optimizer", "rmsprop", "--lr", "3e-4"], torch.optim.RMSprop, 3e-4),
])
def test_optimizer_settings(argv, cls, lr):
    args = wm.parse_args(argv + ["--arch", "mlp"])
    for opt in wm.make_optimizers(wm.Generator(args), wm.Critic(args), args):
        assert type(opt) is cls
        group = opt.param_groups[0]
        assert group["lr"] == lr
        if cls is torch.optim.Adam:
            assert group["betas"] == (0.5, 0.9)
        else:
            assert (group["alpha"], group["eps"], group["momentum"], group["centered"]) == (0.99, 1e-8, 0, False)


@pytest.mark.parametrize("argv, k, ema, lr", [
    ([], 1, 0.999, 2e-4),                                       # the clipped default (issue 27)
    (["--penalty", "gp"], 5, 0.0, 8e-4),
    (["--critic-its", "5", "--ema", "0", "--lr", "5e-5"], 5, 0.0, 5e-5),   # seed 001's base run
    (["--penalty", "gp", "--critic-its", "2", "--ema", "0.9"], 2, 0.9, 8e-4),
])
def test_the_defaults_that_follow_the_penalty(argv, k, ema, lr):
    args = wm.parse_args(argv)
    assert (args.critic_its, args.ema, args.lr) == (k, ema, lr)


# ------------------------------------------------------------------------------------ warm-up schedule
def test_critic_warmup_schedule():
    warm = wm.parse_args(["--critic-warmup", "--critic-its", "5"])
    expected = {s: 100 if s < 25 or s % 500 == 0 else 5 for s in range(0, 2001)}
    assert {s: wm.critic_iters_for(s, warm) for s in expected} == expected
    assert wm.critic_iters_for(24, warm) == 100 and wm.critic_iters_for(25, warm) == 5
    assert wm.critic_iters_for(1000, warm) == 100 and wm.critic_iters_for(1001, warm) == 5
    plain = wm.parse_args(["--critic-its", "3"])
    assert {wm.critic_iters_for(s, plain) for s in range(1001)} == {3}


@pytest.mark.parametrize("extra, calls", [(["--critic-warmup"], 200), (["--critic-its", "3"], 6)])
def test_main_uses_the_schedule(tiny_root, tmp_path, monkeypatch, extra, calls):
    count, original = [0], wm.critic_step

    def counting(*a):
        count[0] += 1
        return original(*a)

    monkeypatch.setattr(wm, "critic_step", counting)
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "2", "--arch", "mlp", *extra))
    assert count[0] == calls


# -------------------------------------------------------------------------------------------- penalty
class LinearCritic(nn.Module):
    """D(x) = w . flatten(x); its input gradient is w everywhere, so GP = (||w|| - 1)^2 exactly."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach())
        return x.flatten(1) @ self.w.flatten()


def test_gradient_penalty_linear_critic():
    w = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real, fake = fake_batch(6, 1).double(), fake_batch(6, 2).double()
    gp = wm.gradient_penalty(LinearCritic(w), real, fake)
    assert torch.allclose(gp, (w.norm() - 1) ** 2, rtol=1e-12)
    assert gp.item() > 1  # ||w|| ~ 28: a per-pixel (dim=1) norm would give a very different value
    unit = wm.gradient_penalty(LinearCritic(w / w.norm()), real, fake)
    assert abs(unit.item()) < 1e-20


def test_gradient_penalty_alpha_per_sample():
    critic = LinearCritic(torch.ones(1, 28, 28))
    real, fake = torch.zeros(8, 1, 28, 28), torch.ones(8, 1, 28, 28)
    torch.manual_seed(0)
    wm.gradient_penalty(critic, real, fake)
    alpha = critic.inputs[0].flatten(1)  # x_hat = alpha * 1 here
    assert torch.all(alpha == alpha[:, :1])  # one alpha per sample, shared over C, H, W
    assert alpha[:, 0].unique().numel() == 8 and alpha.min() >= 0 and alpha.max() <= 1


# ------------------------------------------------------------------------------------------ real data
def test_short_mnist_run_wasserstein_rises(mnist_root, tmp_path):
    wm.main(["--data", str(mnist_root), "--out", str(tmp_path), "--run-name", "m", "--iters", "12",
             "--batch-size", "32", "--log-every", "4", "--sample-every", "0", "--ckpt-every", "0",
             "--critic-its", "5", "--lr", "5e-4"])  # seed 001's k with its 5e-4: a critic that learns in 12 steps
    w = [row["wasserstein"] for row in read_metrics(tmp_path / "m")]
    assert w[-1] > 0 and w[-1] > w[0], w


# ----------------------------------------------------------------------------------- resume and files
@pytest.mark.parametrize("extra", [[], ["--penalty", "gp", "--gp-every", "3", "--ema", "0.9"]])
def test_resume_is_bit_exact(tiny_root, tmp_path, extra):
    base = ["--torch-deterministic", "--critic-its", "2", *extra]
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "6", *base, name="straight"))
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "3", *base, name="split"))
    wm.main(["--resume", str(tmp_path / "runs" / "split"), "--iters", "6"])  # folder form, args from ckpt
    a = torch.load(tmp_path / "runs" / "straight" / "ckpt" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "runs" / "split" / "ckpt" / "last.pt", weights_only=False)
    torch.use_deterministic_algorithms(False)
    assert a["step"] == b["step"] == 6
    assert a["ema"] is not None  # the clipped default averages too
    for net in ("generator", "critic", "ema"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)


def test_resume_of_a_checkpoint_from_an_earlier_version_is_one_line(tiny_root, tmp_path, capsys):
    """Checkpoints from before --g-width (other nets, no such setting) are refused in one line, not a traceback."""
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", "--critic-its", "1", "--g-width", "8"))
    path = tmp_path / "runs" / "r" / "ckpt" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["args"]["g_width"]
    torch.save(ckpt, path)
    capsys.readouterr()
    assert_one_line_error(capsys, ["--resume", str(path)], "earlier version")


def test_run_folder_contents(tiny_root, tmp_path):
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "4", "--sample-every", "2", "--log-every", "2"))
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "2", "--penalty", "gp", name="g"))
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "args.json").read_text())["iters"] == 4
    rows = read_metrics(run)
    assert [r["iter"] for r in rows] == [2, 4]
    keys = {"iter", "loss_critic", "loss_gen", "wasserstein", "lr", "images_per_s", "seconds", "clip_fraction"}
    assert all(keys <= set(r) and 0 <= r["clip_fraction"] <= 1 for r in rows)
    assert "gp" in read_metrics(tmp_path / "runs" / "g")[-1]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["iter_000002.png", "iter_000004.png"]
    assert (run / "ckpt" / "last.pt").is_file() and (run / "progress.gif").is_file()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_and_resume_is_bit_exact(tiny_root, tmp_path, monkeypatch, capsys, sig, code):
    """Ctrl-C (or SIGTERM) mid-step: the step finishes, its state is checkpointed, the exit code says so, and
    resuming gives the weights of a straight run bit for bit."""
    base = ["--torch-deterministic", "--critic-its", "2", "--dataset", "fashion-mnist", "--iters", "6"]
    wm.main(tiny_argv(tiny_root, tmp_path, *base, name="straight"))
    original, calls = wm.critic_step, [0]

    def signalled(*a):
        calls[0] += 1
        if calls[0] == 5:  # the first critic step of generator step 3
            os.kill(os.getpid(), sig)
        return original(*a)

    monkeypatch.setattr(wm, "critic_step", signalled)
    with pytest.raises(SystemExit) as e:
        wm.main(tiny_argv(tiny_root, tmp_path, *base, name="split"))
    assert e.value.code == code
    assert "after iteration 3" in capsys.readouterr().err
    split = tmp_path / "runs" / "split"
    assert torch.load(split / "ckpt" / "last.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(wm, "critic_step", original)
    wm.main(["--resume", str(split)])
    a = torch.load(tmp_path / "runs" / "straight" / "ckpt" / "last.pt", weights_only=False)
    b = torch.load(split / "ckpt" / "last.pt", weights_only=False)
    torch.use_deterministic_algorithms(False)
    assert b["step"] == 6
    for net in ("generator", "critic"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


def test_fid_is_logged(tiny_root, tmp_path, fid_weights):
    # 10 generated vs 10 test images only: checks the plumbing, not a meaningful FID
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", "--critic-its", "1", "--fid-every", "1",
                      "--fid-samples", "10", "--fid-weights", str(fid_weights)))
    row = read_metrics(tmp_path / "runs" / "r")[-1]
    assert row["fid_n"] == 10 and row["fid"] > 0 and "kid" in row


def test_fid_equals_torch_fidelity_calculate_metrics(tiny_root, tmp_path, fid_weights):
    """The script's faster FID path (channels_last Inception, own batches and cache) gives calculate_metrics'
    numbers; a second call reads the cached test features and gives the same."""
    import torch_fidelity
    args = wm.parse_args(["--data", str(tiny_root), "--out", str(tmp_path), "--fid-weights", str(fid_weights)])
    test = wm.load_split(args, train=False)
    fake = torch.rand(16, 28, 28, generator=torch.Generator().manual_seed(3)).mul(255).to(torch.uint8)
    inception = wm.load_inception(args, torch.device("cpu"))
    got = wm.fid_vs_test(inception, fake, test, args, torch.device("cpu"))

    class RGB(torch.utils.data.Dataset):  # what calculate_metrics takes: uint8 [3, H, W] items
        def __init__(self, x):
            self.x = x.reshape(-1, 1, 28, 28).expand(-1, 3, -1, -1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref = torch_fidelity.calculate_metrics(input1=RGB(fake), input2=RGB(wm.subset(test, 16, 0)), fid=True,
                                           kid=True, kid_subset_size=16, feature_extractor_weights_path=str(fid_weights),
                                           cuda=False, save_cpu_ram=True, verbose=False)
    assert got["fid"] > 1 and got["fid_n"] == 16
    assert got["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert got["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-3, abs=1e-5)
    assert wm.fid_vs_test(inception, fake, test, args, torch.device("cpu")) == got


def test_config_file_and_flags_win(tiny_root, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"critic-its": 3, "batch_size": 16, "penalty": "gp", "run_name": "ignored"}))
    args = wm.parse_args(["--config", str(cfg), "--critic-its", "2"])
    got = (args.critic_its, args.batch_size, args.penalty, args.optimizer, args.run_name)
    assert got == (2, 16, "gp", "adam", None)
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", "--critic-warmup"))
    saved = tmp_path / "runs" / "r" / "args.json"  # a run's args.json works as a config
    args = wm.parse_args(["--config", str(saved), "--iters", "7"])
    assert (args.iters, args.critic_warmup, args.batch_size) == (7, True, 8)
    cfg.write_text(json.dumps({"no-such-flag": 1}))
    with pytest.raises(SystemExit) as e:
        wm.parse_args(["--config", str(cfg)])
    assert e.value.code == 2


@pytest.mark.parametrize("values, flag", [({"batch_size": 4.5}, "--batch-size"), ({"penalty": "wgan"}, "--penalty"),
                                          ({"device": "gpu"}, "--device"), ({"critic_its": 0}, "--critic-its"),
                                          ({"max_time": "1 week"}, "--max-time"), ({"gp_every": "2x"}, "--gp-every")])
def test_config_values_get_the_flags_checks(tmp_path, capsys, values, flag):
    """Config values reach argparse as tokens: types, choices and checks apply to them as to flags."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as e:
        wm.parse_args(["--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and flag in err, err


# --------------------------------------------------------------------------------------------- failure
def assert_one_line_error(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        wm.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("wgan_mnist.py: error:"), err
    assert "Traceback" not in err and "usage" not in err
    for word in words:
        assert word in err, err


def test_missing_data_names_folder_and_flag(tmp_path, capsys):
    assert_one_line_error(capsys, ["--data", str(tmp_path / "nothing"), "--out", str(tmp_path)],
                          str(tmp_path / "nothing" / "MNIST" / "raw"), "--download")
    assert not (tmp_path / "nothing").exists()  # nothing downloaded or created


@pytest.mark.parametrize("argv, flag", [
    (["--dataset", "cifar10"], "--dataset"),
    (["--clip-value", "-0.01"], "--clip-value"),
    (["--clip-value", "nan"], "--clip-value"),  # NaN passed `<= 0` checks: now each is written so that NaN fails
    (["--lr", "nan"], "--lr"),
    (["--gp-lambda", "nan"], "--gp-lambda"),
    (["--critic-its", "0"], "--critic-its"),
    (["--batch-size", "0"], "--batch-size"),
    (["--g-width", "0"], "--g-width"),  # 0 once passed the check and then became the default width
    (["--d-width", "-3"], "--d-width"),
    (["--penalty", "gp", "--critic-norm", "batch"], "--critic-norm"),
    (["--arch", "mlp", "--critic-norm", "batch"], "--critic-norm"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags(tmp_path, capsys, argv, flag):
    assert_one_line_error(capsys, argv + ["--out", str(tmp_path)], flag)


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(capsys, ["--resume", str(bad)], "--resume", str(bad))


def test_nan_stops_run_and_keeps_good_checkpoint(tiny_root, tmp_path, monkeypatch, capsys):
    original, calls = wm.critic_step, [0]

    def poisoned(*a):
        out = original(*a)
        calls[0] += 1
        if calls[0] > 8:  # 2 critic steps per iteration: iteration 5 is the first bad one
            out["loss_critic"] = out["loss_critic"] * float("nan")
        return out

    monkeypatch.setattr(wm, "critic_step", poisoned)
    with pytest.raises(SystemExit) as e:
        wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "10", "--critic-its", "2", "--ckpt-every", "2",
                          "--log-every", "3"))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "iteration 5" in err, err
    ckpt = torch.load(tmp_path / "runs" / "r" / "ckpt" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["critic"].values())


# ------------------------------------------------------------------------------------- time budget
@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("2.5", 2.5), ("30m", 1800), ("2h", 7200),
                                           ("1.5h", 5400)])
def test_max_time_units(text, seconds):
    assert wm.parse_args(["--max-time", text]).max_time == seconds


@pytest.mark.parametrize("text", ["0", "-5", "abc", "5d", "", "1e3"])
def test_bad_max_time(tmp_path, capsys, text):
    assert_one_line_error(capsys, ["--max-time", text, "--out", str(tmp_path)], "--max-time")


def test_max_time_ends_like_iters_and_resume_gets_a_new_budget(tiny_root, tmp_path, monkeypatch, capsys):
    from conftest import check_max_time
    run = tmp_path / "runs" / "r"
    check_max_time(wm, tiny_argv(tiny_root, tmp_path, "--critic-its", "1"), run, "step", capsys, monkeypatch)
    assert (run / "progress.gif").is_file()


@pytest.mark.parametrize("every, paid", [(1, 6), (3, 2), (4, 2)])
def test_gp_every_pays_the_penalty_on_every_kth_critic_step(tiny_root, tmp_path, monkeypatch, every, paid):
    calls, original = [], wm.gradient_penalty
    monkeypatch.setattr(wm, "gradient_penalty", lambda *a: calls.append(1) or original(*a))
    wm.main(tiny_argv(tiny_root, tmp_path, "--penalty", "gp", "--gp-every", str(every), "--critic-its", "2",
                      "--iters", "3"))
    assert len(calls) == paid  # critic steps 0..5; paid at 0, K, 2K, ...


def test_lazy_penalty_is_weighted_lambda_times_k():
    args = wm.parse_args(["--penalty", "gp", "--gp-every", "4", "--batch-size", "4", "--latent-dim", "8"])
    gen, critic = wm.Generator(args), wm.Critic(args)
    opt = wm.make_optimizers(gen, critic, args)[1]
    paid = wm.critic_step(gen, critic, opt, fake_batch(), args, penalize=True)
    assert torch.allclose(paid["loss_critic"], -paid["wasserstein"] + 40 * paid["gp"])
    free = wm.critic_step(gen, critic, opt, fake_batch(), args, penalize=False)
    assert "gp" not in free and torch.allclose(free["loss_critic"], -free["wasserstein"])


# ------------------------------------------------------------------------------ nothing lost, nothing silent
def test_reusing_a_run_name_is_refused(tiny_root, tmp_path, capsys):
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", "--critic-its", "1"))
    before = (tmp_path / "runs" / "r" / "ckpt" / "last.pt").read_bytes()
    capsys.readouterr()
    assert_one_line_error(capsys, tiny_argv(tiny_root, tmp_path, "--iters", "1"), "--resume", "--run-name")
    assert (tmp_path / "runs" / "r" / "ckpt" / "last.pt").read_bytes() == before


def test_lr_given_on_resume_is_in_force(tiny_root, tmp_path):
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", "--critic-its", "1"))
    wm.main(["--resume", str(tmp_path / "runs" / "r"), "--iters", "2", "--lr", "3e-4"])
    ckpt = torch.load(tmp_path / "runs" / "r" / "ckpt" / "last.pt", weights_only=False)
    assert {g["lr"] for key in ("opt_generator", "opt_critic") for g in ckpt[key]["param_groups"]} == {3e-4}
    assert read_metrics(tmp_path / "runs" / "r")[-1]["lr"] == 3e-4 and ckpt["args"]["lr"] == 3e-4


@pytest.mark.parametrize("weights", ["missing", "not-inception"])
def test_bad_fid_weights_stop_before_training(tiny_root, tmp_path, capsys, weights):
    path = tmp_path / "w.pth"
    if weights == "not-inception":
        torch.save({"conv.weight": torch.zeros(3)}, path)
    assert_one_line_error(capsys, tiny_argv(tiny_root, tmp_path, "--iters", "5", "--fid-every", "5",
                                            "--fid-weights", str(path)), "--fid-weights")
    assert not (tmp_path / "runs" / "r").exists()  # stopped before the run folder, not at the first FID


def test_fid_at_its_own_steps_after_a_checkpoint(tiny_root, tmp_path, fid_weights):
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "6", "--critic-its", "1", "--log-every", "5",
                      "--fid-every", "2", "--fid-samples", "8", "--fid-weights", str(fid_weights)))
    assert [r["iter"] for r in read_metrics(tmp_path / "runs" / "r") if "fid" in r] == [2, 4, 6]


@pytest.mark.parametrize("out", ["/proc/nope", "file"])
def test_unwritable_out_is_one_line(tiny_root, tmp_path, capsys, out):
    if out == "file":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "runs")
    argv = tiny_argv(tiny_root, tmp_path, "--iters", "1")
    argv[argv.index("--out") + 1] = out
    assert_one_line_error(capsys, argv, "--out")


def test_unclear_cases_get_clear_lines(tiny_root, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"generator": {}, "critic": {}, "iteration": 3, "args": {"fit": "crop", "data": "x"}}, other)
    assert_one_line_error(capsys, ["--resume", str(other)], "not a checkpoint of wgan_mnist.py")
    raw = tiny_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    assert_one_line_error(capsys, tiny_argv(tiny_root, tmp_path, "--iters", "1"), "truncated", str(raw.parent))


# ------------------------------------------------------------------------------ GPU code paths, on a CPU
def test_bf16_penalty_gradient_matches_float32():
    args = wm.parse_args(["--penalty", "gp", "--batch-size", "8"])
    torch.manual_seed(0)
    critic, real, fake = wm.Critic(args), fake_batch(8, 1), fake_batch(8, 2)
    grads = {}
    for amp in (False, True):
        args.amp = amp
        torch.manual_seed(5)  # the same alpha
        with wm.autocast(args, real.device):
            gp = wm.gradient_penalty(critic, real, fake)
        weights = [p for p in critic.parameters() if p.dim() > 1]  # biases do not move the input gradient
        grads[amp] = (gp.detach().float(), torch.autograd.grad(gp, weights))
    assert grads[True][0].dtype == torch.float32 and grads[True][0] == pytest.approx(grads[False][0].item(), rel=0.05)
    for a, b in zip(grads[False][1], grads[True][1]):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


def test_channels_last_and_fused_adam_give_the_same_step():
    """main's CUDA choices (channels_last nets and inputs, fused Adam) run on a CPU and change nothing but speed."""
    args = wm.parse_args(["--penalty", "gp", "--batch-size", "8"])
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        gen, critic = wm.Generator(args), wm.Critic(args)
        real = fake_batch(8)
        if fast:
            gen, critic = gen.to(memory_format=torch.channels_last), critic.to(memory_format=torch.channels_last)
            real = real.contiguous(memory_format=torch.channels_last)
        opt_g, opt_c = wm.make_optimizers(gen, critic, args, fused=fast)
        torch.manual_seed(1)
        wm.critic_step(gen, critic, opt_c, real, args)
        wm.generator_step(gen, critic, opt_g, args)
        results.append([p.detach().clone() for p in [*gen.parameters(), *critic.parameters()]])
    # channels_last convs sum in another order: weights differ by ~1.5e-5 after a step of lr 8e-4 (rounding);
    # a step missed, doubled or of the wrong sign moves them by ~lr
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*results))


def test_amp_trains_on_a_cpu(tiny_root, tmp_path):
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "2", "--critic-its", "1", "--penalty", "gp", "--amp"))
    assert all(math.isfinite(r["loss_critic"]) for r in read_metrics(tmp_path / "runs" / "r"))


def test_clipped_critic_analyses_read_a_checkpoint(tiny_root, tmp_path):
    """experiments/wgan_mnist_critic.py and wgan_mnist_collapse.py on a tiny run: each row's numbers are finite,
    the run's critic is measured and trained on, and every critic, fresh ones at their own c, stays clipped."""
    import subprocess
    import sys
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "2", "--critic-its", "1"))
    run, root = tmp_path / "runs" / "r", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}

    def rows(script, *extra):
        out = subprocess.run([sys.executable, os.path.join(root, "experiments", script), str(run), *extra],
                             env=env, capture_output=True, text=True, check=True).stdout
        return [json.loads(line) for line in out.splitlines()]
    critics = rows("wgan_mnist_critic.py", "--steps", "3", "--clips", "0.01,0.1")
    names = [r["critic"] for r in critics]
    assert names[0] == "run" and "run+3" in names and "fresh c=0.1+3" in names
    assert critics[0]["critic_steps"] == 2 and critics[0]["ckpt_step"] == 2
    assert all(math.isfinite(r[k]) for r in critics for k in ("estimate", "lipschitz", "gen_grad", "grad_cosine"))
    clip = {r["critic"]: float(r["critic"].split("=")[1].split("+")[0]) if "=" in r["critic"] else 0.01 for r in critics}
    assert all(r["max_abs"] <= clip[r["critic"]] * (1 + 1e-6) for r in critics)  # every critic stays clipped
    at_bound = {r["critic"]: r["at_bound"] for r in critics}
    assert at_bound["fresh c=0.01+3"] > at_bound["fresh c=0.1+3"] > 0  # init weights reach 0.01 far more often
    (collapse,) = rows("wgan_mnist_collapse.py")
    assert collapse["step"] == 2 and -1 <= collapse["grad_cosine"] <= 1 and collapse["batch_std"] >= 0
