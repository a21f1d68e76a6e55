"""Steps per second of wgan_gp_64.py's training step at the last size of the CPU recipe (bf16), nets contiguous
(forced) against channels_last, and the recipe with --gp-every 8; interleaved round by round in one process on one
thread, random images for data; then one critic step of both layouts from the same weights and batch, compared.
Written when the script's nets were contiguous on a CPU; they are channels_last now.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/channels_last_speed.py            # the CPU recipe with --amp
    OMP_NUM_THREADS=1 .venv/bin/python experiments/channels_last_speed.py <flags>    # any flags instead
"""
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wgan_gp_64 as w  # noqa: E402

R = " ".join(sys.argv[1:]) or w.CPU_RECIPE.replace("--max-time 2h", "--amp")

def nets_in(flags, cl):
    """The script's nets for these flags (seeded: the same weights in both layouts) at their last size."""
    args = w.parse_args(["--data", "."] + shlex.split(flags))
    nets = w.build_nets(args, torch.device("cpu"))
    nets.memory = torch.channels_last if cl else torch.contiguous_format
    for m in (nets.generator, nets.critic):
        m.to(memory_format=nets.memory)
    w.set_growth(nets, args.image_size, 1.0)
    return args, nets


def stepper(flags, cl=True):
    args, nets = nets_in(flags, cl)
    images = torch.rand(64, args.channels, args.image_size, args.image_size) * 2 - 1
    batches = iter(lambda: images[torch.randint(0, 64, (args.batch_size,))], None)
    done = [args.iters - 1]
    def step():
        done[0] += 1
        w.train_step(nets, batches, done[0], args.lr, args, torch.device("cpu"))
    return step

torch.set_num_threads(1)
arms = {"recipe": stepper(R, cl=False), "channels_last": stepper(R), "gp-every 8": stepper(R + " --gp-every 8", cl=False)}
rates = {k: [] for k in arms}
for r in range(6):
    for k, s in arms.items():
        t = time.perf_counter()
        for _ in range(16):
            s()
        if r:
            rates[k].append(16 / (time.perf_counter() - t))
base = statistics.median(rates["recipe"])
for k, v in rates.items():
    print(f"{k}: {statistics.median(v):.2f} steps/s ({statistics.median(v) / base:.2f}x)  rounds {[round(x, 2) for x in v]}")


def critic_step(flags, cl):
    args, nets = nets_in(flags, cl)
    real = (torch.rand(args.batch_size, args.channels, args.image_size, args.image_size,
                       generator=torch.Generator().manual_seed(0)) * 2 - 1).contiguous(memory_format=nets.memory)
    torch.manual_seed(1)
    losses = w.critic_step(nets.generator, nets.critic, nets.opt_d, real, args, penalize=True)
    return losses, torch.cat([p.grad.flatten() for p in nets.critic.parameters() if p.grad is not None])


(l0, g0), (l1, g1) = critic_step(R, False), critic_step(R, True)
print("one critic step, contiguous vs channels_last:", {k: (round(float(l0[k]), 5), round(float(l1[k]), 5)) for k in l0},
      f"critic gradient relative difference {float((g0 - g1).norm() / g0.norm()):.2e}")
