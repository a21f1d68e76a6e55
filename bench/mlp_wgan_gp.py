"""The common MLP WGAN-GP on MNIST: the time-to-quality benchmark's baseline (issue 12).

Written here from the description of PyTorch-GAN's `implementations/wgan_gp/wgan_gp.py` (not copied):
generator MLP 100 -> 128 -> 256 -> 512 -> 1024 -> 784, LeakyReLU(0.2) after each hidden layer, BatchNorm1d with
eps 0.8 (as that code passes it) on the 256/512/1024 layers, tanh; critic MLP 784 -> 512 -> 256 -> 1 with
LeakyReLU(0.2); Adam lr 2e-4, betas (0.5, 0.999) for both; batch 64; 5 critic steps per generator step;
lambda 10; data in [-1, 1]. Samples are drawn in train mode (that code never calls eval()), 64 at a time.

Two choices of ours make it faster than the original and change nothing else: fakes for the critic are made
under no_grad (the original backpropagates the critic loss into the generator and throws it away), and the
split lives in one tensor (no DataLoader).

    python bench/mlp_wgan_gp.py --data ../shared/data --max-time 600 --out runs/baseline

--device (auto: CUDA when present) puts the nets and the data there; --snapshot-at 75,150,300 keeps the generator
after the step that crosses each of those training seconds in snapshots/generator_<k>.pt (listed in summary.json),
with the training clock paused while it saves, so the budget trains as long as without snapshots.
"""
import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="torchvision root holding MNIST/raw")
    p.add_argument("--out", default="runs/mlp_wgan_gp", help="folder for generator.pt, summary.json, grid.png")
    p.add_argument("--max-time", type=float, default=600.0, help="seconds of training")
    p.add_argument("--iters", type=int, default=10**9, help="generator steps (the time budget usually ends first)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--snapshot-at", type=seconds_list, default=[],
                   help="training seconds (comma-separated) at which to keep the generator in snapshots/, saved "
                        "off the training clock (the time-to-quality bench's learning curve)")
    return p


def seconds_list(text):
    return sorted(float(s) for s in text.split(",") if s.strip())


class Clock:
    """Training seconds: wall time since the start less the time spent off the clock (saving snapshots)."""

    def __init__(self, now=time.perf_counter):
        self.now, self.start, self.paused = now, now(), 0.0

    def seconds(self):
        return self.now() - self.start - self.paused

    @contextlib.contextmanager
    def off(self):
        t = self.now()
        try:
            yield
        finally:
            self.paused += self.now() - t


def synchronize(device):
    """On CUDA the steps queued so far are training time: wait for them before reading or pausing the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LATENT, BATCH, N_CRITIC, LAMBDA, LR, BETAS = 100, 64, 5, 10.0, 2e-4, (0.5, 0.999)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()

        def block(n_in, n_out, normalize=True):
            return [nn.Linear(n_in, n_out)] + ([nn.BatchNorm1d(n_out, 0.8)] if normalize else []) + [
                nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*block(LATENT, 128, normalize=False), *block(128, 256), *block(256, 512),
                                 *block(512, 1024), nn.Linear(1024, 784), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, 1, 28, 28)


class Critic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256),
                                 nn.LeakyReLU(0.2), nn.Linear(256, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def gradient_penalty(critic, real, fake):
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (real + alpha * (fake - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


@torch.no_grad()
def sample(generator, n, seed=0):
    """n images in [-1, 1], drawn in train mode 64 at a time as the original samples them."""
    g, device = torch.Generator().manual_seed(seed), next(generator.parameters()).device
    generator.train()
    return torch.cat([generator(torch.randn(min(BATCH, n - i), LATENT, generator=g).to(device)).cpu()
                      for i in range(0, n, BATCH)])


def load_generator(path):
    """The generator of a run folder (its generator.pt) or of one saved file (a snapshot)."""
    path = Path(path) / "generator.pt" if Path(path).is_dir() else Path(path)
    generator = Generator()
    generator.load_state_dict(torch.load(path, map_location="cpu"))
    return generator


def save_snapshot(generator, out, index, steps, seconds):
    path = out / "snapshots" / f"generator_{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(generator.state_dict(), path)
    return {"file": str(path.relative_to(out)), "generator_steps": steps, "seconds": seconds}


def main(argv=None):
    from torchvision.datasets import MNIST
    from torchvision.utils import save_image
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    torch.manual_seed(args.seed)
    images = MNIST(args.data, train=True).data.unsqueeze(1).float().div(127.5).sub(1).to(device)
    generator, critic = Generator().to(device), Critic().to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=LR, betas=BETAS)
    opt_c = torch.optim.Adam(critic.parameters(), lr=LR, betas=BETAS)
    order, pos, steps, snapshots, due = torch.randperm(len(images)), 0, 0, [], list(args.snapshot_at)
    out = Path(args.out)
    clock = Clock()
    while steps < args.iters and clock.seconds() < args.max_time:
        for _ in range(N_CRITIC):
            if pos + BATCH > len(order):
                order, pos = torch.randperm(len(images)), 0
            real, pos = images[order[pos:pos + BATCH].to(device)], pos + BATCH
            with torch.no_grad():
                fake = generator(torch.randn(BATCH, LATENT, device=device))
            loss = critic(fake).mean() - critic(real).mean() + LAMBDA * gradient_penalty(critic, real, fake)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
        critic.requires_grad_(False)
        loss_g = -critic(generator(torch.randn(BATCH, LATENT, device=device))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        critic.requires_grad_(True)
        steps += 1
        if due and clock.seconds() >= due[0]:  # after the step that crosses the moment, as --max-time stops
            synchronize(device)
            with clock.off():
                snapshots.append(save_snapshot(generator, out, len(snapshots), steps, clock.seconds()))
            due = [t for t in due if t > clock.seconds()]
    synchronize(device)
    seconds = clock.seconds()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(generator.state_dict(), out / "generator.pt")
    save_image(sample(generator, 64) * 0.5 + 0.5, out / "grid.png", nrow=8)
    summary = {"generator_steps": steps, "seconds": seconds, "loss_critic": loss.item(), "loss_gen": loss_g.item(),
               "device": str(device), "snapshots": snapshots}
    (out / "summary.json").write_text(json.dumps(summary))
    print(f"mlp_wgan_gp: {steps} generator steps in {seconds:.0f} s; {out}")
    return summary


if __name__ == "__main__":
    main()
