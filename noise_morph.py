"""WGAN-GP with noise morphing: hard-example mining in the latent space (seed 003).

The generator's noise is bounded and uniform, z ~ U(-1, 1)^d. A small "noise morpher" network NM moves each z
towards the latents whose samples the critic scores worst, and the generator is trained on those morphed
latents, in the hope that it "fills in the gaps" between modes instead of polishing what it already does well.

    z' = NM(z) = z + clamp(s * softsign(MLP(z)), -b, b) * (1 - |z|)        (elementwise)

s = --morph-scale, b = --morph-bound in (0, 1]. The wall distance (1 - |z|) is a constant (detached). Each
coordinate moves by at most b times its distance to the nearer wall, so z' stays inside [-1, 1]^d, corners
included (a coordinate at +-1 does not move), and z' = z when the MLP outputs 0. Since b <= 1, a scale s > 1
only makes the step saturate earlier. The MLP's last layer starts at zero, so an untrained morpher is the identity.

One generator step (train_step) = --critic-its WGAN-GP critic_step calls on un-morphed z, then --morph-its
morph_step calls that MINIMISE mean D(G(NM(z))) with the morpher's own Adam (generator and critic frozen), then
one generator_step that maximises mean D(G(NM(z))) (NM(z) under no_grad). --no-morph is plain WGAN-GP, all else
equal: the morpher is built (same initial G and D at a given seed) but never called or stepped.

Papers: Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", arXiv 1704.00028 (WGAN-GP, the toy
sets and their models); the seed's idea (noise morpher = hard-example mining over latents; zero pull;
bounded uniform noise). Mode metrics follow PacGAN's convention (Lin et al. 2018, arXiv 1712.04086).

Usage (more in docs/noise_morph.md):
    python noise_morph.py --dataset 8gaussians --iters 5000 --seed 1
    python noise_morph.py --dataset 8gaussians --iters 5000 --seed 1 --no-morph        # baseline
    python noise_morph.py --dataset mnist --data ../shared/data --max-time 10m --fid-every 2000 \
        --fid-weights ../shared/models/weights-inception-2015-12-05-6726825d.pth
    python noise_morph.py --resume runs/<run-name>                  # continue in that folder
    python noise_morph.py --config runs/<run-name>/args.json --seed 2

Metrics (metrics.jsonl, one line per log step, on a fixed z of --eval-samples latents; docs/noise_morph.md defines each):
d_gz = mean D(G(z)), d_gnmz = mean D(G(NM(z))), morph_gap = d_gz - d_gnmz (positive when the morpher finds
latents the critic likes less; null with --no-morph, which never touches the morpher); mode coverage and
high-quality share on the mixtures, distance to the roll on swissroll; on MNIST, FID/KID of G(z) against
wgan_mnist.py's test subset, so that the two scripts' FIDs share a floor.

Departures: the seed had no code for the toy sets; their definitions follow the WGAN-GP reference code (the
swiss roll is written here in numpy: columns 0 and 2 of sklearn's 3-D roll). --zero-pull draws u uniformly
over the bounding box of the current real batch (per feature), the seed's "random inputs" option. MNIST is
held in memory and batches are drawn with the torch RNG (no DataLoader, so no --num-workers; resume is exact).
No --amp, --image-size, --channels (nothing here uses them). The seed's "smooth noise" idea (clipping) is
replaced by the wall-distance-scaled softsign step, which never needs clipping. On MNIST the nets and settings
are wgan_mnist.py's time-to-quality winners (docs/wgan_mnist.md): metrics, plots and FID use the generator in eval mode
(BatchNorm running statistics), as wgan_mnist.py samples. SIGINT, SIGTERM and SIGHUP stop after the current step
with a checkpoint (exit 130, 143, 143; at start-up at once, in one line); --max-time ends training as --iters does.
The file is longer than SPEC's 300-700 lines: those reliability features, config files through argparse, exact
resume, MNIST with FID and the plots each take their lines once.
"""
import argparse
import errno
import fcntl
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import zlib
from contextlib import ExitStack, closing, contextmanager, suppress

SCRIPT = "noise_morph.py"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP (a closed terminal) is treated as SIGTERM


def exit_code(signum):
    return 130 if signum == signal.SIGINT else 143


def interrupted(signum, when):
    print(f"{SCRIPT}: interrupted by {signal.Signals(signum).name} {when}", file=sys.stderr)
    raise SystemExit(exit_code(signum))


