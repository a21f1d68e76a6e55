"""WGAN-GP with ProGAN tricks on any folder of images, 64x64 and up (32 to 256).

Wasserstein GAN with gradient penalty (Gulrajani et al. 2017, arXiv 1704.00028) with the tricks of
Progressive GAN (Karras et al. 2018, arXiv 1710.10196) but not its progressive growing: pixel norm in the
generator, minibatch standard deviation in the critic, the drift term, an exponential moving average of the
generator, optional equalized learning rate; plus dropout in the critic, heavy augmentation and a piecewise
learning-rate schedule, as in the fish-generating notebook this script reproduces (seed 000).

Usage:
    python wgan_gp_64.py --data fish/ --critic-its 4
    python wgan_gp_64.py --data fish/ --lr-schedule seed --fid-every 5000 --fid-weights inception.pth
    python wgan_gp_64.py --data fish/ --image-size 32 --g-channels 32 --d-channels 32   # CPU-sized
    python wgan_gp_64.py --resume runs/<run>                     # continue exactly where it stopped
    python wgan_gp_64.py --resume runs/<run> --sample 10000      # write 10,000 PNGs for any FID tool
    torchrun --nproc_per_node 8 wgan_gp_64.py --data fish/       # data parallel, --batch-size per process

Where this departs from the paper or the seed notebook:
- The notebook drew the penalty's alpha from N(0, 1) (a bug inherited from an online example); here alpha ~ U(0, 1),
  one per sample. Its drift was 0.0005 * sum over the batch; here 0.001 * mean D(real)^2 (ProGAN's epsilon).
  Its critic dropout was 0.4; here 0.5, as its README says. It reused one real batch for all critic steps; here
  every critic step draws a fresh batch. It ran 4 critic steps; the default here is 5 (`--critic-its 4` = seed).
- The latent vector is pixel-normalised before the first layer, as in ProGAN.
- The EMA decay warms up as min(0.999, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage rule): with a
  constant 0.999 the average is still 37% the random initial weights after 1,000 steps, so early samples and FIDs
  would show noise. From step ~9,000 on it is the seed's 0.999; `--no-ema-warmup` gives the constant decay.
- Keras' `zoom_range=[0.95, 1.2]` divides coordinates, so images are scaled by 1/1.2 .. 1/0.95 here; its
  `fill_mode='nearest'` is reproduced by edge-padding before the affine transform and cropping after it.
- Real and fake images go through the critic in one forward pass (2N images); minibatch stddev is computed over
  each half apart, so it never mixes real with fake; the result equals two separate passes.
- An "epoch" of the learning-rate schedule is one pass of the critic over the data set (each critic step draws
  a batch), and the learning rate is set once per generator step (rand(a, b) draws a new one each step).
- Under torchrun the critic's and generator's gradients are all-reduced by hand after backward (as StyleGAN2-ADA
  does) instead of wrapping the models in DistributedDataParallel: DDP's reducer hooks and
  `autograd.grad(create_graph=True)` of the penalty do not mix reliably, and a plain all-reduce is exact and
  simple. Minibatch-stddev statistics are per process. Rank 0 alone writes logs, samples and checkpoints.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.utils import save_image

SCRIPT = Path(__file__).name
IMAGE_SIZES = (32, 64, 128, 256)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SEED_SCHEDULE = "100:1e-4,300:5e-5,400:rand(2e-5,6e-5),300:2.5e-5,1400:2e-5"
NOT_FROM_CONFIG = {"config", "resume", "run_name", "sample", "sample_out"}


def fail(message, code=2):
    print(f"{SCRIPT}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        fail(message)


def build_parser():
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", help="JSON or YAML file of flag values (a run's args.json works); command-line flags win")
    a("--data", help="folder of training images (searched recursively: jpg, png, bmp, webp)")
    a("--dataset", help="name used in the run name (default: the data folder's name)")
    a("--image-size", type=int, default=64, choices=IMAGE_SIZES, help="training resolution")
    a("--channels", type=int, default=3, choices=(1, 3), help="image channels (1 = grayscale)")
    a("--fit", default="crop", choices=("crop", "pad"), help="centre-crop to square, or mirror-pad to square")
    a("--latent-dim", type=int, default=256, help="size of z ~ N(0, I)")
    a("--g-channels", type=int, default=128, help="generator width")
    a("--d-channels", type=int, default=128, help="critic width (doubled from the 4x4 stage on)")
    a("--critic-dropout", type=float, default=0.5, help="dropout after every critic layer")
    a("--mbstd-group", type=int, default=4, help="minibatch-stddev group size (min(group, batch) is used; 1 = a constant channel, i.e. off)")
    a("--equalized-lr", action="store_true", help="N(0,1) weights scaled at run time by sqrt(2/fan_in)")
    a("--iters", type=int, default=100_000, help="generator steps")
    a("--batch-size", type=int, default=32, help="images per critic step (per process under torchrun)")
    a("--critic-its", type=int, default=5, help="critic steps per generator step, each on a fresh batch")
    a("--lr", type=float, default=1e-4, help="learning rate of both networks when no schedule is given")
    a("--lr-schedule", help=f"'epochs:lr,...' with rand(a,b) stages; 'seed' = {SEED_SCHEDULE}")
    a("--betas", type=float, nargs=2, default=(0.0, 0.99), help="Adam betas")
    a("--gp-lambda", type=float, default=10.0, help="gradient penalty weight")
    a("--drift", type=float, default=0.001, help="weight of mean D(real)^2 (ProGAN's drift term)")
    a("--ema", type=float, default=0.999, help="decay of the generator's moving average (0 disables)")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
      help="decay min(ema, (1+t)/(10+t)) at step t, so early samples are not the random initial weights")
    a("--augment", action=argparse.BooleanOptionalAction, default=True, help="all augmentation on/off")
    a("--rotation", type=float, default=25.0, help="max rotation in degrees")
    a("--shift-x", type=float, default=0.05, help="max horizontal shift, fraction of width")
    a("--shift-y", type=float, default=0.1, help="max vertical shift, fraction of height")
    a("--shear", type=float, default=10.0, help="max shear in degrees")
    a("--zoom", type=float, nargs=2, default=(0.95, 1.2), help="Keras zoom range (1 1 disables)")
    a("--brightness", type=float, nargs=2, default=(0.8, 1.4), help="brightness factor range (1 1 disables)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    a("--color-gain", type=float, default=0.4, help="per-channel gain ~ triangular(1-g, 1+g, mode 1)")
    a("--seed", type=int, default=1, help="random seed")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    a("--torch-deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    a("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    a("--out", default="runs", help="parent folder of run folders")
    a("--run-name", help="run folder name (default: <script>__<dataset>__<seed>__<unix time>)")
    a("--resume", help="checkpoint file or run folder to continue from")
    a("--sample-every", type=int, default=500, help="write a sample grid every N generator steps (0: off)")
    a("--ckpt-every", type=int, default=1000, help="write ckpt/last.pt every N generator steps (0: end only)")
    a("--log-every", type=int, default=50, help="log metrics every N generator steps")
    a("--num-workers", type=int, default=-1, help="DataLoader workers (-1: min(8, cores - 1))")
    a("--fid-every", type=int, default=0, help="FID/KID of the EMA generator every N steps (0: off)")
    a("--fid-samples", type=int, default=5000, help="images per side for FID/KID")
    a("--fid-weights", help="Inception weights for torch-fidelity (needed offline)")
    a("--sample", type=int, default=0, help="with --resume: write this many generated PNGs and exit")
    a("--sample-out", help="folder for --sample (default: <run>/generated)")
    return p


def parse_args(argv=None, overrides=None):
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    valid = {act.dest for act in parser._actions}
    for source, values in ((config, load_config(config) if config else {}), ("checkpoint", overrides or {})):
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - valid)
        if unknown:
            fail(f"{source}: unknown setting(s) {', '.join(unknown)}; see --help for the flags")
        parser.set_defaults(**{k: v for k, v in values.items() if k not in NOT_FROM_CONFIG})
    args = parser.parse_args(argv)
    check_args(args)
    return args


def load_config(path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        fail(f"--config {path}: cannot read it ({e.strerror})")
    try:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml  # optional: only YAML configs need it
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ImportError:
        fail(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give a JSON file")
    except Exception as e:
        fail(f"--config {path}: not valid {Path(path).suffix[1:] or 'JSON'} ({str(e).splitlines()[0]})")
    if not isinstance(values, dict):
        fail(f"--config {path}: expected a mapping of flag names to values")
    return values


def check_args(args):
    bad = [
        (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.critic_its < 1, f"--critic-its must be at least 1, got {args.critic_its}"),
        (args.iters < 0, "--iters must be 0 or more"),
        (args.lr <= 0, "--lr must be positive"),
        (not 0 <= args.ema < 1, "--ema must be in [0, 1)"),
        (not 0 <= args.critic_dropout < 1, "--critic-dropout must be in [0, 1)"),
        (min(args.gp_lambda, args.drift) < 0, "--gp-lambda and --drift must be 0 or more"),
        (min(args.latent_dim, args.g_channels, args.d_channels, args.mbstd_group) < 1,
         "--latent-dim, --g-channels, --d-channels and --mbstd-group must be at least 1"),
        (args.log_every < 1 or min(args.sample_every, args.ckpt_every, args.fid_every) < 0,
         "--log-every must be at least 1; --sample-every, --ckpt-every, --fid-every 0 or more"),
        (args.fid_samples < 2, "--fid-samples must be at least 2"),
        (min(args.rotation, args.shear) < 0 or not (0 <= args.shift_x < 1 and 0 <= args.shift_y < 1),
         "--rotation and --shear must be 0 or more, --shift-x and --shift-y in [0, 1)"),
        (not 0 < args.zoom[0] <= args.zoom[1], "--zoom needs 0 < low <= high"),
        (not 0 <= args.brightness[0] <= args.brightness[1], "--brightness needs 0 <= low <= high"),
        (not 0 <= args.color_gain < 1, "--color-gain must be in [0, 1)"),
        (args.sample < 0, "--sample must be 0 or more"),
    ]
    for is_bad, message in bad:
        if is_bad:
            fail(message)
    group = min(args.mbstd_group, args.batch_size)
    if args.batch_size % group:
        fail(f"--batch-size {args.batch_size} is not a multiple of the minibatch-stddev group size {group}; "
             f"use a multiple of {group} or change --mbstd-group")
    if args.lr_schedule:
        try:
            parse_schedule(args.lr_schedule)
        except ValueError as e:
            fail(f"--lr-schedule: {e}")


def parse_schedule(text):
    """'100:1e-4,400:rand(2e-5,6e-5)' -> [(100, 1e-4, 1e-4), (400, 2e-5, 6e-5)]; the last stage never ends."""
    text = SEED_SCHEDULE if text == "seed" else text
    stages = []
    for part in re.split(r",(?![^(]*\))", text):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(?:rand\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)|([^,()]+?))\s*", part)
        if not m:
            raise ValueError(f"cannot read stage {part.strip()!r}; write epochs:lr or epochs:rand(low,high), "
                             f"e.g. {SEED_SCHEDULE}")
        try:
            low, high = (float(m[2]), float(m[3])) if m[4] is None else (float(m[4]),) * 2
        except ValueError:
            raise ValueError(f"stage {part.strip()!r}: the learning rate is not a number") from None
        if int(m[1]) < 1 or not 0 < low <= high:
            raise ValueError(f"stage {part.strip()!r}: needs at least 1 epoch and 0 < low <= high")
        stages.append((int(m[1]), low, high))
    return stages


def lr_at(stages, epoch, rng=random):
    for epochs, low, high in stages:
        if epoch < epochs:
            break
        epoch -= epochs
    return low if low == high else rng.uniform(low, high)


# ----------------------------------------------------------------------------------------------- data
def find_images(root):
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def scan_folder(root):
    """The readable images under root; the unreadable ones are counted once, in one line."""
    if not root:
        fail("--data is required: pass the folder of training images, e.g. --data fish/")
    if not Path(root).is_dir():
        fail(f"--data {root}: no such folder")
    files, bad = [], 0
    for path in find_images(root):
        try:
            with Image.open(path) as im:
                im.verify()
            files.append(path)
        except Exception:
            bad += 1
    if not files:
        fail(f"--data {root}: no readable images (jpg, png, bmp, webp) in it or below it"
             + (f"; {bad} file(s) could not be read" if bad else ""))
    if bad:
        print(f"{SCRIPT}: skipped {bad} unreadable image file(s) of {bad + len(files)} under {root}")
    return files


def load_image(path, channels):
    """PIL image of `channels` bands with 8 bits each, whatever the file holds (16-bit, alpha, palette)."""
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit grayscale: convert() would clip, so rescale
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray((arr * (255 / peak)).round().clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "P", "PA"):  # composite transparency onto black
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
        return im.convert("RGB" if channels == 3 else "L")


def fit_square(im, size, mode):
    """Resize so the short side (crop) or long side (pad) is `size`, then centre-crop or mirror-pad."""
    w, h = im.size
    scale = size / (min(w, h) if mode == "crop" else max(w, h))
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(im)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    h, w = arr.shape[:2]
    if mode == "crop":
        top, left = (h - size) // 2, (w - size) // 2
        arr = arr[top:top + size, left:left + size]
    else:
        arr = np.pad(arr, (((size - h) // 2, (size - h + 1) // 2), ((size - w) // 2, (size - w + 1) // 2), (0, 0)),
                     mode="symmetric")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # uint8 [C, size, size]


class ChannelGain:
    """Multiply each channel by triangular(1 - g, 1 + g, mode 1), drawn from torch's RNG, then clip to [0, 1]."""

    def __init__(self, spread):
        self.spread = spread

    def __call__(self, x):
        u = torch.rand(x.shape[0], 1, 1)
        gain = torch.where(u < 0.5, (2 * u).sqrt() - 1, 1 - (2 - 2 * u).sqrt())  # symmetric triangle on [-1, 1]
        return (x * (1 + self.spread * gain)).clamp(0, 1)


