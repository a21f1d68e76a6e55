"""Where a training run's time goes: torch.profiler over a script's own main() for a short budget.

Each phase of the loop is wrapped in a profiler label without touching the script: the generator's forward
with and without a graph, the critic's forward, the gradient penalty (its forward and first backward; its
double backward runs inside the critic step's backward), the critic and generator steps, the moving average,
the data batches, logging, sample grids and checkpoints. Prints the phases (total CPU seconds, share of the
run, calls) and the costliest ops, and writes both to .benchmarks/profile_<script>_<time>.txt. When the script
runs on CUDA (its --device is not cpu and a GPU is visible), CUDA activity is recorded too: each phase then
also shows the GPU time of the kernels it launched, and the ops are ranked by GPU time.

    OMP_NUM_THREADS=1 python bench/profile_loop.py wgan_mnist --seconds 60 -- --data ../shared/data --penalty gp
    OMP_NUM_THREADS=1 python bench/profile_loop.py wgan_gp_64 --seconds 60 -- --data ../shared/data/fish \\
        --image-size 32 --g-channels 32 --d-channels 32 --batch-size 16 --num-workers 0
"""
import argparse
import datetime
import functools
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def label(owner, name, text=None):
    """Wrap owner.name so that each call is one profiler range named `text`."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*a, **k):
        with record_function(text or name):
            return original(*a, **k)
    setattr(owner, name, wrapped)


def label_forward(cls, text):
    original = cls.forward

    def forward(self, *a, **k):
        with record_function(f"{text} forward" + ("" if torch.is_grad_enabled() else ", no grad")):
            return original(self, *a, **k)
    cls.forward = forward


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("script", choices=["wgan_mnist", "noise_morph", "wgan_gp_64"])
    p.add_argument("--seconds", type=float, default=60.0, help="training budget (the script's --max-time)")
    args, flags = p.parse_known_args()
    args.flags = [f for f in flags if f != "--"]  # the script's flags, after --
    module = importlib.import_module(args.script)
    label_forward(module.Generator, "generator")
    label_forward(module.Critic, "critic")
    for name in ("gradient_penalty", "critic_step", "generator_step", "save_checkpoint", "morph_step",
                 "update_ema", "compute_fid", "save_grid", "write_plots"):
        if hasattr(module, name):
            label(module, name)
    if hasattr(module.Batches if hasattr(module, "Batches") else None, "next"):
        label(module.Batches, "next", "data batches")
    if hasattr(module, "ImageFolder"):
        label(module.ImageFolder, "__getitem__", "data batches")
    if hasattr(module, "RunLog"):
        label(module.RunLog, "log", "logging")
    if hasattr(module, "Meter"):
        label(module.Meter, "record", "logging: reading the device")
    out = Path(tempfile.mkdtemp())
    argv = args.flags + ["--max-time", str(args.seconds), "--iters", str(10**9), "--out", str(out),
                         "--run-name", "profile"]
    cuda = torch.cuda.is_available() and module.parse_args(args.flags).device != "cpu"
    start = time.time()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        module.main(argv)
    wall = time.time() - start
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key in PHASES or e.key.endswith(("forward", "no grad"))),
                    key=lambda e: -e.cpu_time_total)
    lines = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.script}.py "
             f"{' '.join(args.flags)}, {args.seconds:g} s budget, {torch.get_num_threads()} thread(s), "
             f"{wall:.0f} s wall under the profiler" + (f", on {torch.cuda.get_device_name()}" if cuda else ""), "",
             f"{'phase':<34}{'total s':>9}{'share':>8}{'calls':>9}" + (f"{'GPU s':>9}" if cuda else "")]
    for e in phases:
        lines.append(f"{e.key:<34}{e.cpu_time_total / 1e6:>9.2f}{e.cpu_time_total / 1e6 / wall:>8.1%}{e.count:>9}"
                     + (f"{e.device_time_total / 1e6:>9.2f}" if cuda else ""))
    by = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines += ["", f"costliest ops (self {'GPU' if cuda else 'CPU'}):",
              events.table(sort_by=by, row_limit=12, max_name_column_width=40)]
    text = "\n".join(lines)
    print(text)
    (ROOT / ".benchmarks").mkdir(exist_ok=True)
    path = ROOT / ".benchmarks" / f"profile_{args.script}_{datetime.datetime.now():%Y%m%dT%H%M%S}.txt"
    path.write_text(text + "\n")
    print(f"(written to {path.relative_to(ROOT)})")


PHASES = {"gradient_penalty", "critic_step", "generator_step", "save_checkpoint", "morph_step", "update_ema",
          "compute_fid", "save_grid", "write_plots", "data batches", "logging",
          "logging: reading the device"}

if __name__ == "__main__":
    main()
