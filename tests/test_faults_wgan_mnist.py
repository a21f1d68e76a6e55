"""Faults of issues 25 and 26 on wgan_mnist.py (CPU, tiny sizes): the CUDA RNG and optimizer state on resume,
the FID cache, stop signals at every moment, files written whole, the run folder's lock and checks on resume,
and one-line errors. In-process main() calls wherever a subprocess would prove nothing more."""
import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import wgan_mnist as wm
from conftest import signal_once_started
from test_wgan_mnist import assert_one_line_error, read_metrics, tiny_argv, tiny_root, write_idx  # noqa: F401

SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 143)]
SMALL = ["--g-width", "4", "--d-width", "4", "--critic-its", "1"]


@pytest.fixture(autouse=True)
def unhandled_signal_fails():
    """A stop signal the script does not handle fails the test (instead of killing or stopping pytest)."""
    def unhandled(signum, frame):
        raise RuntimeError(f"{signal.Signals(signum).name} reached no handler of the script")
    saved = {sig: signal.signal(sig, unhandled) for sig, _ in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def script_lines(err):
    return [line for line in err.splitlines() if "wgan_mnist.py:" in line]


def expect_stop(capsys, argv, code, *words):
    with pytest.raises(SystemExit) as e:
        wm.main(argv)
    err = capsys.readouterr().err
    lines = script_lines(err)
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines
    return lines[0]


def kill_self_in(monkeypatch, owner, name, sig, times=1):
    """Send `sig` to this process inside owner.name, on its `times`-th call."""
    original, calls = getattr(owner, name), [0]

    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == times:
            os.kill(os.getpid(), sig)
        return original(*a, **k)
    monkeypatch.setattr(owner, name, hooked)


# ----------------------------------------------------------------------- issue 25: the device in use only
class FakeCuda:
    """torch.cuda's RNG functions as one visible GPU has them: a device index past it is an IndexError."""

    def __init__(self, monkeypatch):
        self.set = []
        for name in ("set_rng_state",):
            monkeypatch.setattr(torch.cuda, name, self.set_state)
            monkeypatch.setattr(torch.cuda.random, name, self.set_state)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((16,), 7, dtype=torch.uint8)])

    def set_state(self, state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if (index or 0) >= 1:
            raise IndexError(f"device {index} of 1 visible")
        self.set.append(state)


@pytest.mark.parametrize("saved", [[], [1], [1, 2, 3], "tensor", None])
def test_cuda_rng_state_of_the_device_in_use_resumes_with_other_gpu_counts(monkeypatch, saved):
    """A checkpoint's CUDA state as a list of 0, 1 or 3 GPUs (older checkpoints), one state or none."""
    fake = FakeCuda(monkeypatch)
    cuda = torch.device("cuda", 0)
    state = wm.rng_state(torch.device("cpu"))
    states = {"tensor": torch.full((16,), 5, dtype=torch.uint8), None: None}
    state["cuda"] = states[saved] if not isinstance(saved, list) else \
        [torch.full((16,), v, dtype=torch.uint8) for v in saved]
    wm.set_rng_state(state, cuda)
    expected = {"tensor": [5], None: []}.get(saved) if not isinstance(saved, list) else saved[:1]
    assert [int(s[0]) for s in fake.set] == expected
    assert int(wm.rng_state(cuda)["cuda"][0]) == 7  # the device's own state, one tensor


@pytest.mark.parametrize("saved_fused, here_fused", [(False, True), (True, False)])
def test_restore_keeps_this_devices_fused_adam(tiny_root, tmp_path, saved_fused, here_fused):
    """A CPU checkpoint on CUDA gets fused Adam (and the reverse); its state is placed for the kernel used."""
    args = wm.parse_args(tiny_argv(tiny_root, tmp_path, "--penalty", "gp", *SMALL))
    nets = wm.build_nets(args, torch.device("cpu"))
    nets.opt_g, nets.opt_c = wm.make_optimizers(nets.generator, nets.critic, args, fused=saved_fused)
    batches = wm.Batches(torch.zeros(16, 28, 28, dtype=torch.uint8), 8, 1)
    count = {"step": 0, "critic_steps": 0}
    wm.train_step(nets, batches, count, args)
    path = tmp_path / "c.pt"
    wm.save_checkpoint(path, nets, batches, count, args)
    again = wm.build_nets(args, torch.device("cpu"))
    again.opt_g, again.opt_c = wm.make_optimizers(again.generator, again.critic, args, fused=here_fused)
    wm.restore(torch.load(path, weights_only=False), again, batches, count, args)
    for opt in (again.opt_g, again.opt_c):
        assert bool(opt.param_groups[0]["fused"]) == here_fused
        assert all(s["step"].dtype == torch.float32 for s in opt.state.values())
    wm.train_step(again, batches, count, args)  # the loaded state works with the kernel in force


def test_fid_cache_is_per_device_and_a_bad_cache_is_recomputed(tiny_root, tmp_path, monkeypatch):
    import torch_fidelity.metric_fid as mf
    import torch_fidelity.metric_kid as mk
    calls = []
    monkeypatch.setattr(wm, "inception_features", lambda net, images, device: calls.append(len(images))
                        or torch.rand(len(images), 2048))
    monkeypatch.setattr(mf, "fid_statistics_to_metric", lambda *a: {"frechet_inception_distance": 1.0})
    monkeypatch.setattr(mk, "kid_features_to_metric", lambda *a, **k: {"kernel_inception_distance_mean": 0.0})
    args = wm.parse_args(["--data", str(tiny_root), "--out", str(tmp_path)])
    test, fake = wm.load_split(args, train=False), torch.zeros(8, 28, 28, dtype=torch.uint8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cases = {}
    for name, device, spoil in [("first", cpu, None), ("cached", cpu, None), ("other device", cuda, None),
                                ("truncated", cpu, "truncate"), ("wrong content", cpu, "dict"),
                                ("again", cpu, None)]:
        if spoil:
            (cache,) = [p for p in (tmp_path / ".fid_cache").iterdir() if p.name.endswith("-cpu.pt")] or [None]
            if cache is None:  # caches not named by device: take the one there is
                (cache,) = (tmp_path / ".fid_cache").iterdir()
            if spoil == "truncate":
                cache.write_bytes(cache.read_bytes()[:100])
            else:
                torch.save({"features": 1}, cache)
        before = len(calls)
        try:
            wm.fid_vs_test(None, fake, test, args, device)
            cases[name] = len(calls) - before
        except Exception as e:
            cases[name] = type(e).__name__
    assert cases == {"first": 2, "cached": 1, "other device": 2, "truncated": 2, "wrong content": 2, "again": 1}
    assert not list((tmp_path / ".fid_cache").glob("*.tmp"))


def test_penalty_gradient_is_float32_under_bf16_autocast():
    """What gradient_penalty's comment says: x_hat's gradient is float32 under autocast, nothing to unscale."""
    args = wm.parse_args(["--penalty", "gp", "--amp"])
    critic, seen = wm.Critic(args), []
    original = torch.autograd.grad
    with wm.autocast(args, torch.device("cpu")):
        torch.autograd.grad = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
        try:
            wm.gradient_penalty(critic, torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28))
        finally:
            torch.autograd.grad = original
    assert seen[0][0].dtype == torch.float32


# ----------------------------------------------------------- issue 26, families 2, 3, 16: stop signals
MOMENTS = ["loading MNIST", "loading a checkpoint", "training", "second signal", "checkpoint write", "FID",
           "writing the GIF"]


@pytest.mark.parametrize("sig, code", SIGNALS, ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_at_any_moment_is_one_line_and_its_code(tiny_root, tmp_path, monkeypatch, capsys, sig, code,
                                                         moment):
    argv = tiny_argv(tiny_root, tmp_path, "--iters", "4", *SMALL)
    run = tmp_path / "runs" / "r"
    if moment == "loading MNIST":
        kill_self_in(monkeypatch, wm, "load_split", sig)
        expect_stop(capsys, argv, code, "during start-up", "nothing saved")
        assert not run.exists()
        return
    if moment == "loading a checkpoint":
        wm.main(argv[:-6] + ["--iters", "1", "--ckpt-every", "1"])
        capsys.readouterr()
        before = (run / "ckpt" / "last.pt").read_bytes()
        kill_self_in(monkeypatch, wm, "load_checkpoint", sig)
        expect_stop(capsys, ["--resume", str(run), "--iters", "3"], code, "during start-up")
        assert (run / "ckpt" / "last.pt").read_bytes() == before
        return
    if moment in ("training", "second signal"):
        kill_self_in(monkeypatch, wm, "critic_step", sig, times=2)
        if moment == "second signal":  # the first decides the code
            kill_self_in(monkeypatch, wm, "generator_step", signal.SIGINT if sig != signal.SIGINT else
                         signal.SIGTERM, times=2)
        line = expect_stop(capsys, argv, code)
        if moment == "training":
            assert "after iteration 2" in line and torch.load(run / "ckpt" / "last.pt", weights_only=False)["step"] == 2
        return
    if moment == "checkpoint write":  # deferred: the checkpoint is written whole, then the stop
        kill_self_in(monkeypatch, wm.torch, "save", sig)
        expect_stop(capsys, argv[:-2] + ["--ckpt-every", "2"], code, "after iteration 3")
        monkeypatch.undo()
        assert torch.load(run / "ckpt" / "last.pt", weights_only=False)["step"] == 3
        assert not list(run.rglob("*.tmp"))
        return
    if moment == "FID":
        monkeypatch.setattr(wm, "load_inception", lambda *a: None)
        finished = []

        def fid(*a):
            os.kill(os.getpid(), sig)
            time.sleep(0.5)  # a FID takes minutes: the stop must not wait for it
            finished.append(1)
            return {"fid": 1.0, "kid": 0.0, "fid_n": 8}
        monkeypatch.setattr(wm, "compute_fid", fid)
        expect_stop(capsys, argv + ["--fid-every", "2", "--fid-samples", "8"], code, "the last checkpoint")
        assert not finished and torch.load(run / "ckpt" / "last.pt", weights_only=False)["step"] == 2
        return
    # writing the GIF: the signal comes while PIL has written part of it
    from PIL import Image
    original = Image.Image.save

    def partial_save(self, fp, *a, **k):
        if k.get("format") == "GIF" or str(fp).endswith(".gif"):
            Path(fp).write_bytes(b"GIF89a")
            os.kill(os.getpid(), sig)
        return original(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", partial_save)
    expect_stop(capsys, argv + ["--sample-every", "2"], code, "progress.gif")
    assert not (run / "progress.gif").exists() and not list(run.rglob("*.tmp"))
    assert torch.load(run / "ckpt" / "last.pt", weights_only=False)["step"] == 4


@pytest.mark.parametrize("sig, code", SIGNALS, ids=lambda v: getattr(v, "name", v))
def test_a_signal_while_torch_loads_is_one_line(tmp_path, sig, code):
    """The moment no in-process test reaches: the imports (a subprocess, signalled once its handlers are set)."""
    proc = subprocess.Popen([sys.executable, "wgan_mnist.py", "--help"], cwd=Path(wm.__file__).parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal_once_started(proc, sig)
    err = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip("the imports finished within a second")
    assert proc.returncode == code and "Traceback" not in err and len(script_lines(err)) == 1, (proc.returncode, err)


def test_a_truncated_grid_is_left_out_of_the_gif(tiny_root, tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "iter_000001.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # a kill mid-write
    (run / "samples" / "iter_000002.png").write_bytes(b"")
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "3", *SMALL, "--sample-every", "3"))
    from PIL import Image
    assert Image.open(run / "progress.gif").n_frames == 1


# ---------------------------------------------------------------- family 4: see the FID cache test above
# ------------------------------------------------------------- family 5: a checkpoint outside <run>/ckpt/
@pytest.mark.parametrize("where", ["backups/step1.pt", "step1.pt", "other/ckpt/last.pt"])
def test_resume_of_a_checkpoint_outside_its_run_folder_is_refused(tiny_root, tmp_path, capsys, where):
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", *SMALL))
    copy = tmp_path / where
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes((tmp_path / "runs" / "r" / "ckpt" / "last.pt").read_bytes())
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    with pytest.raises(BaseException) as e:
        wm.main(["--resume", str(copy), "--iters", "2"])
    err = capsys.readouterr().err
    assert isinstance(e.value, SystemExit) and e.value.code == 2, err
    assert "not a run folder's checkpoint" in err and len(script_lines(err)) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere


# --------------------------------------------------------------------------------- family 6: the lock
@pytest.mark.parametrize("how", ["resume", "same run name"])
def test_a_run_folder_in_use_is_refused(tiny_root, tmp_path, capsys, how):
    import fcntl
    run = tmp_path / "runs" / "r"
    if how == "resume":
        wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", *SMALL))
        before = (run / "metrics.jsonl").read_text()
    else:
        run.mkdir(parents=True)
    capsys.readouterr()
    with open(run / ".lock", "a") as held:  # another process's lock (another open file: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        argv = ["--resume", str(run), "--iters", "2"] if how == "resume" else \
            tiny_argv(tiny_root, tmp_path, "--iters", "1", *SMALL)
        assert_one_line_error(capsys, argv, "is in use by another process")
    if how == "resume":
        assert (run / "metrics.jsonl").read_text() == before
    wm.main(["--resume", str(run), "--iters", "2"] if how == "resume" else argv)  # free again


# ------------------------------------------------------------------ family 7: metrics.jsonl cut back
@pytest.mark.parametrize("tail", ["rows", "rows and a cut line"])
def test_resume_cuts_metrics_back_to_the_checkpoint(tiny_root, tmp_path, tail):
    run = tmp_path / "runs" / "r"
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "2", *SMALL))
    with open(run / "metrics.jsonl", "a") as f:  # what a run killed after logging steps 3 and 4 leaves
        f.write('{"iter": 3, "loss_critic": 1}\n{"iter": 4, "fid": 2}\n' + ('{"iter": 5, "lo' if "cut" in tail else ""))
    wm.main(["--resume", str(run), "--iters", "4"])
    rows = read_metrics(run)
    assert [r["iter"] for r in rows] == [1, 2, 3, 4] and "wasserstein" in rows[2] and "fid" not in rows[3]


# --------------------------------------------------------------- family 8: flags fixed by a checkpoint
@pytest.mark.parametrize("flag, value, saved", [("--arch", "mlp", "dcgan"), ("--g-width", "8", "4"),
                                                ("--d-width", "8", "4"), ("--upsample", "nearest", "tconv"),
                                                ("--latent-dim", "4", "8"), ("--critic-norm", "none", "batch"),
                                                ("--optimizer", "adam", "rmsprop")])
def test_resume_with_a_flag_that_changes_the_nets_is_refused(tiny_root, tmp_path, capsys, flag, value, saved):
    run = tmp_path / "runs" / "r"
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", *SMALL))
    capsys.readouterr()
    with pytest.raises(BaseException) as e:
        wm.main(["--resume", str(run), "--iters", "2", flag, value])
    err = capsys.readouterr().err
    assert isinstance(e.value, SystemExit) and e.value.code == 2, err
    assert len(script_lines(err)) == 1 and f"{flag} {value}" in err and f"checkpoint's {saved}" in err, err


# ------------------------------------------------------------------------------ families 9, 13, 14, 15
@pytest.mark.parametrize("seed, ok", [("-1", False), (str(2 ** 32), False), (str(2 ** 40), False),
                                      (str(2 ** 32 - 1), True), ("0", True)])
def test_seed_range(tmp_path, capsys, seed, ok):
    if ok:
        assert wm.parse_args(["--seed", seed]).seed == int(seed)
        wm.setup(wm.parse_args(["--seed", seed]))
    else:
        assert_one_line_error(capsys, ["--seed", seed, "--out", str(tmp_path)], "--seed")


@pytest.mark.parametrize("extra", [["--fid-every", "2"], ["--fid-floor"]])
def test_fid_samples_above_the_test_split_is_refused_at_start(tiny_root, tmp_path, monkeypatch, capsys, extra):
    monkeypatch.setattr(wm, "load_inception", lambda *a: None)
    assert_one_line_error(capsys, tiny_argv(tiny_root, tmp_path, "--iters", "2", *SMALL, "--fid-samples", "40",
                                            *extra), "--fid-samples 40", "32")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("shape", [(32, 32), (28, 27), (14, 28)])
def test_idx_images_not_28x28_are_one_line(tiny_root, tmp_path, capsys, shape):
    raw = tiny_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    write_idx(raw, torch.zeros(96, *shape, dtype=torch.uint8), 0x803)
    with pytest.raises(BaseException) as e:
        wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", *SMALL))
    err = capsys.readouterr().err
    assert isinstance(e.value, SystemExit) and e.value.code == 2, err
    assert len(script_lines(err)) == 1 and "28x28" in err and str(raw) in err


@pytest.mark.parametrize("case", ["run name of 300", "yaml integer key", "config.YAML", "config.YML"])
def test_run_name_and_config_oddities(tmp_path, capsys, case):
    if case == "run name of 300":
        assert_one_line_error(capsys, ["--run-name", "x" * 300, "--out", str(tmp_path)], "--run-name")
        return
    cfg = tmp_path / {"yaml integer key": "c.yaml", "config.YAML": "config.YAML", "config.YML": "c.YML"}[case]
    cfg.write_text("1: 5\n" if case == "yaml integer key" else "iters: 3\ncritic-its: 2\n")
    if case == "yaml integer key":
        assert_one_line_error(capsys, ["--config", str(cfg), "--out", str(tmp_path)], "--config", "1")
    else:
        args = wm.parse_args(["--config", str(cfg)])
        assert (args.iters, args.critic_its) == (3, 2)


# ------------------------------------------------------------------- families 10, 11: disk full, read-only
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")],
                         ids=["ENOSPC", "inline_container", "file write failed"])