def build_augment(args):
    size, steps = args.image_size, []
    if args.rotation or args.shift_x or args.shift_y or args.shear or tuple(args.zoom) != (1, 1):
        pad = size // 2  # edge padding = Keras' nearest fill for every border the affine map exposes
        frac = size / (size + 2 * pad)
        steps += [v2.Pad(pad, padding_mode="edge"),
                  v2.RandomAffine(args.rotation, translate=(args.shift_x * frac, args.shift_y * frac),
                                  scale=(1 / args.zoom[1], 1 / args.zoom[0]), shear=args.shear,
                                  interpolation=v2.InterpolationMode.BILINEAR),
                  v2.CenterCrop(size)]
    if tuple(args.brightness) != (1, 1):
        steps.append(v2.ColorJitter(brightness=tuple(args.brightness)))
    if args.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if args.color_gain:
        steps.append(ChannelGain(args.color_gain))
    return v2.Compose(steps) if args.augment and steps else None


class ImageFolder(torch.utils.data.Dataset):
    """Images fitted to a square, augmented with a per-sample seed, in [-1, 1].

    An item is (index, seed): the augmentation is a pure function of both, so the stream of batches does
    not depend on the number of workers and a resumed run sees exactly the batches a straight run would.
    """

    def __init__(self, files, args, augment=True):
        self.files, self.args = files, args
        self.augment = build_augment(args) if augment else None

    def __len__(self):
        return len(self.files)

    def uint8(self, index):
        return fit_square(load_image(self.files[index], self.args.channels), self.args.image_size, self.args.fit)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        try:
            x = self.uint8(index).float() / 255
        except OSError:  # passed the header check at start but is truncated: use its neighbour
            return self[((index + 1) % len(self), seed)]
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.augment(x)
        return x * 2 - 1


