"""Interleaved A/B of one wgan_mnist.py generator step (its critic steps and its generator update) on a CPU.

Arms, alternating round by round in one process so that they see the same load:
  contiguous      the script's train_step, nets in the default memory format
  channels_last   the same train_step with both nets in channels_last (what main() does for dcgan nets)
  batched fakes   a bench-written step identical to train_step but for one batched no_grad generator forward
                  making the fakes of all k critic steps at once (the generator does not change during them)

    OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_step_ab.py --rounds 40 -- --penalty gp --data ../shared/data
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wgan_mnist as wm  # noqa: E402


def batched_train_step(nets, batches, count, args):
    """train_step with the k critic steps' fakes from one generator forward."""
    k = wm.critic_iters_for(count["step"], args)
    with torch.no_grad():
        fakes = nets.generator(torch.randn(k * args.batch_size, args.latent_dim)).split(args.batch_size)
    for fake in fakes:
        real = batches.next()
        loss = nets.critic(fake).mean() - nets.critic(real).mean()
        if args.penalty == "gp" and count["critic_steps"] % args.gp_every == 0:
            loss = loss + args.gp_lambda * args.gp_every * wm.gradient_penalty(nets.critic, real, fake)
        nets.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        nets.opt_c.step()
        if args.penalty == "clip":
            with torch.no_grad():
                for p in nets.critic.parameters():
                    p.clamp_(-args.clip_value, args.clip_value)
        count["critic_steps"] += 1
    wm.generator_step(nets.generator, nets.critic, nets.opt_g, args)
    count["step"] += 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    opts, flags = p.parse_known_args()
    args = wm.parse_args([f for f in flags if f != "--"])
    images = wm.load_split(args, train=True)

    def setup(channels_last):
        torch.manual_seed(0)
        generator, critic = wm.Generator(args), wm.Critic(args)
        if channels_last:
            generator, critic = (m.to(memory_format=torch.channels_last) for m in (generator, critic))
        opt_g, opt_c = wm.make_optimizers(generator, critic, args)
        nets = argparse.Namespace(generator=generator, critic=critic, ema=None, opt_g=opt_g, opt_c=opt_c)
        return nets, wm.Batches(images, args.batch_size, args.seed), {"step": 0, "critic_steps": 0}

    arms = {"contiguous": (wm.train_step, setup(False)), "channels_last": (wm.train_step, setup(True)),
            "batched fakes": (batched_train_step, setup(False))}
    times = {name: [] for name in arms}
    for step, state in arms.values():  # warm-up
        step(*state, args)
    for _ in range(opts.rounds):
        for name, (step, state) in arms.items():
            start = time.perf_counter()
            step(*state, args)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["contiguous"]
    print(f"wgan_mnist.py {' '.join(flags)}: {torch.get_num_threads()} thread(s), median ms per generator step "
          f"over {opts.rounds} interleaved rounds: " + ", ".join(f"{k} {1000 * v:.1f} ({v / base:.2f}x)"
                                                                 for k, v in med.items()))


if __name__ == "__main__":
    main()
