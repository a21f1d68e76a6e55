"""WGAN-GP with noise morphing: hard-example mining in the latent space (seed 003).

The generator's noise is bounded and uniform, z ~ U(-1, 1)^d. A small "noise morpher" network NM moves each z
towards the latents whose samples the critic scores worst, and the generator is trained on those morphed
latents, in the hope that it "fills in the gaps" between modes instead of polishing what it already does well.

    z' = NM(z) = z + clamp(s * softsign(MLP(z)), -b, b) * (1 - |z|)        (elementwise)

s = --morph-scale, b = --morph-bound in (0, 1]. The wall distance (1 - |z|) is a constant (detached). Each
coordinate moves by at most b times its distance to the nearer wall, so z' stays inside [-1, 1]^d, corners
included (a coordinate at +-1 does not move), and z' = z when the MLP outputs 0. Since b <= 1, a scale s > 1
only makes the step saturate earlier. The MLP's last layer starts at zero, so an untrained morpher is the identity.

One generator step = --critic-its ordinary WGAN-GP critic steps on un-morphed z, then --morph-its morpher steps
that MINIMISE mean D(G(NM(z))) with their own Adam (generator and critic frozen), then one generator step that
maximises mean D(G(NM(z))) (morpher frozen, run under no_grad). --no-morph is plain WGAN-GP, everything else
equal: the morpher is built (same initial weights for G and D at a given seed) but never called or stepped.

Papers: Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", arXiv 1704.00028 (WGAN-GP, the toy
sets and their models); the seed's idea (noise morpher = hard-example mining over latents; zero pull;
bounded uniform noise). Mode metrics follow PacGAN's convention (Lin et al. 2018, arXiv 1712.04086).

Usage:
    python noise_morph.py --dataset 8gaussians --iters 5000 --seed 1
    python noise_morph.py --dataset 8gaussians --iters 5000 --seed 1 --no-morph        # baseline
    python noise_morph.py --dataset 25gaussians --width 128 --zero-pull 0.1
    python noise_morph.py --dataset mnist --data ../shared/data --iters 10000 --fid-every 2000 \
        --fid-weights ../shared/models/weights-inception-2015-12-05-6726825d.pth
    python noise_morph.py --resume runs/<run-name>                  # continue in that folder
    python noise_morph.py --config runs/<run-name>/args.json --seed 2

Public step functions (signatures chosen here):
    critic_step(generator, critic, opt_critic, real, args) -> {loss_critic, wasserstein, gp[, zero_pull]}
    morph_step(generator, critic, morpher, opt_morph, args) -> {loss_morph} (= mean D(G(NM(z))), minimised)
    generator_step(generator, critic, opt_generator, args, morpher=None) -> {loss_gen}; with a morpher the
        generator is fed NM(z) computed under no_grad.

Metrics (metrics.jsonl, one line per log step; all on a fixed z of --eval-samples latents):
    d_gz = mean D(G(z)); d_gnmz = mean D(G(NM(z))); morph_gap = d_gz - d_gnmz (positive when the morpher finds
    latents the critic likes less). In --no-morph runs d_gnmz and morph_gap are null: the morpher is not touched.
    images_per_s = real samples per second through the critic steps since the last log line.
    Mixtures: hq_share = share of samples within 3 std of their nearest mode; modes_covered = number of modes
    holding at least COVER_SHARE (0.2) of their fair share n/K of those high-quality samples (with n = 2500 and
    25 modes: 20 samples, PacGAN's threshold). Swissroll: manifold_dist = mean Euclidean distance (data units,
    i.e. after /7.5) from each sample to the nearest of 4000 points of the noise-free roll; hq_share = share
    within 3 noise std (3 * 0.25 / 7.5 = 0.1) of it.
    MNIST with --fid-every: fid, kid, fid_n = FID/KID of n samples of G(z) (un-morphed) against a fixed n-image
    subset of the MNIST test split (the subset wgan_mnist.py uses, so the two scripts' FIDs share a floor).

Departures: the seed had no code for the toy sets; their definitions follow the WGAN-GP reference code (the
swiss roll is written here in numpy: columns 0 and 2 of sklearn's 3-D roll). --zero-pull draws u uniformly
over the bounding box of the current real batch (per feature), the seed's "random inputs" option. MNIST is
held in memory and batches are drawn with the torch RNG (no DataLoader, so no --num-workers; resume is exact).
No --amp, --image-size, --channels (nothing here uses them). The seed's "smooth noise" idea (clipping) is
replaced by the wall-distance-scaled softsign step, which never needs clipping.
"""
import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "noise_morph.py"
TOY = ("8gaussians", "25gaussians", "swissroll")
DEFAULTS = {**{name: (512, 0.1, 2, 256) for name in TOY}, "mnist": (64, 10.0, 128, 64)}  # width, lambda, d, batch
COVER_SHARE = 0.2