class Batches:
    """Endless batches of (index, augmentation seed) from a DistributedSampler reseeded every epoch,
    starting after `start` batches, so that the stream is a function of (seed, rank, world, position)."""

    def __init__(self, dataset, batch_size, seed, rank, world, start=0):
        self.sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed,
                                                           drop_last=True)
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.per_epoch = len(self.sampler) // batch_size

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for b in range(skip, self.per_epoch):
                chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield [(i, hash((self.seed, epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF) for i in chunk]
            epoch, skip = epoch + 1, 0


# --------------------------------------------------------------------------------------------- models
class Scaled(nn.Module):
    """Weight of fan-in `fan_in`: He-initialised, or with --equalized-lr N(0, 1) times gain/sqrt(fan_in) at run time."""

    def __init__(self, shape, fan_in, gain, equalized):
        super().__init__()
        he = gain / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.randn(shape) * (1.0 if equalized else he))
        self.bias = nn.Parameter(torch.zeros(shape[0]))
        self.scale = he if equalized else 1.0

    def scaled_weight(self):
        return self.weight * self.scale if self.scale != 1.0 else self.weight


class Conv(Scaled):
    """k x k conv; stride 1 keeps the size ('same', asymmetric for even k), stride 2 halves it."""

    def __init__(self, cin, cout, k, stride=1, gain=math.sqrt(2), equalized=False):
        super().__init__((cout, cin, k, k), cin * k * k, gain, equalized)
        self.stride = stride
        self.pad = ((k - 1) // 2, k // 2) if stride == 1 else ((k - stride) // 2, (k - stride + 1) // 2)

    def forward(self, x):
        lo, hi = self.pad
        if lo != hi:
            x, lo = F.pad(x, (lo, hi, lo, hi)), 0
        return F.conv2d(x, self.scaled_weight(), self.bias, self.stride, lo)


class Dense(Scaled):
    def __init__(self, cin, cout, gain=math.sqrt(2), equalized=False):
        super().__init__((cout, cin), cin, gain, equalized)

    def forward(self, x):
        return F.linear(x, self.scaled_weight(), self.bias)


def pixel_norm(x, eps=1e-8):
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


class PixelNorm(nn.Module):
    def forward(self, x):
        return pixel_norm(x)


def minibatch_stddev(x, group_size=4, groups=1):
    """ProGAN's minibatch stddev as one extra channel, computed within each of `groups` equal parts of the
    batch (real, fake and interpolates go through one pass but are never mixed). Groups take strided members."""
    n, c, h, w = x.shape
    per = n // groups
    g = min(group_size, per)
    if per * groups != n or per % g:
        raise ValueError(f"minibatch stddev: a batch of {per} is not a multiple of the group size {g}")
    y = x.float().reshape(groups, g, per // g, c, h, w)
    std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(2, 3, 4))  # [groups, per // g]
    std = std.to(x.dtype).view(groups, 1, per // g, 1, 1, 1).expand(groups, g, per // g, 1, h, w)
    return torch.cat([x, std.reshape(n, 1, h, w)], dim=1)


class Generator(nn.Module):
    """z -> 8x8, two convs; per doubling: nearest upsample + 5x5 conv (two at the second-to-last size); to RGB."""

    def __init__(self, args):
        super().__init__()
        c, eq = args.g_channels, args.equalized_lr
        self.c = c
        self.fc = Dense(args.latent_dim, c * 8 * 8, equalized=eq)
        act = [PixelNorm(), nn.LeakyReLU(0.2)]
        layers = act + [Conv(c, c, 5, equalized=eq), *act, Conv(c, c, 4, equalized=eq), *act]
        doublings = int(math.log2(args.image_size // 8))
        for i in range(doublings):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            for _ in range(2 if i == doublings - 2 else 1):
                layers += [Conv(c, c, 5, equalized=eq), *act]
        layers += [Conv(c, args.channels, 5, gain=1.0, equalized=eq), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.fc(pixel_norm(z)).view(-1, self.c, 8, 8))


class Critic(nn.Module):
    """5x5 conv; stride-2 4x4 convs down to 4x4 (3x3 convs at 16 and 4); minibatch stddev; linear to 1."""

    def __init__(self, args):
        super().__init__()
        c, eq, p = args.d_channels, args.equalized_lr, args.critic_dropout
        self.group_size = args.mbstd_group
        act = [nn.LeakyReLU(0.2)] + ([nn.Dropout(p)] if p else [])
        layers, res, cin = [Conv(args.channels, c, 5, equalized=eq), *act], args.image_size, c
        while res > 4:
            res, cout = res // 2, (2 * c if res == 8 else c)
            layers += [Conv(cin, cout, 4, stride=2, equalized=eq), *act]
            cin = cout
            if res in (16, 4):
                layers += [Conv(cin, cin, 3, equalized=eq), *act]
        self.features = nn.Sequential(*layers)
        self.head = Dense((cin + 1) * 16, 1, gain=1.0, equalized=eq)

    def forward(self, x, groups=1):
        x = minibatch_stddev(self.features(x), self.group_size, groups)
        return self.head(x.flatten(1)).squeeze(1)


# ---------------------------------------------------------------------------------------------- losses
def interpolate(real, fake):
    alpha = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    return torch.lerp(real, fake, alpha).requires_grad_(True)  # real + alpha * (fake - real)


def gradient_penalty(critic, real, fake):
    """mean((||dD/dx_hat||_2 - 1)^2), the norm over all non-batch dimensions; keeps the graph for backward."""
    x_hat = interpolate(real, fake.detach())
    (grad,) = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def sync_gradients(module):
    """Average gradients over processes (torchrun); a no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def critic_step(generator, critic, opt_critic, real, args):
    """One critic update: -(D(real) - D(fake)) + lambda * GP + drift * D(real)^2.

    Real and fake share one pass (minibatch stddev per half); the interpolates get their own, so that the
    penalty's double backward runs over N images, not 3N (a single 3N pass measured 1.2-2.1x slower on CPU)."""
    n = real.shape[0]
    z = torch.randn(n, args.latent_dim, device=real.device)
    with torch.no_grad(), autocast(real.device, args.amp):
        fake = generator(z).to(real.dtype)
    with autocast(real.device, args.amp):
        d_real, d_fake = critic(torch.cat([real, fake]), groups=2).float().split(n)
        gp = gradient_penalty(critic, real, fake) if args.gp_lambda else torch.zeros((), device=real.device)
    wasserstein = d_real.mean() - d_fake.mean()
    drift = d_real.square().mean()
    loss = -wasserstein + args.gp_lambda * gp + args.drift * drift
    opt_critic.zero_grad(set_to_none=True)
    loss.backward()
    sync_gradients(critic)
    opt_critic.step()
    return {"loss_critic": loss.detach(), "wasserstein": wasserstein.detach(), "gp": gp.detach(),
            "drift": drift.detach()}


def generator_step(generator, critic, opt_generator, args):
    device = next(generator.parameters()).device
    z = torch.randn(args.batch_size, args.latent_dim, device=device)
    critic.requires_grad_(False)  # no critic weight gradients are needed here
    with autocast(device, args.amp):
        loss = -critic(generator(z)).float().mean()
    opt_generator.zero_grad(set_to_none=True)
    loss.backward()
    critic.requires_grad_(True)
    sync_gradients(generator)
    opt_generator.step()
    return {"loss_gen": loss.detach()}


@torch.no_grad()
def update_ema(ema, generator, decay):
    params, ema_params = list(generator.parameters()), list(ema.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


# ------------------------------------------------------------------------------------------ checkpoint
def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                     *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    path = path / "ckpt" / "last.pt" if path.is_dir() else path
    if not path.is_file():
        fail(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"generator", "critic", "args", "iteration"} <= set(ckpt)
    except Exception as e:
        fail(f"--resume {path}: not a readable checkpoint of this script ({type(e).__name__}); "
             "it may be truncated: use an earlier copy or start afresh")
    return ckpt


# ------------------------------------------------------------------------------------------- artifacts
@torch.no_grad()
def generate(generator, z, batch=256):
    return torch.cat([generator(part).float().clamp(-1, 1).cpu() for part in z.split(batch)])


def to_uint8_rgb(x):
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def slerp(a, b, t):
    omega = torch.arccos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    if omega < 1e-6:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def write_interpolation(generator, args, path, device):
    """4 x 10 walk around a loop through four latent points (row k goes from point k to point k+1)."""
    points = torch.randn(4, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    ts = torch.linspace(0, 1, 10)
    z = torch.stack([slerp(points[k], points[(k + 1) % 4], t) for k in range(4) for t in ts]).to(device)
    save_image(generate(generator, z), path, nrow=10, normalize=True, value_range=(-1, 1))


def write_nearest_neighbours(generator, files, args, path, device, count=256):
    """Histogram of RMS pixel distances to the nearest neighbour: real-real, fake-fake and fake-to-real.
    Fake-to-real far below real-real means the generator copies training images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = ImageFolder(files, args, augment=False)
    count = min(count, len(data))
    real = torch.stack([data[i] for i in np.linspace(0, len(data) - 1, count).astype(int)]).flatten(1)
    fake = generate(generator, torch.randn(count, args.latent_dim, device=device)).flatten(1)
    scale = math.sqrt(real.shape[1])

    def nearest(a, b, same):
        d = torch.cdist(a.double(), b.double())
        if same:
            d.fill_diagonal_(float("inf"))
        return (d.min(dim=1).values / scale).numpy()

    distances = {"real-real": nearest(real, real, True), "fake-fake": nearest(fake, fake, True),
                 "fake-real": nearest(fake, real, False)}
    bins = np.linspace(min(map(np.min, distances.values())), max(map(np.max, distances.values())), 41)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in distances.items():
        ax.hist(d, bins=bins, alpha=0.5, label=f"{name} (median {np.median(d):.3f})")
    ax.set(xlabel="RMS pixel distance to nearest neighbour ([-1, 1] scale)", ylabel="images",
           title=f"nearest neighbours, {count} real and {count} generated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_gif(sample_dir, path):
    frames = [Image.open(p) for p in sorted(Path(sample_dir).glob("iter_*.png"))]
    if frames:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)


class Uint8Images(torch.utils.data.Dataset):
    """What torch-fidelity takes: uint8 [3, H, W] tensors."""

    def __init__(self, images=None, folder=None):
        self.images, self.folder = images, folder

    def __len__(self):
        return len(self.images) if self.images is not None else len(self.folder)

    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i]
        x = self.folder.uint8(i)
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def compute_fid(generator, files, args, device):
    """FID and KID of the generator against up to --fid-samples training images (fitted, not augmented)."""
    import torch_fidelity
    n = min(args.fid_samples, len(files))
    real_files = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]
    key = hashlib.sha1(f"{Path(args.data).resolve()}|{args.image_size}|{args.channels}|{args.fit}|{n}".encode())
    fake = to_uint8_rgb(generate(generator, torch.randn(n, args.latent_dim, device=device)))
    metrics = torch_fidelity.calculate_metrics(
        input1=Uint8Images(fake), input2=Uint8Images(folder=ImageFolder(real_files, args, augment=False)),
        input2_cache_name=f"real-{key.hexdigest()[:16]}", cache_root=str(Path(args.out) / ".fid_cache"),
        cache=True, fid=True, kid=True, kid_subset_size=min(1000, n), cuda=device.type == "cuda",
        feature_extractor_weights_path=args.fid_weights, verbose=False, batch_size=min(100, n),
        save_cpu_ram=device.type != "cuda")  # in-memory fakes: loader workers only thrash a CPU
    return {"fid": metrics["frechet_inception_distance"], "kid": metrics["kernel_inception_distance_mean"],
            "fid_n": n}


# ------------------------------------------------------------------------------------------------ main
def setup_device(args):
    """The device, and this process's rank and the world size (under torchrun: NCCL on CUDA, gloo on CPU)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is visible; use --device cpu")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device, rank, world


def sample_mode(args, device, ckpt):
    generator = Generator(args).to(device)
    generator.load_state_dict(ckpt["ema"] if ckpt.get("ema") else ckpt["generator"])
    generator.eval()
    out = Path(args.sample_out or Path(args.out) / args.run_name / "generated")
    out.mkdir(parents=True, exist_ok=True)
    z = torch.randn(args.sample, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    written = 0
    for part in z.split(256):
        for img in generate(generator, part.to(device)):
            save_image(img, out / f"{written:06d}.png", normalize=True, value_range=(-1, 1))
            written += 1
    print(f"wrote {written} images to {out}")


def main(argv=None):
    args = parse_args(argv)
    ckpt = None
    if args.resume:  # the checkpoint's settings, with what the command line says on top
        ckpt = load_checkpoint(args.resume)
        args = parse_args(argv, overrides=ckpt["args"])
        args.run_name = ckpt["args"]["run_name"]
    device, rank, world = setup_device(args)
    if args.amp and device.type != "cuda":
        print(f"{SCRIPT}: --amp needs CUDA; training in float32 on {device}")
        args.amp = False
    if args.sample:
        if ckpt is None:
            fail("--sample needs --resume CHECKPOINT (or run folder) to sample from")
        return sample_mode(args, device, ckpt)
    files = scan_folder(args.data)
    if args.batch_size * world > len(files):
        fail(f"--batch-size {args.batch_size} x {world} process(es) is more than the {len(files)} images in "
             f"{args.data}; use a smaller --batch-size")
    args.dataset = args.dataset or Path(args.data).resolve().name
    args.run_name = args.run_name or f"{Path(SCRIPT).stem}__{args.dataset}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.out) / args.run_name
    lead = rank == 0

    if args.torch_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    generator = Generator(args).to(device, memory_format=memory)
    critic = Critic(args).to(device, memory_format=memory)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if args.ema else None
    adam = dict(lr=args.lr, betas=tuple(args.betas), eps=1e-8, fused=device.type == "cuda")
    opt_g, opt_d = torch.optim.Adam(generator.parameters(), **adam), torch.optim.Adam(critic.parameters(), **adam)
    start, images_seen = 0, 0
    torch.manual_seed(args.seed + rank)  # different noise per rank
    if ckpt is not None:
        generator.load_state_dict(ckpt["generator"])
        critic.load_state_dict(ckpt["critic"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        opt_g.load_state_dict(ckpt["opt_generator"])
        opt_d.load_state_dict(ckpt["opt_critic"])
        start, images_seen = ckpt["iteration"], ckpt["images_seen"]
        states = ckpt["rng"]
        set_rng_state(states[rank] if len(states) == world else states[0])
        if len(states) != world:  # resumed under another process count: fresh, distinct noise per rank
            torch.manual_seed(args.seed + 7919 * start + rank)
    stages = parse_schedule(args.lr_schedule) if args.lr_schedule else None

    data = ImageFolder(files, args)
    batches = Batches(data, args.batch_size, args.seed, rank, world, images_seen // (args.batch_size * world))
    workers = args.num_workers if args.num_workers >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))
    loader = iter(torch.utils.data.DataLoader(
        data, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
        generator=torch.Generator()))  # its own generator: creating the loader must not draw from the global RNG
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)

    writer, bar = None, None
    if lead:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir), purge_step=start or None)
        except ImportError:
            print(f"{SCRIPT}: tensorboard is not installed; logging to metrics.jsonl only")
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.iters, initial=start, dynamic_ncols=True, desc=args.run_name[:40])
        except ImportError:
            pass
        print(f"{SCRIPT}: {len(files)} images, batch {args.batch_size} x {world} process(es) = "
              f"{args.batch_size * world} per critic step, {device}, run folder {run_dir}")

    def state(iteration, seen):
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        return {"generator": generator.state_dict(), "critic": critic.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "opt_generator": opt_g.state_dict(),
                "opt_critic": opt_d.state_dict(), "iteration": iteration, "images_seen": seen, "rng": rngs,
                "args": vars(args)}

    def check_finite(first_bad):
        if world > 1:
            dist.all_reduce(first_bad, dist.ReduceOp.MAX)
        if first_bad.item() >= 0:
            last = run_dir / "ckpt" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            fail(f"non-finite loss at iteration {first_bad.item()}; training stopped, {kept}", code=1)

    keys = ("loss_critic", "wasserstein", "gp", "drift", "loss_gen")
    totals = torch.zeros(len(keys), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    logged, t_start, t_log = 0, time.time(), time.time()
    lr = args.lr
    iteration = start
    try:
        for iteration in range(start + 1, args.iters + 1):
            if stages:
                lr = lr_at(stages, images_seen // (batches.per_epoch * args.batch_size * world))
                for group in opt_g.param_groups + opt_d.param_groups:
                    group["lr"] = lr
            for _ in range(args.critic_its):
                real = next(loader).to(device, non_blocking=True, memory_format=memory)
                stats = critic_step(generator, critic, opt_d, real, args)
                images_seen += args.batch_size * world
            stats.update(generator_step(generator, critic, opt_g, args))
            if ema is not None:
                decay = min(args.ema, iteration / (iteration + 9)) if args.ema_warmup else args.ema
                update_ema(ema, generator, decay)
            values = torch.stack([stats[k] for k in keys])
            totals += values
            first_bad = torch.where((first_bad < 0) & ~values.isfinite().all(), iteration, first_bad)
            logged += 1
            last_step = iteration == args.iters
            if iteration % args.log_every == 0 or last_step:
                check_finite(first_bad)
                now = time.time()
                record = {"iter": iteration, **dict(zip(keys, (totals / logged).tolist())), "lr": lr,
                          "epoch": images_seen / (batches.per_epoch * args.batch_size * world),
                          "images_per_s": logged * args.critic_its * args.batch_size * world / (now - t_log),
                          "global_batch": args.batch_size * world, "seconds": now - t_start}
                totals.zero_()
                logged, t_log = 0, now
                if lead:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer:
                        for k, v in record.items():
                            if k != "iter":
                                writer.add_scalar(f"train/{k}", v, iteration)
                    if bar:
                        bar.set_postfix(loss_d=f"{record['loss_critic']:.3f}", W=f"{record['wasserstein']:.3f}",
                                        img_s=f"{record['images_per_s']:.0f}")
            if bar:
                bar.update(1)
            shown = ema if ema is not None else generator
            if lead and args.sample_every and (iteration % args.sample_every == 0 or last_step):
                save_image(generate(shown, fixed_z), run_dir / "samples" / f"iter_{iteration:06d}.png",
                           nrow=8, normalize=True, value_range=(-1, 1))
            if lead and args.fid_every and (iteration % args.fid_every == 0 or last_step):
                fid = compute_fid(shown, files, args, device)
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"iter": iteration, **fid}) + "\n")
                if writer:
                    writer.add_scalar("eval/fid", fid["fid"], iteration)
                    writer.add_scalar("eval/kid", fid["kid"], iteration)
                print(f"iteration {iteration}: FID {fid['fid']:.2f}, KID {fid['kid']:.4f} (n = {fid['fid_n']})")
            if (args.ckpt_every and iteration % args.ckpt_every == 0) or last_step:
                check_finite(first_bad)
                snapshot = state(iteration, images_seen)
                if lead:
                    save_checkpoint(run_dir / "ckpt" / "last.pt", snapshot)
    except KeyboardInterrupt:
        check_finite(first_bad)
        if lead:
            save_checkpoint(run_dir / "ckpt" / "last.pt", state(iteration, images_seen))
            print(f"\ninterrupted at iteration {iteration}; checkpoint written to {run_dir / 'ckpt' / 'last.pt'}")
        return
    finally:
        if bar:
            bar.close()
    if lead:
        final = ema if ema is not None else generator
        write_gif(run_dir / "samples", run_dir / "progress.gif")
        write_interpolation(final, args, run_dir / "interpolation.png", device)
        try:
            write_nearest_neighbours(final, files, args, run_dir / "nearest_neighbours.png", device)
        except ImportError:
            print(f"{SCRIPT}: matplotlib is not installed; skipped nearest_neighbours.png")
        if writer:
            writer.close()
        print(f"done: {args.iters} iterations in {time.time() - t_start:.0f} s; run folder {run_dir}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
