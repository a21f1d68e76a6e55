"""Shared fixtures: where the real data and Inception weights live, and a tiny CPU budget per test.

Real data is looked up in $WGAN_SHARED (default: ../shared beside the checkout). Tests that need it
are skipped when it is absent; tests that can make their own tiny data do so.
"""
import os
import re
import signal
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WGAN_SHARED", ROOT.parent / "shared"))
FID_WEIGHTS = SHARED / "models" / "weights-inception-2015-12-05-6726825d.pth"

torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI cores are shared


@pytest.fixture
def shared_dir():
    return SHARED


@pytest.fixture
def mnist_root():
    root = SHARED / "data"
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {root}")
    return root


@pytest.fixture
def fish_dir():
    path = SHARED / "data" / "fish"
    return path if path.is_dir() else None


@pytest.fixture
def fid_weights():
    if not FID_WEIGHTS.exists():
        pytest.skip(f"Inception weights not found at {FID_WEIGHTS}")
    return FID_WEIGHTS


def signal_once_started(proc, sig, last=signal.SIGHUP, timeout=60.0):
    """Send sig to a script's subprocess once the script has set its start-up handlers (/proc shows `last`, the
    one it sets last, caught), so the signal lands in its imports. A fixed sleep did not: on a fresh machine the
    interpreter had not reached the script a second in, and a signal there kills it before any script runs.
    Without /proc (not Linux), a second's sleep."""
    import time
    status, deadline = Path(f"/proc/{proc.pid}/status"), time.monotonic() + timeout
    if not status.exists():
        time.sleep(1.0)
    while status.exists() and proc.poll() is None and time.monotonic() < deadline:
        try:
            caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status.read_text(), re.M)
        except OSError:  # it ended meanwhile
            break
        if caught and int(caught.group(1), 16) >> (last - 1) & 1:
            break
        time.sleep(0.005)
    proc.send_signal(sig)


def check_max_time(module, argv, run_dir, step_key, capsys, monkeypatch, budget=2.0, step_s=0.3):
    """--max-time on a script: on a clock of its own that moves step_s seconds per generator step (a real sleep let
    a loaded machine stretch one step past the budget, now and then), main(argv + --max-time) ends after exactly
    the step that crosses the budget, as at --iters (final checkpoint and grid, summary line), and a resume gets
    a new budget counted from the resume. Returns the number of steps the first run made."""
    import json
    import math
    import time

    class Clock:  # the script's `time` module, but for time(), which moves only with the steps
        def __init__(self):
            self.now = time.time()

        def time(self):
            return self.now

        def __getattr__(self, name):
            return getattr(time, name)

    clock, original = Clock(), module.generator_step

    def slow(*a, **k):
        clock.now += step_s
        return original(*a, **k)

    monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(module, "generator_step", slow)
    module.main(argv + ["--max-time", f"{budget:g}s", "--iters", "1000", "--log-every", "1"])
    assert f"stopped on time (--max-time {budget:g} s)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "seconds" in r]
    assert rows[-1]["seconds"] >= budget > rows[-2]["seconds"], rows  # stopped after the crossing step
    steps = rows[-1]["iter"]
    assert steps == math.ceil(budget / step_s), rows
    ckpt = torch.load(run_dir / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt[step_key] == steps
    assert (run_dir / "samples" / f"iter_{steps:06d}.png").is_file()
    module.main(["--resume", str(run_dir), "--max-time", f"{budget:g}"])
    again = torch.load(run_dir / "ckpt" / "last.pt", map_location="cpu", weights_only=False)[step_key]
    assert again == 2 * steps, (steps, again)  # the budget restarts at the resume
    return steps