def fail(msg):
    print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors as one line, no usage
        fail(message)


def build_parser():
    p = Parser(prog=SCRIPT, description="WGAN-GP with noise morphing (seed 003)",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="8gaussians", choices=TOY + ("mnist",), help="training data")
    a("--data", default="data", help="torchvision root holding MNIST/raw (mnist only)")
    a("--download", action="store_true", help="download MNIST into --data when it is missing")
    a("--batch-size", type=int, default=None, help="batch size (None: 256 toy, 64 mnist)")
    a("--latent-dim", type=int, default=None, help="d of z ~ U(-1,1)^d (None: 2 toy, 128 mnist)")
    a("--width", type=int, default=None, help="toy MLP width / mnist base channels (None: 512 toy, 64 mnist)")
    a("--gp-lambda", type=float, default=None, help="gradient penalty weight (None: 0.1 toy, 10 mnist)")
    a("--iters", type=int, default=5000, help="generator steps")
    a("--critic-its", type=int, default=5, help="critic steps per generator step")
    a("--morph-its", type=int, default=5, help="morpher steps per generator step")
    a("--lr", type=float, default=1e-4, help="Adam lr (betas 0.5, 0.9) of generator, critic and morpher")
    a("--morph-width", type=int, default=128, help="hidden width of the morpher MLP")
    a("--morph-scale", type=float, default=1.0, help="s: step = clamp(s*softsign(MLP(z)), -b, b) * (1-|z|)")
    a("--morph-bound", type=float, default=1.0, help="b in (0, 1]: cap on the step as a share of the wall distance")
    a("--no-morph", action="store_true", help="plain WGAN-GP baseline: the morpher is never used")
    a("--zero-pull", type=float, default=0.0, help="add COEF * mean D(u)^2 to the critic loss, u uniform in the box")
    a("--eval-samples", type=int, default=2500, help="fixed latents for metrics and critic scores at log steps")
    a("--seed", type=int, default=1, help="seed of python, numpy and torch")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (auto: cuda if available)")
    a("--torch-deterministic", action="store_true", help="use deterministic algorithms (bit-exact resume)")
    a("--out", default="runs", help="parent folder of run folders")
    a("--run-name", default=None, help="run folder name (None: noise_morph__<dataset>__<seed>__<unix time>)")
    a("--resume", default=None, help="checkpoint .pt or run folder to continue (its args; given flags win)")
    a("--config", default=None, help="JSON or YAML file of flag values; command-line flags win")
    a("--sample-every", type=int, default=500, help="plots and samples every N steps (0: at the end only)")
    a("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (0: at the end only)")
    a("--log-every", type=int, default=100, help="metrics line every N steps")
    a("--fid-every", type=int, default=0, help="mnist: FID/KID every N steps (0: never)")
    a("--fid-samples", type=int, default=1000, help="generated and real images per FID")
    a("--fid-weights", default="../shared/models/weights-inception-2015-12-05-6726825d.pth",
      help="torch-fidelity Inception weights file (offline FID)")
    return p


def read_config(path, parser):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        fail(f"--config: cannot read {path} ({e.strerror}); give a JSON or YAML file of flag values")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml
            cfg = yaml.safe_load(text)
        except ImportError:
            fail(f"--config: {path} is not JSON and PyYAML is not installed; write it as JSON")
        except yaml.YAMLError:
            fail(f"--config: {path} is neither JSON nor YAML; fix its syntax")
    if not isinstance(cfg, dict):
        fail(f"--config: {path} must hold a mapping of flag names to values")
    known, values = vars(parser.parse_args([])), {}
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        if dest in ("config", "resume", "run_name"):
            continue
        if dest not in known:
            fail(f"--config: unknown key '{key}' in {path}; use the script's flag names")
        values[dest] = value
    return values