def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(tiny_root, tmp_path, monkeypatch, capsys, error):
    original, calls = wm.torch.save, [0]

    def full(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"PK\x03\x04 part of a checkpoint")
            raise error
        return original(obj, f, *a, **k)
    monkeypatch.setattr(wm.torch, "save", full)
    run = tmp_path / "runs" / "r"
    with pytest.raises(BaseException) as e:
        wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "4", *SMALL, "--ckpt-every", "2"))
    err = capsys.readouterr().err
    assert isinstance(e.value, SystemExit) and e.value.code == 1, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].count("no space left") == 1, err
    monkeypatch.setattr(wm.torch, "save", original)
    assert torch.load(run / "ckpt" / "last.pt", weights_only=False)["step"] == 2
    assert not list(run.rglob("*.tmp"))


def test_resume_of_a_read_only_run_folder_is_one_line(tiny_root, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "r"
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1", *SMALL))
    capsys.readouterr()
    real_open = builtins.open

    def read_only(file, mode="r", *a, **k):  # the run folder on a read-only file system (root ignores chmod)
        if str(file).startswith(str(run)) and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", read_only)
    monkeypatch.setattr(io, "open", read_only)
    assert_one_line_error(capsys, ["--resume", str(run), "--iters", "2"], "--resume", str(run))


# --------------------------------------------------------------------- families 16 (stdout), 17 (the bar)
def test_stdout_closed_at_the_end_is_no_traceback(tiny_root, tmp_path):
    read, write = os.pipe()
    os.close(read)  # like `| head` that has already exited
    proc = subprocess.run([sys.executable, "wgan_mnist.py", *tiny_argv(tiny_root, tmp_path, "--iters", "2", *SMALL)],
                          cwd=Path(wm.__file__).parent, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(write)
    assert proc.returncode == 0 and "Error" not in proc.stderr, proc.stderr
    assert (tmp_path / "runs" / "r" / "progress.gif").is_file()


@pytest.mark.parametrize("budget", [None, 0.6])
def test_bar_counts_the_time_budget_when_there_is_one(tiny_root, tmp_path, monkeypatch, budget):
    import tqdm
    bars = []

    class Recorded(tqdm.tqdm):
        def close(self):
            bars.append((self.total, self.n))
            super().close()
    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    original = wm.generator_step
    monkeypatch.setattr(wm, "generator_step", lambda *a: time.sleep(0.25) or original(*a))
    wm.main(tiny_argv(tiny_root, tmp_path, "--iters", "1000" if budget else "3", *SMALL,
                      *(["--max-time", str(budget)] if budget else [])))
    total, n = bars[0]
    if budget:
        assert total == budget and 0.5 < n <= budget, bars
    else:
        assert (total, n) == (3, 3)
