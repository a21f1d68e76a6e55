"""Interleaved A/B of wgan_gp_64.py's critic step on a shared machine.

pytest-benchmark times each case in its own block of rounds, so on a machine whose other jobs come and go the cases
see different loads. Here the script's step, the bench's two-pass step and the reference step run in alternating
rounds in one process, and the ratios of their medians are printed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/interleaved_ab.py [--rounds 6] [--batches 32 128]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import test_gp_step as bench  # noqa: E402
import wgan_gp_64 as w  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--size", default="--image-size 32 --g-channels 32 --d-channels 32")
    opts = p.parse_args()
    torch.set_num_threads(1)
    spec = bench.SPECS["wgan_gp_64"]
    for batch in opts.batches:
        args = w.parse_args(opts.size.split() + ["--batch-size", str(batch)])
        torch.manual_seed(0)
        generator, critic = w.Generator(args), w.Critic(args)
        opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.99))
        real = torch.rand(batch, args.channels, args.image_size, args.image_size) * 2 - 1
        steps = {
            "script": lambda: w.critic_step(generator, critic, opt, real, args),
            "two_pass": lambda: bench.custom_step(spec, w, generator, critic, opt, real, args, no_grad_gen=True,
                                                  passes=2, set_to_none=True),
            "reference": lambda: bench.custom_step(spec, w, generator, critic, opt, real, args),
        }
        times = {k: [] for k in steps}
        for step in steps.values():  # warm-up
            step()
        for _ in range(opts.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {batch}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in med.items())
              + f"; script/reference {med['script'] / med['reference']:.2f}, "
              f"script/two_pass {med['script'] / med['two_pass']:.2f} (median of {opts.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
