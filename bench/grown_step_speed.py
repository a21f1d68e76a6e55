"""Steps per second of wgan_gp_64.py's whole training step (critic steps, generator step, EMA) at the last
resolution of a grown net, for two sets of flags, interleaved round by round in one process on one thread so that
both see the same load. Random images stand in for the data (the step's cost does not depend on them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/grown_step_speed.py --a "<flags>" --b "<flags> --slim-above 32"
    OMP_NUM_THREADS=1 .venv/bin/python bench/grown_step_speed.py --a "<flags> --amp" --b "<flags> --amp --slim-above 32"
"""
import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wgan_gp_64 as w  # noqa: E402

RECIPE = w.CPU_RECIPE.replace("--max-time 2h", "")


def stepper(flags):
    args = w.parse_args(["--data", "."] + shlex.split(flags))
    nets = w.build_nets(args, torch.device("cpu"))
    w.set_growth(nets, args.image_size, 1.0)
    images = torch.rand(64, args.channels, args.image_size, args.image_size) * 2 - 1
    batches = iter(lambda: images[torch.randint(0, 64, (args.batch_size,))], None)
    done = [args.iters - 1]  # the EMA's warm-up is read at the step's stage: the last one

    def step():
        done[0] += 1
        w.train_step(nets, batches, done[0], args.lr, args, torch.device("cpu"))
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", default=RECIPE + " --slim-above 0")  # later flags win: the recipe at full width
    p.add_argument("--b", default=RECIPE)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    opts = p.parse_args()
    torch.set_num_threads(1)
    arms = {"a": stepper(opts.a), "b": stepper(opts.b)}
    rates = {k: [] for k in arms}
    for r in range(opts.rounds + 1):  # round 0 warms up
        for name, step in arms.items():
            t = time.perf_counter()
            for _ in range(opts.steps):
                step()
            if r:
                rates[name].append(opts.steps / (time.perf_counter() - t))
    a, b = (statistics.median(rates[k]) for k in arms)
    print(f"a: {a:.2f} steps/s  ({opts.a})\nb: {b:.2f} steps/s  ({opts.b})\nb / a: {b / a:.2f}")


if __name__ == "__main__":
    main()
