"""noise_morph.py under faults: signals at every moment, copied or busy run folders, changed flags on resume,
full or read-only disks, corrupted MNIST files and caches, a closed stdout, and the CUDA-only bookkeeping
(issues 25 and 26), all on a CPU with tiny models."""
import errno
import fcntl
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import noise_morph as nm
from conftest import signal_once_started

TINY = ["--width", "8", "--morph-width", "8", "--batch-size", "16", "--eval-samples", "50", "--critic-its", "1",
        "--morph-its", "1", "--device", "cpu"]
MNIST = ["--dataset", "mnist", "--width", "2", "--latent-dim", "4", "--batch-size", "4", "--eval-samples", "8"]
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, *argv):
    return nm.main(TINY + ["--out", str(tmp_path), "--sample-every", "0"] + list(argv))


def refused(capsys, argv, code=2):
    """main(argv) exits with `code`; returns its one line on stderr (the progress bar's lines left out)."""
    with pytest.raises(SystemExit) as e:
        try:
            nm.main(argv)
        except KeyboardInterrupt:  # would end the pytest session: a failure of this test instead
            pytest.fail("KeyboardInterrupt escaped main")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith(nm.SCRIPT)]
    assert e.value.code == code and len(lines) == 1, (e.value.code, lines)
    return lines[0]


def idx_files(root, n_train=32, n_test=12, side=28):
    """A tiny MNIST in torchvision's raw layout: random images, labels 0."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        pixels = np.random.RandomState(n).randint(0, 256, (n, side, side)).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, side, side) + pixels.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + bytes(n))
    return raw


class Unhandled(Exception):
    pass


@pytest.fixture
def no_default_kill():
    """SIGTERM and SIGHUP raise Unhandled unless the script installs its own handler (their default would kill
    pytest itself); SIGINT's default already raises KeyboardInterrupt."""
    def unhandled(signum, frame):
        raise Unhandled(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, unhandled) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# ---------------------------------------------------------------- issue 25: the CUDA path's bookkeeping

@pytest.fixture
def fake_cuda(monkeypatch):
    """Three visible GPUs; torch.cuda's per-device RNG calls recorded (set_rng_state_all goes through them)."""
    calls = []
    count = 3

    def get_state(device="cuda"):
        index = torch.device(device).index or 0
        assert index < count
        calls.append(("get", index))
        return torch.full((4,), index, dtype=torch.uint8)

    def set_state(state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= count:
            raise IndexError(f"no cuda:{index}")
        calls.append(("set", index, int(state[0])))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "get_rng_state", get_state)
        monkeypatch.setattr(module, "set_rng_state", set_state)
    return calls


def test_cuda_rng_state_is_the_device_in_use_and_any_saved_list_resumes(fake_cuda):
    device = torch.device("cuda", 0)
    state = nm.rng_state(device)
    assert fake_cuda == [("get", 0)] and torch.equal(state["cuda"], torch.zeros(4, dtype=torch.uint8))
    cpu = nm.rng_state(torch.device("cpu"))
    for saved, expected in ((state["cuda"], [("set", 0, 0)]),  # this script's own
                            ([torch.full((4,), 7, dtype=torch.uint8)], [("set", 0, 7)]),  # a list, one GPU
                            ([torch.full((4,), k, dtype=torch.uint8) for k in (5, 1, 2, 3, 4, 6, 8, 9)],
                             [("set", 0, 5)]),  # saved where 8 were visible
                            ([], []), (None, [])):  # saved on a CPU
        fake_cuda.clear()
        nm.set_rng_state({**cpu, "cuda": saved}, device)
        assert fake_cuda == expected, (saved, fake_cuda)


def test_optimizer_fused_and_foreach_follow_the_device_not_the_checkpoint(tmp_path):
    args = nm.parse_args(TINY)
    nets = nm.build_nets(args, torch.device("cpu"))
    built = [(g["fused"], g["foreach"]) for o in nets.opts for g in o.param_groups]
    ckpt = {"models": [(m.state_dict(), o.state_dict()) for m, o in zip(nets.modules, nets.opts)], "iter": 3,
            "history": [], "rng": nm.rng_state(torch.device("cpu"))}
    for _, o_state in ckpt["models"]:  # as written by a run on CUDA with fused Adam
        for g in o_state["param_groups"]:
            g.update(fused=True, foreach=False)
    nm.restore(ckpt, nets, args)
    assert [(g["fused"], g["foreach"]) for o in nets.opts for g in o.param_groups] == built
    fused = [torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=True) for m in nets.modules]
    nets.opts[:] = fused  # the reverse: a CPU checkpoint into a fused optimizer
    ckpt["models"] = [(m.state_dict(), o.state_dict()) for m, o in zip(nets.modules, nm.build_nets(args, "cpu").opts)]
    nm.restore(ckpt, nets, args)
    assert all(g["fused"] is True for o in nets.opts for g in o.param_groups)


