"""Interleaved A/B: one batched no_grad generator forward for all critic steps of a generator step, or one each.

The generator does not change during a generator step's critic steps, so their fakes could come from one
forward of k x batch latents. Both arms below are the same bench-written wgan_mnist.py generator step (its
default nets and penalty, the script's gradient_penalty) except for where the fakes come from; they alternate
round by round in one process, so they see the same load.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batched_fakes_ab.py --rounds 20 [-- --penalty gp]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wgan_mnist as wm  # noqa: E402


def generator_step(nets, reals, args, batched):
    """k critic steps (the penalty on every --gp-every-th) and a generator step, fakes made one way or the other."""
    k, n = len(reals), reals[0].shape[0]
    if batched:
        with torch.no_grad():
            fakes = nets.generator(torch.randn(k * n, args.latent_dim)).split(n)
    for i, real in enumerate(reals):
        if batched:
            fake = fakes[i]
        else:
            with torch.no_grad():
                fake = nets.generator(torch.randn(n, args.latent_dim))
        loss = nets.critic(fake).mean() - nets.critic(real).mean()
        if args.penalty == "gp" and i % args.gp_every == 0:
            loss = loss + args.gp_lambda * args.gp_every * wm.gradient_penalty(nets.critic, real, fake)
        nets.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        nets.opt_c.step()
    wm.generator_step(nets.generator, nets.critic, nets.opt_g, args)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("flags", nargs="*", help="wgan_mnist.py flags for the nets, after --")
    opts = p.parse_args()
    args = wm.parse_args(opts.flags)
    torch.manual_seed(0)
    generator, critic = wm.Generator(args), wm.Critic(args)
    opt_g, opt_c = wm.make_optimizers(generator, critic, args)
    nets = argparse.Namespace(generator=generator, critic=critic, opt_g=opt_g, opt_c=opt_c)
    reals = [torch.rand(args.batch_size, 1, 28, 28) * 2 - 1 for _ in range(args.critic_its)]
    times = {"one forward per critic step": [], "one batched forward": []}
    for batched in (False, True):  # warm-up
        generator_step(nets, reals, args, batched)
    for _ in range(opts.rounds):
        for name, batched in zip(times, (False, True)):
            start = time.perf_counter()
            generator_step(nets, reals, args, batched)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"wgan_mnist.py {' '.join(opts.flags)}: {torch.get_num_threads()} thread(s), median of {opts.rounds} "
          "interleaved rounds per generator step: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items())
          + f"; batched / per step {med['one batched forward'] / med['one forward per critic step']:.3f}")


if __name__ == "__main__":
    main()
