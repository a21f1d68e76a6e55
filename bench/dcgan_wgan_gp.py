"""A plain DCGAN WGAN-GP on a folder of images: the fish benchmark's baseline (issue 13), from seed 002's design.

Written here from that description (not copied): critic of stride-2 4x4 convs with 64 feature maps doubling at
each halving, LeakyReLU 0.2, no BatchNorm, a last 4x4 conv to one number; generator of transposed 4x4 convs from
a 1x1 latent, with BatchNorm and ReLU, tanh; seed 002's YAML settings: latent 256, Adam lr 2e-4, beta1 0.5 (beta2
left at torch's 0.999), batch 16, 5 critic steps per generator step, lambda 10. Images are resized (short side)
and centre-cropped to --image-size, in [-1, 1], no augmentation; they are decoded once and kept in memory.

    python bench/dcgan_wgan_gp.py --data ../shared/data/fish --image-size 32 --max-time 600 --out runs/dcgan

--device (auto: CUDA when present) puts the nets and the data there; --snapshot-at 75,150,300 keeps the generator
after the step that crosses each of those training seconds in snapshots/generator_<k>.pt (listed in summary.json),
with the training clock paused while it saves, so the budget trains as long as without snapshots.
"""
import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

LATENT, BATCH, N_CRITIC, LAMBDA, LR, BETAS, FEATURES = 256, 16, 5, 10.0, 2e-4, (0.5, 0.999), 64
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--image-size", type=int, default=32, choices=[32, 64, 128], help="training resolution")
    p.add_argument("--out", default="runs/dcgan_wgan_gp", help="folder for generator.pt, summary.json, grid.png")
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


class Generator(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        doublings = int(math.log2(image_size)) - 3  # 4x4 -> image_size
        c = FEATURES * 2 ** doublings
        layers = [nn.ConvTranspose2d(LATENT, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU()]  # 4x4
        for _ in range(doublings):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(c, 3, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.net(z.view(-1, LATENT, 1, 1))


class Critic(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        layers, c_in, c, size = [], 3, FEATURES, image_size
        while size > 4:
            layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
            c_in, c, size = c, c * 2, size // 2
        self.net = nn.Sequential(*layers, nn.Conv2d(c_in, 1, 4, 1, 0, bias=False))

    def forward(self, x):
        return self.net(x).flatten()


def gradient_penalty(critic, real, fake):
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (real + alpha * (fake - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def load_folder(folder, size):
    """Every readable image under folder, short side resized to size and centre-cropped: uint8 [N, 3, s, s]."""
    images = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES):
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")  # upright, as the script loads it
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                images.append(np.asarray(im.crop((left, top, left + size, top + size))))
        except OSError:
            pass
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def sample(generator, n, seed=0):
    """n images in [-1, 1] from the generator in eval mode (BatchNorm running statistics)."""
    g, device = torch.Generator().manual_seed(seed), next(generator.parameters()).device
    generator.eval()
    return torch.cat([generator(torch.randn(min(256, n - i), LATENT, generator=g).to(device)).cpu()
                      for i in range(0, n, 256)])


def load_generator(path):
    """The generator of a run folder (its generator.pt) or of one saved file (a snapshot)."""
    saved = torch.load(Path(path) / "generator.pt" if Path(path).is_dir() else path, map_location="cpu")
    generator = Generator(saved["image_size"])
    generator.load_state_dict(saved["state"])
    return generator


def save_snapshot(generator, image_size, out, index, steps, seconds):
    path = out / "snapshots" / f"generator_{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": generator.state_dict(), "image_size": image_size}, path)
    return {"file": str(path.relative_to(out)), "generator_steps": steps, "seconds": seconds}


def main(argv=None):
    from torchvision.utils import save_image
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    torch.manual_seed(args.seed)
    images = load_folder(args.data, args.image_size).to(device)
    generator, critic = Generator(args.image_size).to(device), Critic(args.image_size).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=LR, betas=BETAS)
    opt_c = torch.optim.Adam(critic.parameters(), lr=LR, betas=BETAS)
    order, pos, steps, snapshots, due = torch.randperm(len(images)), 0, 0, [], list(args.snapshot_at)
    out = Path(args.out)
    clock = Clock()
    while steps < args.iters and clock.seconds() < args.max_time:
        for _ in range(N_CRITIC):
            if pos + BATCH > len(order):
                order, pos = torch.randperm(len(images)), 0
            real, pos = images[order[pos:pos + BATCH].to(device)].float() / 127.5 - 1, pos + BATCH
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
                snapshots.append(save_snapshot(generator, args.image_size, out, len(snapshots), steps, clock.seconds()))
            due = [t for t in due if t > clock.seconds()]
    synchronize(device)
    seconds = clock.seconds()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": generator.state_dict(), "image_size": args.image_size}, out / "generator.pt")
    save_image(sample(generator, 64) * 0.5 + 0.5, out / "grid.png", nrow=8)
    summary = {"generator_steps": steps, "seconds": seconds, "images": len(images), "loss_critic": loss.item(),
               "loss_gen": loss_g.item(), "device": str(device), "snapshots": snapshots}
    (out / "summary.json").write_text(json.dumps(summary))
    print(f"dcgan_wgan_gp: {steps} generator steps in {seconds:.0f} s on {len(images)} images; {out}")
    return summary


if __name__ == "__main__":
    main()