def test_fid_cache_is_keyed_by_device_and_a_bad_cache_is_recomputed(tmp_path, monkeypatch):
    args = nm.parse_args(TINY + MNIST + ["--fid-samples", "10"])
    generator = nm.Generator(args).eval()
    test_images = torch.rand(12, 1, 28, 28) * 2 - 1
    calls = []

    def features(net, images, device):
        calls.append((len(images), device.type))
        return torch.from_numpy(np.random.RandomState(len(calls)).randn(len(images), 6)).float()

    def fid(device):
        return nm.compute_fid(None, generator, test_images, args, torch.device(device), str(tmp_path))

    monkeypatch.setattr(nm, "inception_features", features)
    fid("cpu")
    fid("cpu")
    assert len(calls) == 3  # the second reused the real features
    fid("cuda")
    assert calls[-1] == (10, "cuda") and len(calls) == 5  # not the CPU's cache
    (cache,) = [p for p in (tmp_path / ".fid_cache").iterdir() if "cpu" in p.name]
    cache.write_bytes(cache.read_bytes()[:50])  # truncated by a kill
    calls.clear()
    assert fid("cpu")["fid"] >= 0 and len(calls) == 2
    assert torch.load(cache).shape == (10, 6)  # rewritten
    assert not [p for p in (tmp_path / ".fid_cache").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- issue 26, families 2, 3, 16: signals

SIGS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def code_of(sig):
    return 130 if sig == signal.SIGINT else 143


def send_at(monkeypatch, name, *sigs, call=1):
    """Send `sigs` (one each, in turn) to this process at the call-th call of nm.<name>."""
    real, calls = getattr(nm, name), []

    def hooked(*a, **k):
        calls.append(1)
        if len(calls) == call:
            for sig in sigs:
                os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(nm, name, hooked)


@pytest.mark.parametrize("sig", SIGS, ids=lambda s: s.name)
@pytest.mark.parametrize("moment", ["start-up", "training", "figures", "checkpoint", "twice"])
def test_every_signal_at_every_moment_is_one_line_and_its_code(tmp_path, monkeypatch, capsys, no_default_kill,
                                                                 sig, moment):
    argv = TINY + ["--out", str(tmp_path), "--run-name", "s", "--iters", "3", "--sample-every", "3"]
    hook = {"start-up": ("build_nets",), "training": ("morph_step", sig), "figures": ("write_plots", sig),
            "checkpoint": ("save_checkpoint", sig), "twice": ("morph_step", sig, sig)}[moment]
    name, *more = hook
    send_at(monkeypatch, name, *(more or [sig]), call=2 if moment == "training" else 1)
    if moment == "twice":  # and a third while it leaves
        close = nm.RunLog.close
        monkeypatch.setattr(nm.RunLog, "close", lambda self: os.kill(os.getpid(), sig) or close(self))
    line = refused(capsys, argv, code_of(sig))
    assert signal.Signals(sig).name in line, line
    ckpt = tmp_path / "s" / "ckpt" / "last.pt"
    if moment == "start-up":
        assert "start-up" in line and not ckpt.exists()
    elif moment == "twice":  # out at once, mid-step (a third is ignored): the checkpoint (none yet) is not touched
        assert "second signal" in line and not ckpt.exists()
    else:  # after the step: a checkpoint of it, the figures complete
        assert torch.load(ckpt, weights_only=False)["iter"] == {"training": 2}.get(moment, 3)
        assert not list((tmp_path / "s").rglob("*.tmp"))
    assert not any(p.stat().st_size == 0 for p in (tmp_path / "s").rglob("*")
                   if p.is_file() and p.name not in (".lock", "metrics.jsonl"))  # the two may be empty


def test_the_first_signal_decides_the_code(tmp_path, monkeypatch, capsys, no_default_kill):
    for first, second in ((signal.SIGTERM, signal.SIGINT), (signal.SIGHUP, signal.SIGINT),
                          (signal.SIGINT, signal.SIGTERM)):
        send_at(monkeypatch, "morph_step", first, second)
        refused(capsys, TINY + ["--out", str(tmp_path), "--iters", "3", "--sample-every", "0",
                                "--run-name", first.name], code_of(first))
        monkeypatch.undo()


def test_a_signal_while_torch_loads_is_one_line(tmp_path):
    """Subprocesses (the import is the moment): all three at once, so the test costs one start. `--help` exits 0
    once the imports are done, so a signal that came too late shows as a 0, not as a training run's stop."""
    procs = {sig: subprocess.Popen([sys.executable, str(ROOT / "noise_morph.py"), "--help"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, cwd=tmp_path) for sig in SIGS}
    for sig, p in procs.items():
        signal_once_started(p, sig)
    landed = 0
    for sig, p in procs.items():
        err = p.communicate(timeout=60)[1]
        if p.returncode == 0:
            continue
        landed += 1
        assert p.returncode == code_of(sig) and len(err.strip().splitlines()) == 1, (sig, p.returncode, err)
        assert "Traceback" not in err and sig.name in err, err
    if not landed:
        pytest.skip("the imports finished before any signal")


# ---------------------------------------------------------------- families 4 to 8: the run folder

def test_a_copied_checkpoint_is_refused_and_nothing_outside_is_touched(tmp_path, capsys):
    run_dir = Path(run(tmp_path, "--iters", "2", "--run-name", "r"))
    backups = tmp_path / "backups"
    backups.mkdir()
    shutil.copy(run_dir / "ckpt" / "last.pt", backups / "step2.pt")
    (tmp_path / "metrics.jsonl").write_text("unrelated\n")
    line = refused(capsys, ["--resume", str(backups / "step2.pt"), "--iters", "3"])
    assert "not a run folder's checkpoint" in line and "ckpt/last.pt" in line
    assert (tmp_path / "metrics.jsonl").read_text() == "unrelated\n" and sorted(os.listdir(backups)) == ["step2.pt"]
    shutil.copy(run_dir / "ckpt" / "last.pt", run_dir / "ckpt" / "step2.pt")  # inside <run>/ckpt/: that run's
    assert nm.main(["--resume", str(run_dir / "ckpt" / "step2.pt"), "--iters", "3"]) == str(run_dir)
    assert torch.load(run_dir / "ckpt" / "last.pt", weights_only=False)["iter"] == 3


def test_a_run_folder_in_use_is_refused(tmp_path, capsys, monkeypatch):
    run_dir = run(tmp_path, "--iters", "1", "--run-name", "r")
    with open(os.path.join(run_dir, ".lock"), "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's lock (flock: per open file)
        assert "in use by another process" in refused(capsys, ["--resume", run_dir, "--iters", "2"])
    real, held = nm.train_step, []

    def probe(*a, **k):  # during the run, a second opener is locked out
        with open(os.path.join(run_dir, ".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(1)
        return real(*a, **k)

    monkeypatch.setattr(nm, "train_step", probe)
    nm.main(["--resume", run_dir, "--iters", "2"])
    assert held == [1]


def test_metrics_cut_back_to_the_checkpoint_on_resume(tmp_path):
    run_dir = run(tmp_path, "--iters", "2", "--log-every", "1", "--run-name", "r")
    with open(f"{run_dir}/metrics.jsonl", "a") as f:  # logged after the checkpoint, then kill -9
        f.write(json.dumps({"iter": 3}) + "\n" + json.dumps({"iter": 4}) + "\n")
    nm.main(["--resume", run_dir, "--iters", "4"])
    assert [json.loads(x)["iter"] for x in open(f"{run_dir}/metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("flag, value, saved", [("--width", "16", "8"), ("--latent-dim", "3", "2"),
                                                ("--morph-width", "4", "8"), ("--dataset", "mnist", "8gaussians")])
def test_network_flags_changed_on_resume_are_refused(tmp_path, capsys, flag, value, saved):
    run_dir = run(tmp_path, "--iters", "1", "--run-name", "r")
    before = open(f"{run_dir}/metrics.jsonl").read()
    line = refused(capsys, ["--resume", run_dir, flag, value, "--data", str(tmp_path)])
    assert flag in line and value in line and saved in line, line
    assert open(f"{run_dir}/metrics.jsonl").read() == before


def test_every_file_a_run_writes_goes_through_a_rename(tmp_path, monkeypatch):
    renamed, real = set(), os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.add(os.path.abspath(dst)) or real(src, dst))
    idx_files(tmp_path / "data")
    for argv in (["--run-name", "toy", "--iters", "2", "--sample-every", "1"],
                 [*MNIST, "--data", str(tmp_path / "data"), "--run-name", "mnist", "--iters", "2",
                  "--sample-every", "1"]):
        run_dir = nm.main(TINY + ["--out", str(tmp_path)] + argv)
        nm.main(["--resume", run_dir, "--iters", "3"])
        written = {str(p) for p in Path(run_dir).rglob("*") if p.is_file() and p.name != ".lock"
                   and not p.name.startswith("events.out.tfevents")}
        assert written - renamed == set() and os.path.join(run_dir, "metrics.jsonl") in renamed


# ---------------------------------------------------------------- families 9 to 11, 13, 14: one line

@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_seed_out_of_numpys_range_is_refused(tmp_path, capsys, seed):
    assert "--seed" in refused(capsys, TINY + ["--out", str(tmp_path), "--seed", seed])
    nm.setup(nm.parse_args(TINY + ["--seed", str(2 ** 32 - 1)]))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/3: file write failed")])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, capsys, monkeypatch, error):
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    line = refused(capsys, TINY + ["--out", str(tmp_path), "--run-name", "r", "--iters", "4", "--ckpt-every", "2",
                                   "--sample-every", "0"], code=1)
    assert "no space left" in line
    ckpt = tmp_path / "r" / "ckpt"
    assert os.listdir(ckpt) == ["last.pt"] and torch.load(ckpt / "last.pt", weights_only=False)["iter"] == 2


def test_resume_on_a_read_only_file_system_is_one_line(tmp_path, capsys, monkeypatch):
    run_dir = run(tmp_path, "--iters", "1", "--run-name", "r")
    before = sorted(os.listdir(run_dir))

    def read_only(path, mode="r", *a, **k):  # root ignores chmod: the file system's answer instead
        if str(path).startswith(run_dir) and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *a, **k)

    monkeypatch.setattr(nm, "open", read_only, raising=False)
    assert "read-only" in refused(capsys, ["--resume", run_dir, "--iters", "2"]).lower()
    assert sorted(os.listdir(run_dir)) == before


def test_fid_samples_above_the_test_split_are_refused_at_start(tmp_path, capsys, monkeypatch):
    idx_files(tmp_path, n_test=12)
    monkeypatch.setattr(nm, "load_inception", lambda args, device: None)
    line = refused(capsys, TINY + MNIST + ["--data", str(tmp_path), "--out", str(tmp_path), "--fid-every", "1",
                                           "--fid-samples", "20", "--run-name", "f"])
    assert "--fid-samples" in line and "12" in line and not (tmp_path / "f" / "ckpt" / "last.pt").exists()


def corrupt(raw, case):
    images = raw / "train-images-idx3-ubyte"
    data = images.read_bytes()
    {"wrong magic": lambda: images.write_bytes(b"\x00\x00\x09\x99" + data[4:]),
     "gzipped": lambda: images.write_bytes(gzip.compress(data)),
     "zero-byte": lambda: images.write_bytes(b""),
     "truncated": lambda: images.write_bytes(data[:len(data) // 2]),
     "header only": lambda: images.write_bytes(data[:16]),
     "labels zero-byte": lambda: (raw / "train-labels-idx1-ubyte").write_bytes(b""),
     "labels truncated": lambda: (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x20"),
     "32x32": lambda: idx_files(raw.parents[1], side=32),
     "28x20": lambda: images.write_bytes(struct.pack(">IIII", 0x803, 32, 28, 20) + data[16:16 + 32 * 28 * 20])}[case]()


@pytest.mark.parametrize("case", ["wrong magic", "gzipped", "zero-byte", "truncated", "header only",
                                  "labels zero-byte", "labels truncated", "32x32", "28x20"])
def test_corrupted_mnist_files_are_one_line(tmp_path, capsys, case):
    corrupt(idx_files(tmp_path), case)
    line = refused(capsys, TINY + MNIST + ["--data", str(tmp_path), "--out", str(tmp_path), "--iters", "1"])
    assert "--data" in line and "MNIST" in line and "not found" not in line, line
    if "x" in case:
        assert "28x28" in line, line


# ---------------------------------------------------------------- families 16, 17: output

def test_a_closed_stdout_finishes_the_run_quietly(tmp_path, monkeypatch):
    read, write = os.pipe()
    os.close(read)  # `| head` has exited
    out = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", out)
    run_dir = run(tmp_path, "--iters", "2", "--run-name", "p")
    monkeypatch.undo()
    out.close()
    assert torch.load(f"{run_dir}/ckpt/last.pt", weights_only=False)["iter"] == 2


def test_the_bar_counts_the_time_budget_under_max_time(tmp_path, monkeypatch):
    import tqdm
    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    run(tmp_path, "--iters", "100000", "--max-time", "0.5s", "--run-name", "t")
    run(tmp_path, "--iters", "3", "--run-name", "i")
    (timed, counted) = bars
    assert timed.total == 0.5 and timed.unit == "s" and 0.5 <= timed.n < 5, (timed.total, timed.n)
    assert counted.total == 3 and counted.n == 3