def given_flags(argv):
    """The flags written on the command line (no defaults), to override a resumed run's saved args."""
    p, unset = build_parser(), object()
    given = p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(p.parse_args([]))}))
    return {k: v for k, v in vars(given).items() if v is not unset}


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)
    for name, value in zip(("width", "gp_lambda", "latent_dim", "batch_size"), DEFAULTS[args.dataset]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    checks = [
        (args.iters >= 1, f"--iters must be >= 1 (got {args.iters})"),
        (args.critic_its >= 1, f"--critic-its must be >= 1 (got {args.critic_its})"),
        (args.morph_its >= 0, f"--morph-its must be >= 0 (got {args.morph_its})"),
        (args.batch_size >= 1, f"--batch-size must be >= 1 (got {args.batch_size})"),
        (args.latent_dim >= 2, f"--latent-dim must be >= 2, the latent plots use two dims (got {args.latent_dim})"),
        (min(args.width, args.morph_width) >= 1, "--width and --morph-width must be >= 1"),
        (args.lr > 0, f"--lr must be > 0 (got {args.lr})"),
        (args.gp_lambda >= 0, f"--gp-lambda must be >= 0 (got {args.gp_lambda})"),
        (args.zero_pull >= 0, f"--zero-pull must be >= 0 (got {args.zero_pull})"),
        (args.morph_scale > 0, f"--morph-scale must be > 0 (got {args.morph_scale})"),
        (0 < args.morph_bound <= 1, f"--morph-bound must be in (0, 1] to keep z' in the box (got {args.morph_bound})"),
        (args.eval_samples >= 1 and args.log_every >= 1, "--eval-samples and --log-every must be >= 1"),
        (min(args.sample_every, args.ckpt_every, args.fid_every) >= 0,
         "--sample-every, --ckpt-every and --fid-every must be >= 0"),
        (args.fid_every == 0 or args.dataset == "mnist", "--fid-every needs --dataset mnist"),
        (args.fid_samples >= 2, f"--fid-samples must be >= 2 (got {args.fid_samples})"),
    ]
    for ok, msg in checks:
        if not ok:
            fail(msg)
    return args


# ---------------------------------------------------------------- data

def toy_modes(name):
    """(centres [K, 2] as a float32 tensor, std) of a mixture, in data coordinates (after the scaling)."""
    if name == "8gaussians":
        angle = np.arange(8) * math.pi / 4
        return torch.tensor(2 * np.stack([np.cos(angle), np.sin(angle)], 1) / 1.414, dtype=torch.float32), 0.02 / 1.414
    grid = 2.0 * np.arange(-2, 3)
    centres = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2) / 2.828
    return torch.tensor(centres, dtype=torch.float32), 0.05 / 2.828


def roll_curve(t):
    return np.stack([t * np.cos(t), t * np.sin(t)], 1) / 7.5


def sample_toy(name, n, rng=np.random):
    """n points of a toy set as a float32 tensor [n, 2]; rng is np.random (seeded, checkpointed) or a RandomState."""
    if name == "swissroll":
        x = roll_curve(1.5 * math.pi * (1 + 2 * rng.rand(n))) + 0.25 / 7.5 * rng.randn(n, 2)
        return torch.from_numpy(x.astype(np.float32))
    centres, std = toy_modes(name)
    x = centres.numpy()[rng.randint(0, len(centres), n)] + std * rng.randn(n, 2)
    return torch.from_numpy(x.astype(np.float32))