def quit_while_starting(signum, frame):
    """Nothing is saved yet, and an exception raised inside torch's imports can come out as another one: exit here."""
    print(f"{SCRIPT}: interrupted by {signal.Signals(signum).name} during start-up; nothing saved", file=sys.stderr)
    os._exit(exit_code(signum))


if __name__ == "__main__":  # a signal while torch loads: one line, not a traceback or a silent death
    for sig in SIGNALS:
        signal.signal(sig, quit_while_starting)
import numpy as np  # noqa: E402 (after the handlers)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOY = ("8gaussians", "25gaussians", "swissroll")
PER_DATASET = ("width", "gp_lambda", "latent_dim", "batch_size", "lr", "gp_every")  # None: DEFAULTS[dataset]
DEFAULTS = {**{name: (512, 0.1, 2, 256, 1e-4, 1) for name in TOY}, "mnist": (16, 10.0, 128, 64, 8e-4, 4)}
COVER_SHARE = 0.2
NOT_FROM_FILES = ("config", "resume", "run_name")  # said on the command line only
NETWORK = ("dataset", "width", "latent_dim", "morph_width")  # they shape the nets: a resume must keep them


# ---------------------------------------------------------------------------------------------- flags
def fail(message, code=2):
    print(f"{SCRIPT}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors as one line, no usage
        fail(message)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a flag whose default is None says in its own help what None means
        return action.help if action.default is None else super()._get_help_string(action)


def duration(text):
    """--max-time: seconds, or a number with s, m or h ('90s', '30m', '2h')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a time budget; give seconds or e.g. 90s, 30m, 2h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def build_parser():
    p = Parser(prog=SCRIPT, description="WGAN-GP with noise morphing (seed 003)",
               formatter_class=Help)
    a = p.add_argument
    a("--dataset", default="8gaussians", choices=TOY + ("mnist",), help="training data")
    a("--data", default="data", help="torchvision root holding MNIST/raw (mnist only)")
    a("--download", action="store_true", help="download MNIST into --data when it is missing")
    a("--batch-size", type=int, default=None, help="batch size (None: 256 toy, 64 mnist)")
    a("--latent-dim", type=int, default=None, help="d of z ~ U(-1,1)^d (None: 2 toy, 128 mnist)")
    a("--width", type=int, default=None, help="toy MLP width / mnist base channels (None: 512 toy, 16 mnist)")
    a("--gp-lambda", type=float, default=None, help="gradient penalty weight (None: 0.1 toy, 10 mnist)")
    a("--gp-every", type=int, default=None,
      help="lazy penalty: only every K-th critic step pays the penalty, weighted lambda * K (None: 1 toy, 4 mnist)")
    a("--iters", type=int, default=5000, help="generator steps")
    a("--max-time", type=duration, default=None,
      help="wall-clock budget (seconds, or 90s, 30m, 2h; none: no limit): training ends after the step that "
      "crosses it")
    a("--critic-its", type=int, default=5, help="critic steps per generator step")
    a("--morph-its", type=int, default=5, help="morpher steps per generator step")
    a("--lr", type=float, default=None,
      help="Adam lr (betas 0.5, 0.9) of generator, critic and morpher (None: 1e-4 toy, 8e-4 mnist)")
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
    a("--fid-weights", default=None, help="torch-fidelity Inception weights file (offline FID; none: download)")
    return p


def parse_args(argv=None):
    """The command line over a config file over a resumed checkpoint's settings, all through argparse, so that
    every type, choice and check applies to each. With --resume, args.resume is the checkpoint file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resume = args.resume and checkpoint_file(args.resume)
    saved = load_checkpoint(resume)["args"] if resume else {}
    tokens = as_flags(saved, f"--resume {resume}", parser) if resume else []
    if args.config:
        tokens += as_flags(read_config(args.config), f"--config {args.config}", parser)
    args = parser.parse_args(tokens + argv)  # the same flags again, after the files' values
    args.resume = resume
    for name, value in zip(PER_DATASET, DEFAULTS[args.dataset]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in NETWORK:
        if name in saved and getattr(args, name) != saved[name]:
            fail(f"--resume: --{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                 f"{saved[name]}; the networks would not match (start a new run to change it)")
    check_args(args)
    return args


def as_flags(values, source, parser):
    """A dict of flag values (config file or checkpoint settings) as command-line tokens."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = [str(k) for k in values if str(k).replace("-", "_") not in actions]
    if unknown and source.startswith("--resume"):
        fail(f"{source} is not a checkpoint of {SCRIPT}: it has settings this script does not have "
             f"({', '.join(unknown[:4])})")
    if unknown:
        fail(f"{source}: unknown key '{unknown[0]}'; use the script's flag names")
    tokens = []
    for key, value in values.items():
        action = actions[str(key).replace("-", "_")]
        if action.dest in NOT_FROM_FILES or value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                fail(f"{source}: {action.option_strings[0]} takes true or false, got {value!r}")
            tokens += [action.option_strings[0]] if value else []
        else:
            tokens += [action.option_strings[0], str(value)]
    return tokens


def read_config(path):
    try:
        with open(path) as f:
            text = f.read()
        cfg = json.loads(text)
    except OSError as e:
        fail(f"--config: cannot read {path} ({e.strerror}); give a JSON or YAML file of flag values")
    except json.JSONDecodeError:  # not JSON: YAML, where PyYAML is installed
        try:
            import yaml
            cfg = yaml.safe_load(text)
        except ImportError:
            fail(f"--config: {path} is not JSON and PyYAML is not installed; write it as JSON")
        except yaml.YAMLError:
            fail(f"--config: {path} is neither JSON nor YAML; fix its syntax")
    if not isinstance(cfg, dict):
        fail(f"--config: {path} must hold a mapping of flag names to values")
    return cfg


def check_args(args):
    checks = [
        (args.iters >= 1, f"--iters must be >= 1 (got {args.iters})"),
        (0 <= args.seed < 2 ** 32, f"--seed must be in [0, 2**32), numpy's range (got {args.seed})"),
        (args.critic_its >= 1, f"--critic-its must be >= 1 (got {args.critic_its})"),
        (args.morph_its >= 0, f"--morph-its must be >= 0 (got {args.morph_its})"),
        (args.batch_size >= 1, f"--batch-size must be >= 1 (got {args.batch_size})"),
        (args.latent_dim >= 2, f"--latent-dim must be >= 2, the latent plots use two dims (got {args.latent_dim})"),
        (min(args.width, args.morph_width) >= 1, "--width and --morph-width must be >= 1"),
        (args.lr > 0, f"--lr must be > 0 (got {args.lr})"),
        (args.gp_lambda >= 0, f"--gp-lambda must be >= 0 (got {args.gp_lambda})"),
        (args.gp_every >= 1, f"--gp-every must be >= 1 (1: the penalty at every critic step; got {args.gp_every})"),
        (args.zero_pull >= 0, f"--zero-pull must be >= 0 (got {args.zero_pull})"),
        (args.morph_scale > 0, f"--morph-scale must be > 0 (got {args.morph_scale})"),
        (0 < args.morph_bound <= 1, f"--morph-bound must be in (0, 1] to keep z' in the box (got {args.morph_bound})"),
        (args.eval_samples >= 1 and args.log_every >= 1, "--eval-samples and --log-every must be >= 1"),
        (min(args.sample_every, args.ckpt_every, args.fid_every) >= 0,
         "--sample-every, --ckpt-every and --fid-every must be >= 0"),
        (args.fid_every == 0 or args.dataset == "mnist", "--fid-every needs --dataset mnist"),
        (args.fid_samples >= 2, f"--fid-samples must be >= 2 (got {args.fid_samples})"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


# ----------------------------------------------------------------------------------------------- data
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
    else:
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
    folder = os.path.join(args.data, "MNIST", "raw")
    split = "train" if train else "t10k"
    present = all(os.path.isfile(os.path.join(folder, f"{split}-{kind}")) for kind in ("images-idx3-ubyte",
                                                                                       "labels-idx1-ubyte"))
    if not present and not args.download:
        fail(f"--data: MNIST not found under {folder}; point --data at the torchvision root or add --download")
    try:
        ds = torchvision.datasets.MNIST(args.data, train=train, download=args.download and not present)
        images = ds.data
    except Exception as e:  # torchvision's reader asserts, or fails on a short or gzipped file
        fail(f"--data: cannot read the MNIST {split} files in {folder} ({type(e).__name__}); they may be truncated "
             "or not idx files: delete them and fetch them again with --download" if present else
             f"--download: could not fetch MNIST into {folder} ({type(e).__name__}); check the network or copy "
             "the idx files there")
    if tuple(images.shape[1:]) != (28, 28) or len(images) != len(ds.targets):
        fail(f"--data: the MNIST {split} files in {folder} hold {len(images)} images of "
             f"{'x'.join(map(str, images.shape[1:]))} and {len(ds.targets)} labels, not MNIST's 28x28 with a label "
             "each")
    return images.unsqueeze(1).float() / 127.5 - 1


def sample_z(n, d, device, generator=None):
    return torch.rand(n, d, device=device, generator=generator) * 2 - 1


# --------------------------------------------------------------------------------------------- models
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
        else:  # wgan_mnist.py's generator: 7x7x4w -> 14x14x2w -> 28x28x1, BatchNorm + ReLU between, tanh
            self.net = nn.Sequential(
                nn.Linear(d, 7 * 7 * 4 * w, bias=False), nn.Unflatten(1, (4 * w, 7, 7)), nn.BatchNorm2d(4 * w),
                nn.ReLU(), nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
                nn.ConvTranspose2d(2 * w, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Critic(nn.Module):
    def __init__(self, args):
        super().__init__()
        w = args.width
        if args.dataset in TOY:
            self.net = mlp([2, w, w, w, 1])
        else:  # wgan_mnist.py's gp critic: 14x14xw -> 7x7x2w -> 4x4x4w -> 1, no BatchNorm (per-sample penalty)
            act = nn.LeakyReLU(0.2)
            self.net = nn.Sequential(nn.Conv2d(1, w, 4, 2, 1), act, nn.Conv2d(w, 2 * w, 4, 2, 1), act,
                                     nn.Conv2d(2 * w, 4 * w, 3, 2, 1), act, nn.Flatten(), nn.Linear(4 * w * 16, 1))

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


# --------------------------------------------------------------------------------------------- losses
def gradient_penalty(critic, real, fake):
    """Unscaled mean((||dD/dx_hat||_2 - 1)^2), one alpha per sample, norm over all non-batch dims."""
    alpha = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = (real + alpha * (fake.detach() - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


# --------------------------------------------------------------------------------- one-step functions
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


@contextmanager
def eval_mode(module):
    """Metrics, plots and FID see the generator as sampling does: BatchNorm with its running statistics (a
    checkpoint written meanwhile is unaffected: state dicts do not hold the mode)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def descend(opt, loss):
    """One optimizer step on `loss`; returns the loss, detached."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def critic_step(generator, critic, opt_critic, real, args, penalize=True):
    """One WGAN-GP critic update; the penalty only when `penalize` (every --gp-every-th step), weighted
    lambda * K so that its average weight stays lambda."""
    z = sample_z(real.shape[0], args.latent_dim, real.device)
    with torch.no_grad():
        fake = generator(z)
    wasserstein = critic(real).mean() - critic(fake).mean()
    loss = -wasserstein
    out = {"wasserstein": wasserstein.detach()}
    if not args.gp_lambda:  # lambda 0: no penalty pass at all (the bench's no-penalty step)
        out["gp"] = torch.zeros((), device=real.device)
    elif penalize:
        gp = gradient_penalty(critic, real, fake)
        loss = loss + args.gp_lambda * args.gp_every * gp
        out["gp"] = gp.detach()
    if args.zero_pull > 0:  # flatten the critic everywhere in the data box, so stale slopes decay
        lo, hi = real.amin(0), real.amax(0)
        pull = critic(lo + (hi - lo) * torch.rand_like(real)).pow(2).mean()
        loss = loss + args.zero_pull * pull
        out["zero_pull"] = pull.detach()
    return {"loss_critic": descend(opt_critic, loss), **out}


def morph_step(generator, critic, morpher, opt_morph, args):
    z = sample_z(args.batch_size, args.latent_dim, next(morpher.parameters()).device)
    with frozen(generator, critic):  # minimised: find the latents the critic scores worst
        return {"loss_morph": descend(opt_morph, critic(generator(morpher(z))).mean())}


def generator_step(generator, critic, opt_generator, args, morpher=None):
    z = sample_z(args.batch_size, args.latent_dim, next(generator.parameters()).device)
    if morpher is not None:
        with torch.no_grad():
            z = morpher(z)
    with frozen(critic):
        return {"loss_gen": descend(opt_generator, -critic(generator(z)).mean())}


def build_nets(args, device):
    """Generator, critic, noise morpher and their Adams; `use_morph` is the morpher, or None with --no-morph."""
    generator, critic, morpher = Generator(args).to(device), Critic(args).to(device), NoiseMorpher(args).to(device)
    opts = [torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.9)) for m in (generator, critic, morpher)]
    return argparse.Namespace(generator=generator, critic=critic, morpher=morpher, modules=(generator, critic, morpher),
                              device=torch.device(device),
                              opts=opts, opt_generator=opts[0], opt_critic=opts[1], opt_morph=opts[2], stats={},
                              use_morph=None if args.no_morph else morpher)


def train_step(nets, next_real, it, args):
    """Generator step `it` (1-based): its critic steps (the penalty on every --gp-every-th), the morpher's steps
    (none with --no-morph) and the generator update. Returns every loss, stacked."""
    outs = []
    for j in range(args.critic_its):
        penalize = ((it - 1) * args.critic_its + j) % args.gp_every == 0
        outs.append(critic_step(nets.generator, nets.critic, nets.opt_critic, next_real(), args, penalize))
    for _ in range(args.morph_its if nets.use_morph is not None else 0):
        outs.append(morph_step(nets.generator, nets.critic, nets.morpher, nets.opt_morph, args))
    outs.append(generator_step(nets.generator, nets.critic, nets.opt_generator, args, morpher=nets.use_morph))
    for out in outs:
        nets.stats.update(out)
    return torch.stack([out[k] for out in outs for k in ("loss_critic", "loss_morph", "loss_gen") if k in out])


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


# ------------------------------------------------------------------------------------- images and FID
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
    if ax.get_legend_handles_labels()[0]:  # no score is logged before the first log step
        ax.legend()
    with replacing(os.path.join(run_dir, "scores.png")) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
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
    for path, dpi in ((os.path.join(run_dir, "critic_contour.png"), 80),
                      (os.path.join(run_dir, "samples", f"iter_{it:06d}.png"), 60)):
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)

    side = torch.linspace(-1, 1, 61)
    grid = torch.zeros(61 * 61, z.shape[1], device=z.device)  # first two latent dims, the rest 0
    grid[:, :2] = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
    panels = [(grid, "D(G(z)) over the latent square")]
    if morpher is not None:
        panels.append((morpher(grid), "NM(z) arrows over D(G(NM(z)))"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (latents, title) in zip(axes[0], panels):
        im = ax.imshow(critic(generator(latents)).cpu().reshape(61, 61), origin="lower", extent=(-1, 1, -1, 1))
        fig.colorbar(im, ax=ax)
        ax.set(title=title, xlabel="z1", ylabel="z2")
    if morpher is not None:
        sub = grid.reshape(61, 61, -1)[::4, ::4].reshape(-1, z.shape[1])
        d = (morpher(sub) - sub)[:, :2].cpu()
        axes[0, 1].quiver(*sub[:, :2].cpu().T, *d.T, angles="xy", scale_units="xy", scale=1, color="white", width=0.004)
    fig.tight_layout()
    with replacing(os.path.join(run_dir, "latent.png")) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def write_mnist_images(run_dir, it, generator, morpher, z):
    from PIL import Image
    from torchvision.utils import make_grid, save_image
    with replacing(os.path.join(run_dir, "samples", f"iter_{it:06d}.png")) as tmp:
        save_image(generator(z[:64]) * 0.5 + 0.5, tmp, nrow=8, format="png")
    corner = torch.where(z[0] >= 0, 1.0, -1.0)  # a corner of the box, walked to the opposite one
    walk = corner * torch.linspace(1, -1, 40, device=z.device)[:, None]
    rows = [generator(walk)] + ([] if morpher is None else [generator(morpher(walk))])
    frames = []
    for i in range(len(walk)):
        tile = make_grid(torch.stack([r[i] for r in rows]), nrow=len(rows), padding=1)
        frames.append(Image.fromarray(to_uint8(tile)[0].numpy()).resize((tile.shape[2] * 4, tile.shape[1] * 4)))
    with replacing(os.path.join(run_dir, "latent_walk.gif")) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def load_inception(args, device):
    """torch-fidelity's FID Inception, built at start so that a missing torch-fidelity or bad --fid-weights stops
    the run before training; on a CPU in channels_last (its NHWC kernels measured 1.3x faster here)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        fail("--fid-every needs torch-fidelity (pip install torch-fidelity)")
    if args.fid_weights and not os.path.isfile(args.fid_weights):
        fail(f"--fid-weights: {args.fid_weights} not found; give torch-fidelity's Inception weights file")
    try:
        with torch.random.fork_rng(devices=[]):  # its layers' initialisation must not move the training RNG
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=args.fid_weights)
    except Exception as e:
        fail(f"--fid-weights: cannot load {args.fid_weights} as torch-fidelity's Inception weights "
             f"({type(e).__name__})")
    return net.eval().to(device, memory_format=torch.channels_last if device.type == "cpu" else torch.preserve_format)


@torch.no_grad()
def inception_features(inception, images, device):
    """Pool features [n, 2048] of images in [-1, 1], in batches of 25 on a CPU (faster there than 100)."""
    chunks = to_uint8(images).split(25 if device.type == "cpu" else 250)
    return torch.cat([inception(chunk.expand(-1, 3, -1, -1).to(device))[0].cpu() for chunk in chunks])


@torch.no_grad()
def compute_fid(inception, generator, test_images, args, device, out_dir):
    """FID/KID (torch-fidelity's metric code) of n samples of G(z) against a fixed n-image subset of the MNIST
    test split (seed 0; wgan_mnist.py's subset and cache name), whose features are cached under out_dir."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    n = args.fid_samples
    z = sample_z(n, args.latent_dim, "cpu", torch.Generator().manual_seed(args.seed + 2))
    z = z.to(next(generator.parameters()).device)
    fake = inception_features(inception, torch.cat([generator(chunk) for chunk in z.split(500)]), device)
    data_key = zlib.crc32(os.path.abspath(args.data).encode())  # another root, another cache entry
    # another device, another entry: Inception's convolutions run in TF32 on CUDA
    cache = os.path.join(out_dir, ".fid_cache", f"mnist-test-n{n}-seed0-{data_key}-{device.type}.pt")
    try:
        real = torch.load(cache)
        if real.shape != (n, fake.shape[1]):
            raise ValueError(cache)
    except Exception:  # missing, or truncated by a kill: computed again
        pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[:n]
        real = inception_features(inception, test_images[pick], device)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with replacing(cache) as tmp:
            torch.save(real, tmp)
    fid = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
    kid = kid_features_to_metric(fake, real, kid_subset_size=min(1000, n), verbose=False)
    return {"fid": fid["frechet_inception_distance"], "kid": kid["kernel_inception_distance_mean"], "fid_n": n}


# -------------------------------------------------------------------------- run folder and checkpoint
@contextmanager
def replacing(path):
    """A temporary file beside `path` that replaces it only when written in full; removed if writing fails, so a
    kill or a full disk leaves the old file (or none), never a partial one."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.remove(tmp)


def rng_state(device):
    """The RNGs; of CUDA's, the device in use only (a resume may see fewer or more GPUs)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints: one state per visible GPU; the run used the current one
        index = device.index if device.index is not None else 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def settings(args):
    return {k: v for k, v in vars(args).items() if k != "resume"}


def save_checkpoint(path, nets, done, history, args, run):
    """Models and optimizers, the step, the logged history, the RNG and the settings, written to a temporary
    file that replaces `path` only when complete. A full disk ends the run (exit 1), the last good one kept."""
    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save({"models": [(m.state_dict(), o.state_dict()) for m, o in zip(nets.modules, nets.opts)],
                        "iter": done, "history": history, "rng": rng_state(nets.device), "args": settings(args)}, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch's writer says ENOSPC as "file write failed"
        if not (getattr(e, "errno", None) == errno.ENOSPC or "file write failed" in str(e)
                or "inline_container" in str(e)):
            raise
        run.close()  # the bar ends its line first
        fail(f"no space left on the device writing {path} at iteration {done}; {kept(path)}", code=1)


def kept(ckpt_path):
    return f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written"


def checkpoint_file(resume):
    return os.path.join(resume, "ckpt", "last.pt") if os.path.isdir(resume) else resume


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt["args"]
    except Exception as e:
        fail(f"--resume: cannot load {path} ({type(e).__name__}); give a ckpt/last.pt written by {SCRIPT} "
             "or its run folder")
    if not {"iter", "models"} <= set(ckpt):
        fail(f"--resume {path} is not a checkpoint of {SCRIPT} (it is another script's)")
    return ckpt


def restore(ckpt, nets, args):
    """Models, optimizers and RNG; an explicit --lr on resume is put in force, and the optimizers keep the
    kernels (fused, foreach) built for this device, not those of the device that wrote the checkpoint."""
    for module, opt, (m_state, o_state) in zip(nets.modules, nets.opts, ckpt["models"]):
        module.load_state_dict(m_state)
        groups = [{**saved, "lr": args.lr, "fused": built["fused"], "foreach": built["foreach"]}
                  for saved, built in zip(o_state["param_groups"], opt.param_groups)]
        opt.load_state_dict({**o_state, "param_groups": groups})  # before loading: it places "step" by them
    set_rng_state(ckpt["rng"], nets.device)
    return ckpt["iter"], ckpt["history"]


def open_run_folder(args, stack):
    """The run folder, locked for this process's life (until `stack` closes), with args.json written: the
    checkpoint's when resuming, which must lie in <run>/ckpt/, else a new one that must not hold a run already."""
    if args.resume:
        ckpt_dir = os.path.dirname(os.path.abspath(args.resume))
        run_dir = os.path.dirname(ckpt_dir)
        if os.path.basename(ckpt_dir) != "ckpt" or not os.path.isfile(os.path.join(run_dir, "args.json")):
            fail(f"--resume {args.resume}: not a run folder's checkpoint (<run>/ckpt/*.pt); copy it to "
                 "<run>/ckpt/last.pt")
    else:
        name = args.run_name or f"noise_morph__{args.dataset}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.out, name)
        if os.path.exists(os.path.join(run_dir, "args.json")):
            fail(f"--run-name: {run_dir} already holds a run; pass --resume {run_dir} to continue it, or another "
                 "--run-name")
        try:
            os.makedirs(os.path.join(run_dir, "ckpt"), exist_ok=True)
            os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        except OSError as e:
            fail(f"--out: cannot create the run folder {run_dir} ({e.strerror or type(e).__name__})")
    try:  # the first writes: a busy or read-only folder is refused here, before training
        lock = stack.enter_context(open(os.path.join(run_dir, ".lock"), "a"))
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with replacing(os.path.join(run_dir, "args.json")) as tmp, open(tmp, "w") as f:
            json.dump(settings(args), f, indent=1)
    except BlockingIOError:
        fail(f"{run_dir} is in use by another process")
    except OSError as e:
        fail(f"cannot write to the run folder {run_dir} ({e.strerror or type(e).__name__})")
    return run_dir


class RunLog:
    """One record, three places: metrics.jsonl (rewritten from the checkpoint's history on resume, so cut back to
    its step), TensorBoard and the progress bar (seconds of the budget under --max-time, else steps)."""

    def __init__(self, run_dir, history, total, budget=None):
        path = os.path.join(run_dir, "metrics.jsonl")
        with replacing(path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in history)
        self.file = open(path, "a")
        self.writer = self.bar = None
        self.budget = budget
        with suppress(ImportError):  # TensorBoard and the bar are optional
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(run_dir, purge_step=history[-1]["iter"] + 1 if history else None)
        with suppress(ImportError):
            from tqdm import tqdm
            initial = 0 if budget else history[-1]["iter"] if history else 0
            self.bar = tqdm(total=budget or total, initial=initial, unit="s" if budget else "it", dynamic_ncols=True)

    def log(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iter":
                    self.writer.add_scalar(k, v, record["iter"])
        if self.bar and "loss_critic" in record:
            self.bar.update((min(record["seconds"], self.budget) if self.budget else record["iter"]) - self.bar.n)
            self.bar.set_postfix(critic=f"{record['loss_critic']:.3f}", W=f"{record['wasserstein']:.3f}",
                                 img_s=f"{record['images_per_s']:.0f}")

    def close(self):
        self.file.close()
        for part in (self.writer, self.bar):
            if part:
                part.close()


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (what torchrun and schedulers send) and SIGHUP (a closed terminal, as SIGTERM).
    At start-up (`defer` false) a signal interrupts at once; in training the first asks to stop after the current
    step and a second stops at once (later ones are not raised again, so the way out stays one line). The first
    decides the exit code. Installed only where Python allows handlers (the main thread)."""

    def __init__(self):
        self.received, self.defer, self.leaving, self.saved = None, False, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.saved[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        first, self.received = self.received is None, self.received or signum
        if not (first and self.defer) and not self.leaving:
            self.leaving = True
            raise KeyboardInterrupt(self.received)

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- main
def setup(args):
    """Device, seeds and determinism."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available here; use --device cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.torch_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
    torch.use_deterministic_algorithms(args.torch_deterministic)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return device


def main(argv=None):
    """The whole run inside the signal handling, start-up included: every signal ends in one line."""
    with StopSignals() as signals, ExitStack() as stack:
        try:
            return train(argv, signals, stack)
        except KeyboardInterrupt as e:  # at start-up, or a second signal: out at once, mid-step
            signum = signals.received or (e.args[0] if e.args else signal.SIGINT)
            stack.close()  # the bar ends its line first
            interrupted(signum, f"and stopped at once by a second signal; {kept(signals.ckpt_path)}"
                        if signals.defer else "during start-up; nothing saved")


def train(argv, signals, stack):
    """Setup, one loop (train a step, check, log, sample, checkpoint, evaluate) and finish."""
    args = parse_args(argv)
    device = setup(args)
    inception = load_inception(args, device) if args.fid_every else None
    if args.dataset in TOY:
        real_ref = sample_toy(args.dataset, 1000, np.random.RandomState(args.seed + 1))
        next_real = lambda: sample_toy(args.dataset, args.batch_size).to(device)  # noqa: E731
    else:
        real_ref, images = None, load_mnist(args).to(device)
        test_images = load_mnist(args, train=False) if args.fid_every else None
        if args.fid_every and args.fid_samples > len(test_images):
            fail(f"--fid-samples {args.fid_samples} is more than the {len(test_images)} images of the MNIST test "
                 "split")
        next_real = lambda: images[torch.randint(len(images), (args.batch_size,), device=device)]  # noqa: E731
    nets = build_nets(args, device)
    generator, critic = nets.generator, nets.critic
    fixed_gen = torch.Generator().manual_seed(args.seed + 1)  # metrics on a fixed z, off the training RNG
    fixed_z = sample_z(args.eval_samples, args.latent_dim, "cpu", fixed_gen).to(device)
    run_dir = open_run_folder(args, stack)
    start, history = restore(load_checkpoint(args.resume), nets, args) if args.resume else (0, [])
    ckpt_path = os.path.join(run_dir, "ckpt", "last.pt")
    run = stack.enter_context(closing(RunLog(run_dir, history, args.iters, args.max_time)))
    bad = torch.full((), -1, dtype=torch.long, device=device)  # first iteration with a non-finite loss
    t_start = t_last = time.time()
    deadline = t_start + args.max_time if args.max_time else None
    it_last, done, stop = start, start, None
    signals.defer, signals.ckpt_path = True, ckpt_path  # from here a first signal stops after the step
    for it in range(start + 1, args.iters + 1):
        losses = train_step(nets, next_real, it, args)
        bad = torch.where((bad < 0) & ~torch.isfinite(losses).all(), it, bad)
        now, done = time.time(), it
        stop = "time" if deadline and now >= deadline else ("signal" if signals.received else None)
        last = it == args.iters or stop is not None
        fid = args.fid_every and (it % args.fid_every == 0 or last) and stop != "signal"
        log = fid or last or it % args.log_every == 0
        sample = last or (args.sample_every and it % args.sample_every == 0)
        save = last or fid or (args.ckpt_every and it % args.ckpt_every == 0)
        if not (log or sample or save):
            continue
        if int(bad) >= 0:
            run.close()
            fail(f"non-finite loss at iteration {int(bad)}; training stopped, {kept(ckpt_path)}", code=1)
        with eval_mode(generator):
            if log:
                scores = evaluate(generator, critic, nets.use_morph, fixed_z, args)
                rate = (it - it_last) * args.batch_size * args.critic_its / max(now - t_last, 1e-9)
                record = {"iter": it, **{k: v.item() for k, v in nets.stats.items()}, "lr": args.lr,
                          "images_per_s": rate, "seconds": now - t_start, **scores}
                t_last, it_last = now, it
                history.append(record)
                run.log(record)
            if sample:
                write_plots(run_dir, it, history, generator, critic, nets.use_morph, fixed_z, real_ref)
            if save:
                save_checkpoint(ckpt_path, nets, it, history, args, run)  # before the FID: it may fail
            if fid:
                history[-1].update(compute_fid(inception, generator, test_images, args, device, args.out))
                run.log({"iter": it, **{k: history[-1][k] for k in ("fid", "kid", "fid_n")}})
                save_checkpoint(ckpt_path, nets, it, history, args, run)
        if stop:
            break
    run.close()
    if signals.received:  # also one that came during the last step's figures, checkpoint or FID
        print(f"{SCRIPT}: {signal.Signals(signals.received).name} after iteration {done}: checkpoint written to "
              f"{ckpt_path}; continue with --resume {run_dir}", file=sys.stderr)
        raise SystemExit(exit_code(signals.received))  # 130 for Ctrl-C: a `train && next` chain stops here
    last = history[-1] if history else {}
    keys = ("wasserstein", "modes_covered", "hq_share", "manifold_dist", "morph_gap", "fid")
    extras = "".join(f", {k} {last[k]:.4g}" for k in keys if last.get(k) is not None)
    why = f"stopped on time (--max-time {args.max_time:g} s)" if stop == "time" else "done"
    try:
        print(f"{SCRIPT}: {why}: {done} generator steps in {time.time() - t_start:.0f}s{extras}; run folder {run_dir}",
              flush=True)
    except BrokenPipeError:  # stdout piped to a `head` that has exited: the run is complete, finish quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return run_dir


if __name__ == "__main__":
    main()