def toy_metrics(name, x):
    """Sample-quality numbers of generated points x [n, 2] (see the module docstring)."""
    x = x.float().cpu()
    if name == "swissroll":
        curve = torch.from_numpy(roll_curve(np.linspace(1.5 * math.pi, 4.5 * math.pi, 4000)).astype(np.float32))
        near = torch.cdist(x, curve).min(1).values
        return {"manifold_dist": near.mean().item(), "hq_share": (near <= 3 * 0.25 / 7.5).float().mean().item()}
    centres, std = toy_modes(name)
    near, idx = torch.cdist(x, centres).min(1)
    good = near <= 3 * std
    counts = torch.bincount(idx[good], minlength=len(centres))
    covered = (counts >= COVER_SHARE * len(x) / len(centres)).sum()
    return {"modes_covered": int(covered), "hq_share": good.float().mean().item()}


def load_mnist(args, train=True):
    """MNIST train (or test) images as a float tensor [N, 1, 28, 28] in [-1, 1]."""
    import torchvision
    try:
        ds = torchvision.datasets.MNIST(args.data, train=train, download=args.download)
    except RuntimeError:
        fail(f"--data: MNIST not found under {args.data}/MNIST/raw; point --data at the torchvision root "
             "or add --download")
    return ds.data.unsqueeze(1).float() / 127.5 - 1


def sample_z(n, d, device, generator=None):
    return torch.rand(n, d, device=device, generator=generator) * 2 - 1


# ---------------------------------------------------------------- models

def mlp(sizes):
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Generator(nn.Module):
    def __init__(self, args):
        super().__init__()
        d, w = args.latent_dim, args.width
        if args.dataset in TOY:
            self.net = mlp([d, w, w, w, 2])
        else:  # 7x7 -> 14x14 -> 28x28
            self.net = nn.Sequential(
                nn.Linear(d, 2 * w * 49), nn.ReLU(), nn.Unflatten(1, (2 * w, 7, 7)),
                nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(w, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Critic(nn.Module):
    def __init__(self, args):
        super().__init__()
        w = args.width
        if args.dataset in TOY:
            self.net = mlp([2, w, w, w, 1])
        else:  # no BatchNorm: the penalty is per sample
            self.net = nn.Sequential(
                nn.Conv2d(1, w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
                nn.Flatten(), nn.Linear(2 * w * 49, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


class NoiseMorpher(nn.Module):
    """z' = z + clamp(s * softsign(MLP(z)), -b, b) * (1 - |z|), inside [-1, 1]^d for b <= 1."""

    def __init__(self, args):
        super().__init__()
        self.net = mlp([args.latent_dim, args.morph_width, args.morph_width, args.latent_dim])
        nn.init.zeros_(self.net[-1].weight)  # start as the identity
        nn.init.zeros_(self.net[-1].bias)
        self.scale, self.bound = args.morph_scale, args.morph_bound

    def forward(self, z):
        step = (self.scale * F.softsign(self.net(z))).clamp(-self.bound, self.bound)
        return z + step * (1 - z.abs()).detach()


# ---------------------------------------------------------------- losses and steps

def gradient_penalty(critic, real, fake):
    """Unscaled mean((||dD/dx_hat||_2 - 1)^2), one alpha per sample, norm over all non-batch dims."""
    alpha = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = (real + alpha * (fake.detach() - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@contextmanager
def frozen(*modules):
    """No weight gradients for these modules inside the block (inputs still get gradients)."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def critic_step(generator, critic, opt_critic, real, args):
    z = sample_z(real.shape[0], args.latent_dim, real.device)
    with torch.no_grad():
        fake = generator(z)
    wasserstein = critic(real).mean() - critic(fake).mean()
    gp = gradient_penalty(critic, real, fake) if args.gp_lambda else torch.zeros((), device=real.device)
    loss = -wasserstein + args.gp_lambda * gp
    out = {"wasserstein": wasserstein.detach(), "gp": gp.detach()}
    if args.zero_pull > 0:  # flatten the critic everywhere in the data box, so stale slopes decay
        lo, hi = real.amin(0), real.amax(0)
        pull = critic(lo + (hi - lo) * torch.rand_like(real)).pow(2).mean()
        loss = loss + args.zero_pull * pull
        out["zero_pull"] = pull.detach()
    opt_critic.zero_grad(set_to_none=True)
    loss.backward()
    opt_critic.step()
    return {"loss_critic": loss.detach(), **out}


def morph_step(generator, critic, morpher, opt_morph, args):
    z = sample_z(args.batch_size, args.latent_dim, next(morpher.parameters()).device)
    with frozen(generator, critic):
        score = critic(generator(morpher(z))).mean()  # minimised: find the latents the critic scores worst
        opt_morph.zero_grad(set_to_none=True)
        score.backward()
    opt_morph.step()
    return {"loss_morph": score.detach()}


def generator_step(generator, critic, opt_generator, args, morpher=None):
    z = sample_z(args.batch_size, args.latent_dim, next(generator.parameters()).device)
    if morpher is not None:
        with torch.no_grad():
            z = morpher(z)
    with frozen(critic):
        loss = -critic(generator(z)).mean()
        opt_generator.zero_grad(set_to_none=True)
        loss.backward()
    opt_generator.step()
    return {"loss_gen": loss.detach()}


@torch.no_grad()
def evaluate(generator, critic, morpher, z, args):
    fake = generator(z)
    out = {"d_gz": critic(fake).mean().item(), "d_gnmz": None, "morph_gap": None}
    if morpher is not None:
        out["d_gnmz"] = critic(generator(morpher(z))).mean().item()
        out["morph_gap"] = out["d_gz"] - out["d_gnmz"]
    if args.dataset in TOY:
        out.update(toy_metrics(args.dataset, fake))
    return out


# ---------------------------------------------------------------- plots and FID

@torch.no_grad()
def write_plots(run_dir, it, history, generator, critic, morpher, z, real):
    """scores.png; toy: critic_contour.png (+ samples/), latent.png; mnist: samples/ grid, latent_walk.gif."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("d_gz", "D(G(z))"), ("d_gnmz", "D(G(NM(z)))"), ("morph_gap", "D(G(z)) - D(G(NM(z)))")):
        points = [(h["iter"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="generator step", ylabel="mean critic score", title="critic scores on a fixed z")
    ax.legend()
    fig.savefig(os.path.join(run_dir, "scores.png"), dpi=80)
    plt.close(fig)
    if real is None:
        return write_mnist_images(run_dir, it, generator, morpher, z)

    lim = 1.15 * real.abs().max().item()
    axis = torch.linspace(-lim, lim, 120)
    plane = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    fake = generator(z[:1000]).cpu()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    cs = ax.contourf(axis, axis, critic(plane.to(z.device)).cpu().reshape(120, 120), levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="D(x)")
    ax.scatter(*real[:1000].T, s=2, c="orange", label="real")
    ax.scatter(*fake.T, s=2, c="white", label="generated")
    ax.set(title=f"critic at step {it}", xlim=(-lim, lim), ylim=(-lim, lim))
    ax.legend(loc="upper right")
    fig.savefig(os.path.join(run_dir, "critic_contour.png"), dpi=80)
    fig.savefig(os.path.join(run_dir, "samples", f"iter_{it:06d}.png"), dpi=60)
    plt.close(fig)

    side = torch.linspace(-1, 1, 61)
    grid = torch.zeros(61 * 61, z.shape[1], device=z.device)  # first two latent dims, the rest 0
    grid[:, :2] = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 1 if morpher is None else 2, figsize=(5 if morpher is None else 10, 4.2), squeeze=False)
    im = axes[0, 0].imshow(critic(generator(grid)).cpu().reshape(61, 61), origin="lower", extent=(-1, 1, -1, 1))
    fig.colorbar(im, ax=axes[0, 0])
    axes[0, 0].set(title="D(G(z)) over the latent square", xlabel="z1", ylabel="z2")
    if morpher is not None:
        sub = grid.reshape(61, 61, -1)[::4, ::4].reshape(-1, z.shape[1])
        moved = morpher(sub)
        im = axes[0, 1].imshow(critic(generator(morpher(grid))).cpu().reshape(61, 61), origin="lower",
                               extent=(-1, 1, -1, 1))
        fig.colorbar(im, ax=axes[0, 1])
        d = (moved - sub)[:, :2].cpu()
        axes[0, 1].quiver(*sub[:, :2].cpu().T, *d.T, angles="xy", scale_units="xy", scale=1, color="white", width=0.004)
        axes[0, 1].set(title="NM(z) arrows over D(G(NM(z)))", xlabel="z1", ylabel="z2")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "latent.png"), dpi=80)
    plt.close(fig)


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def write_mnist_images(run_dir, it, generator, morpher, z):
    from PIL import Image
    from torchvision.utils import make_grid, save_image
    save_image(generator(z[:64]) * 0.5 + 0.5, os.path.join(run_dir, "samples", f"iter_{it:06d}.png"), nrow=8)
    corner = torch.where(z[0] >= 0, 1.0, -1.0)  # a corner of the box, walked to the opposite one
    walk = corner * torch.linspace(1, -1, 40, device=z.device)[:, None]
    rows = [generator(walk)] + ([] if morpher is None else [generator(morpher(walk))])
    frames = []
    for i in range(len(walk)):
        tile = make_grid(torch.stack([r[i] for r in rows]), nrow=len(rows), padding=1)
        frames.append(Image.fromarray(to_uint8(tile)[0].numpy()).resize((tile.shape[2] * 4, tile.shape[1] * 4)))
    frames[0].save(os.path.join(run_dir, "latent_walk.gif"), save_all=True, append_images=frames[1:],
                   duration=80, loop=0)


class Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = to_uint8(images).repeat(1, 3, 1, 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@torch.no_grad()
def compute_fid(generator, test_images, args, device, out_dir):
    """FID/KID of n samples of G(z) against a fixed n-image subset of the MNIST test split (seed 0)."""
    import torch_fidelity
    n = args.fid_samples
    z = sample_z(n, args.latent_dim, "cpu", torch.Generator().manual_seed(args.seed + 2)).to(device)
    fake = torch.cat([generator(chunk) for chunk in z.split(500)])
    real = test_images[torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[:n]]
    data_key = zlib.crc32(os.path.abspath(args.data).encode())  # another root, another cache entry
    m = torch_fidelity.calculate_metrics(
        input1=Uint8Images(fake), input2=Uint8Images(real), fid=True, kid=True, kid_subset_size=min(1000, n),
        feature_extractor_weights_path=args.fid_weights, cuda=device.type == "cuda", batch_size=100,
        verbose=False, save_cpu_ram=True, cache_root=os.path.join(out_dir, ".fid_cache"),  # no loader workers
        input2_cache_name=f"mnist-test-n{n}-seed0-{data_key}", cache=True)
    return {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"], "fid_n": n}


# ---------------------------------------------------------------- checkpoint

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(resume):
    path = os.path.join(resume, "ckpt", "last.pt") if os.path.isdir(resume) else resume
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt["args"], ckpt["iter"], ckpt["models"]
    except Exception as e:
        fail(f"--resume: cannot load {path} ({type(e).__name__}); give a ckpt/last.pt written by {SCRIPT} "
             "or its run folder")
    return ckpt, os.path.dirname(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    ckpt = None
    if args.resume:
        ckpt, run_dir = load_checkpoint(args.resume)
        args = argparse.Namespace(**{**ckpt["args"], **given_flags(argv), "resume": args.resume})
    else:
        name = args.run_name or f"noise_morph__{args.dataset}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.out, name)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available here; use --device cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.fid_every and not os.path.isfile(args.fid_weights):
        fail(f"--fid-weights: {args.fid_weights} not found; give torch-fidelity's Inception weights file")
    torch.use_deterministic_algorithms(args.torch_deterministic)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    toy = args.dataset in TOY
    if toy:
        real_ref = sample_toy(args.dataset, 1000, np.random.RandomState(args.seed + 1))
        next_real = lambda: sample_toy(args.dataset, args.batch_size).to(device)  # noqa: E731
    else:
        real_ref, images = None, load_mnist(args).to(device)
        test_images = load_mnist(args, train=False) if args.fid_every else None
        next_real = lambda: images[torch.randint(len(images), (args.batch_size,), device=device)]  # noqa: E731
    generator, critic, morpher = Generator(args).to(device), Critic(args).to(device), NoiseMorpher(args).to(device)
    opts = [torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.9)) for m in (generator, critic, morpher)]
    use_morph = None if args.no_morph else morpher
    fixed_gen = torch.Generator().manual_seed(args.seed + 1)  # metrics on a fixed z, off the training RNG
    fixed_z = sample_z(args.eval_samples, args.latent_dim, "cpu", fixed_gen).to(device)
    start, history = 0, []
    if ckpt:
        for module, opt, (m_state, o_state) in zip((generator, critic, morpher), opts, ckpt["models"]):
            module.load_state_dict(m_state)
            opt.load_state_dict(o_state)
        start, history = ckpt["iter"], ckpt["history"]
        set_rng_state(ckpt["rng"])
    os.makedirs(os.path.join(run_dir, "ckpt"), exist_ok=True)
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "w")  # rewritten from the checkpoint's history
    for record in history:
        metrics_file.write(json.dumps(record) + "\n")
    try:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir)
    except ImportError:
        writer = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.iters, initial=start, dynamic_ncols=True)
    except ImportError:
        bar = None

    def checkpoint(done):
        state = {"models": [(m.state_dict(), o.state_dict()) for m, o in zip((generator, critic, morpher), opts)],
                 "iter": done, "history": history, "rng": rng_state(), "args": vars(args)}
        save_checkpoint(os.path.join(run_dir, "ckpt", "last.pt"), state)

    def check_finite():
        if int(bad) >= 0:
            print(f"{SCRIPT}: error: non-finite loss at iteration {int(bad)}; training stopped, last good checkpoint "
                  "kept", file=sys.stderr)
            raise SystemExit(1)

    bad = torch.full((), -1, dtype=torch.long, device=device)  # first iteration with a non-finite loss
    t_start = t_last = time.time()
    it_last, done, stats = start, start, {}
    try:
        for it in range(start + 1, args.iters + 1):
            losses = []
            for _ in range(args.critic_its):
                stats.update(critic_step(generator, critic, opts[1], next_real(), args))
                losses.append(stats["loss_critic"])
            for _ in range(args.morph_its if use_morph is not None else 0):
                stats.update(morph_step(generator, critic, morpher, opts[2], args))
                losses.append(stats["loss_morph"])
            stats.update(generator_step(generator, critic, opts[0], args, morpher=use_morph))
            losses.append(stats["loss_gen"])
            bad = torch.where((bad < 0) & ~torch.isfinite(torch.stack(losses)).all(), it, bad)
            done, last = it, it == args.iters
            fid = args.fid_every and it % args.fid_every == 0
            log = fid or last or it % args.log_every == 0
            sample = last or (args.sample_every and it % args.sample_every == 0)
            save = last or (args.ckpt_every and it % args.ckpt_every == 0)
            if not (log or sample or save):
                continue
            check_finite()
            if log:
                now = time.time()
                record = {"iter": it, **{k: v.item() for k, v in stats.items()}, "lr": args.lr,
                          "images_per_s": (it - it_last) * args.batch_size * args.critic_its / max(now - t_last, 1e-9),
                          "seconds": now - t_start, **evaluate(generator, critic, use_morph, fixed_z, args)}
                if fid:
                    record.update(compute_fid(generator, test_images, args, device, args.out))
                t_last, it_last = now, it
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if writer:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k != "iter":
                            writer.add_scalar(k, v, it)
                if bar:
                    bar.update(it - bar.n)
                    bar.set_postfix(critic=f"{record['loss_critic']:.3f}", W=f"{record['wasserstein']:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")
            if sample:
                write_plots(run_dir, it, history, generator, critic, use_morph, fixed_z, real_ref)
            if save:
                checkpoint(it)
    except KeyboardInterrupt:
        check_finite()
        checkpoint(done)
        print(f"{SCRIPT}: interrupted at step {done}; checkpoint written to {run_dir}/ckpt/last.pt")
    finally:
        metrics_file.close()
        if writer:
            writer.close()
        if bar:
            bar.close()
    last = history[-1] if history else {}
    keys = ("wasserstein", "modes_covered", "hq_share", "manifold_dist", "morph_gap", "fid")
    extras = "".join(f", {k} {last[k]:.4g}" for k in keys if last.get(k) is not None)
    print(f"{SCRIPT}: {done} generator steps in {time.time() - t_start:.0f}s{extras}; run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
