"""WGAN-GP with ProGAN tricks on any folder of images, 64x64 and up (32 to 256).

Wasserstein GAN with gradient penalty (Gulrajani et al. 2017, arXiv 1704.00028) with the tricks of
Progressive GAN (Karras et al. 2018, arXiv 1710.10196): pixel norm in the generator, minibatch standard
deviation in the critic, the drift term, an exponential moving average of the generator, optional equalized
learning rate, optional progressive growing (`--grow`); plus dropout in the critic, heavy augmentation and a piecewise
learning-rate schedule, as in the fish-generating notebook this script reproduces (seed 000).

Usage:
    python wgan_gp_64.py --data fish/ --critic-its 4
    python wgan_gp_64.py --data fish/ --lr-schedule seed --fid-every 5000 --fid-weights inception.pth
    python wgan_gp_64.py --data fish/ --image-size 32 --g-channels 32 --d-channels 32   # CPU-sized
    python wgan_gp_64.py --data fish/ --grow 16:2000,32:6000,64 --fade 1000     # grown 16 -> 32 -> 64 px
    python wgan_gp_64.py --resume runs/<32px run> --image-size 64 --grow 32:<its steps>,64   # seed 000's way
    python wgan_gp_64.py --resume runs/<run>                     # continue exactly where it stopped
    python wgan_gp_64.py --resume runs/<run> --sample 10000      # write 10,000 PNGs for any FID tool
    torchrun --nproc_per_node 8 wgan_gp_64.py --data fish/       # data parallel, --batch-size per process

Where this departs from the paper or the seed notebook (why: docs/wgan_gp_64.md, implementation details):
- The seed's penalty alpha N(0, 1) is U(0, 1) per sample; its drift 0.0005 * sum is ProGAN's 0.001 * mean D(real)^2;
  its dropout 0.4 is 0.5 (its README's); each critic step draws a fresh batch (the seed reused one for all 4).
- The latent vector is pixel-normalised before the first layer (ProGAN).
- `--grow`: one 5x5 conv per new resolution (ProGAN: two 3x3), stage lengths in generator steps, not images.
- EMA decay min(0.999, (1 + t) / (10 + t)) (TensorFlow's warm-up; t restarts at each doubling under --grow).
- Keras' zoom_range is matched (scale 1/1.2 .. 1/0.95), with one factor for both axes.
- Real and fake go through the critic in one pass of 2N images, minibatch stddev within each half.
- A schedule "epoch" is one pass of the critic over the data; the lr is set once per generator step.
- Under torchrun the gradients are all-reduced by hand (DDP does not take the penalty's double backward).
- Longer than SPEC's 300-700 lines: torchrun, exact resume, --max-time and signals, config files, safe decoding,
  in-run FID and the end-of-run figures.
"""
import argparse
import contextlib
import copy
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from PIL import Image, ImageOps
    from torchvision.transforms import v2
    from torchvision.utils import save_image
except KeyboardInterrupt:  # Ctrl-C while torch loads: no traceback
    print("wgan_gp_64.py: interrupted while starting", file=sys.stderr)
    raise SystemExit(130)

SCRIPT = Path(__file__).name
IMAGE_SIZES = (32, 64, 128, 256)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SEED_SCHEDULE = "100:1e-4,300:5e-5,400:rand(2e-5,6e-5),300:2.5e-5,1400:2e-5"
LOGGED = ("loss_critic", "wasserstein", "gp", "drift", "loss_gen")
CPU_RECIPE = ("--image-size 64 --g-channels 32 --d-channels 32 --batch-size 16 --critic-its 1 --critic-dropout 0 "
              "--lr 8e-4 --gp-every 4 --no-augment --grow 16:4500,32:6500,64 --fade 500 --slim-above 32 --ema 0.9999 "
              "--max-time 2h")  # RESULTS.md; the hint adds --amp where it pays
CACHE_BYTES = 2 * 2 ** 30  # --cache-images holds at most this much uint8 image data per process
AGREE_EVERY = 10  # under torchrun the ranks compare stop requests every this many steps: each compare waits for the GPU
NOT_FROM_FILES = {"config", "resume", "run_name", "sample", "sample_out"}  # said on the command line only
NETWORK = ("image_size", "channels", "latent_dim", "g_channels", "d_channels", "equalized_lr", "grow",
           "slim_above")  # in a checkpoint

# ---------------------------------------------------------------------------------------------- flags
def fail(message, code=2):
    print(f"{SCRIPT}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def say(text):
    """A line on stdout; once its reader is gone (piped to `head`), stdout goes to /dev/null and the run goes on."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def atomic(path):
    """A temporary file beside `path` that replaces it only when complete: a kill or a signal mid-write leaves
    the old file (or none), never a partial one."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
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
    p = Parser(description=__doc__.split("\n")[0], formatter_class=Help)
    a, on_off = p.add_argument, argparse.BooleanOptionalAction
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
    a("--mbstd-group", type=int, default=4, help="minibatch-stddev group size (min(group, batch); 1: off)")
    a("--equalized-lr", action="store_true", help="N(0,1) weights scaled at run time by sqrt(2/fan_in)")
    a("--grow", help="progressive growing: resolutions, each but the last with its length in generator steps, "
      "the last = --image-size until the end (e.g. 16:2000,32:6000,64; none: --image-size from the start)")
    a("--slim-above", type=int, default=0, choices=(0, 8, 16, 32, 64, 128), help="with --grow: each resolution "
      "above this one gets half the channels of the one below and 3x3 convs (ProGAN's halving; 0: off)")
    a("--fade", type=int, default=1000, help="with --grow: generator steps over which each new resolution fades in")
    a("--iters", type=int, default=100_000, help="generator steps")
    a("--max-time", type=duration, help="wall-clock budget, ends the step that crosses it (90s, 30m, 2h; none: off)")
    a("--batch-size", type=int, default=32, help="images per critic step (per process under torchrun)")
    a("--critic-its", type=int, default=5, help="critic steps per generator step, each on a fresh batch")
    a("--lr", type=float, default=1e-4, help="learning rate of both networks when no schedule is given")
    a("--lr-schedule", help=f"'epochs:lr,...' with rand(a,b) stages; 'seed' = {SEED_SCHEDULE}")
    a("--betas", type=float, nargs=2, default=(0.0, 0.99), help="Adam betas")
    a("--gp-lambda", type=float, default=10.0, help="gradient penalty weight")
    a("--gp-every", type=int, default=1, help="lazy penalty: only every K-th critic step pays it, weighted lambda * K")
    a("--drift", type=float, default=0.001, help="weight of mean D(real)^2 (ProGAN's drift term)")
    a("--ema", type=float, default=0.999, help="decay of the generator's moving average (0 disables)")
    a("--ema-warmup", action=on_off, default=True, help="decay min(ema, (1+t)/(10+t)) at step t of the run (of the "
      "stage under --grow), so that early samples are not the initial weights")
    a("--augment", action=on_off, default=True, help="all augmentation on/off")
    a("--rotation", type=float, default=25.0, help="max rotation in degrees")
    a("--shift-x", type=float, default=0.05, help="max horizontal shift, fraction of width")
    a("--shift-y", type=float, default=0.1, help="max vertical shift, fraction of height")
    a("--shear", type=float, default=10.0, help="max shear in degrees")
    a("--zoom", type=float, nargs=2, default=(0.95, 1.2), help="Keras zoom range, one factor for both axes (1 1: off)")
    a("--brightness", type=float, nargs=2, default=(0.8, 1.4), help="brightness factor range (1 1 disables)")
    a("--hflip", action=on_off, default=True, help="random horizontal flips")
    a("--color-gain", type=float, default=0.4, help="per-channel gain ~ triangular(1-g, 1+g, mode 1)")
    a("--seed", type=int, default=1, help="random seed")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    a("--torch-deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    a("--amp", action="store_true", help="bf16 autocast (the penalty stays float32 on a CPU); on a CPU it pays only "
      "where torch.ops.mkldnn._is_mkldnn_bf16_supported() is True (1.5-1.8x the steps: bench/RESULTS.md)")
    a("--out", default="runs", help="parent folder of run folders")
    a("--run-name", help="run folder name (default: <script>__<dataset>__<seed>__<unix time>)")
    a("--resume", help="checkpoint file or run folder to continue from")
    a("--sample-every", type=int, default=500, help="write a sample grid every N generator steps (0: off)")
    a("--ckpt-every", type=int, default=1000, help="write ckpt/last.pt every N generator steps (0: end only)")
    a("--log-every", type=int, default=50, help="log metrics every N generator steps")
    a("--num-workers", type=int, default=-1, help="DataLoader workers (-1: min(8, cores - 1))")
    a("--cache-images", action=on_off, default=True, help="decode every image once, keep it in memory (up to 2 GiB)")
    a("--fid-every", type=int, default=0, help="FID/KID of the EMA generator every N steps (0: off)")
    a("--fid-samples", type=int, default=5000, help="images per side for FID/KID")
    a("--fid-weights", help="Inception weights for torch-fidelity (needed offline; none: download)")
    a("--sample", type=int, default=0, help="with --resume: write this many generated PNGs and exit")
    a("--sample-out", help="folder for --sample (default: <run>/generated)")
    return p


def parse_args(argv=None):
    """The command line over a config file over a resumed checkpoint's settings, all through argparse, so that
    every type, choice and check applies to each. With --resume, args.resume is the checkpoint file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, tokens, saved, done = parser.parse_args(argv), [], {}, 0
    if args.resume:
        args.resume = str(checkpoint_file(args.resume))
        ckpt = load_checkpoint(args.resume)
        saved, done = ckpt["args"], ckpt["iteration"]
        tokens += as_flags(saved, f"--resume {args.resume}", parser)
    if args.config:
        tokens += as_flags(read_config(args.config), f"--config {args.config}", parser)
    if tokens:
        resume = args.resume
        args = parser.parse_args(tokens + argv)
        args.resume = resume
    check_args(args)
    first = parse_grow(args.grow, args.image_size)[0] if args.grow else None
    bigger = first and saved.get("grow") is None and first[0] == saved.get("image_size")  # a run grown further
    for key in NETWORK:  # the weights would not load, or (--equalized-lr) load rescaled
        grown = bigger and key in ("image_size", "grow", "slim_above")
        if key in saved and getattr(args, key) != saved[key] and not grown:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the checkpoint's {saved[key]}: "
                 "the networks cannot change on --resume (but for growing a run: --image-size with --grow); "
                 "start a new run for it")
    if bigger and first[1] < done:
        fail(f"--grow {args.grow}: its {first[0]} px stage ends at step {first[1]}, before the checkpoint's "
             f"{done}; write --grow {first[0]}:{done},... to grow the run from where it is")
    return args


def as_flags(values, source, parser):
    """A dict of flag values (config file or checkpoint settings) as command-line tokens."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = sorted(str(k) for k in values if str(k).replace("-", "_") not in actions)
    if unknown and source.startswith("--resume"):
        fail(f"{source} is not a checkpoint of {SCRIPT}: it has settings this script does not have "
             f"({', '.join(unknown[:4])})")
    if unknown:
        fail(f"{source}: unknown setting(s) {', '.join(unknown)}; see --help for the flags")
    tokens = []
    for key, value in values.items():
        action = actions[str(key).replace("-", "_")]
        flag, switch = action.option_strings[0], isinstance(action, argparse.BooleanOptionalAction)
        boolean = switch or isinstance(action, argparse._StoreTrueAction)
        if action.dest in NOT_FROM_FILES or value is None:
            continue
        if boolean and not isinstance(value, bool):
            fail(f"{source}: {flag} takes true or false, got {value!r}")
        if boolean:
            tokens += [flag if value else "--no-" + flag[2:]] if switch else [flag] * value
        else:
            tokens += [flag, *map(str, value if action.nargs and isinstance(value, (list, tuple)) else [value])]
    return tokens


def read_config(path):
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
    for low, names in ((1, "batch_size critic_its gp_every latent_dim g_channels d_channels mbstd_group log_every"),
                       (0, "iters fade gp_lambda drift rotation shear sample_every ckpt_every fid_every sample"),
                       (2, "fid_samples")):
        for name in names.split():
            if not getattr(args, name) >= low:  # not `<`: NaN is caught too
                fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("ema", "critic_dropout", "shift_x", "shift_y", "color_gain"):
        if not 0 <= getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for is_bad, message in [
            (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
            (not all(0 <= b < 1 for b in args.betas), f"--betas must each be in [0, 1), got {args.betas}"),
            (not 0 < args.zoom[0] <= args.zoom[1], "--zoom needs 0 < low <= high"),
            (not 0 <= args.brightness[0] <= args.brightness[1], "--brightness needs 0 <= low <= high"),
            (not 0 <= args.seed < 2 ** 32, f"--seed must be in [0, 2^32), got {args.seed}"),
            (args.slim_above and not args.grow, f"--slim-above {args.slim_above} slims the layers --grow adds; "
                                                "give --grow too")]:
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
    if args.grow:
        try:
            stages = parse_grow(args.grow, args.image_size)
        except ValueError as e:
            fail(f"--grow {args.grow}: {e}")
        for res, steps in stages[1:-1]:
            if steps < args.fade:
                fail(f"--grow {args.grow}: the {res} px stage ({steps} steps) is shorter than its --fade {args.fade}")


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


@functools.cache  # growth() asks at every step
def parse_grow(text, image_size):
    """'16:2000,32:6000,64' -> ((16, 2000), (32, 6000), (64, None)): resolutions, each with its length in generator
    steps (what --iters and a checkpoint count: a resume lands in the same place of a fade), the last to the end."""
    parts, stages = text.split(","), []
    for k, part in enumerate(parts):
        m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", part)
        if not m or (m[2] is None) != (k == len(parts) - 1):
            raise ValueError(f"cannot read {part.strip()!r}; write each resolution with its steps but the last, "
                             f"e.g. 16:2000,32:6000,{image_size}")
        stages.append((int(m[1]), int(m[2]) if m[2] else None))
    sizes = [res for res, _ in stages]
    for bad, message in [
        (len(sizes) < 2, "name at least two resolutions (one alone is --image-size without --grow)"),
        (sizes[0] < 8 or sizes[0] & (sizes[0] - 1), f"starts at {sizes[0]} px; start at a power of two of at least 8"),
        (any(b != 2 * a for a, b in zip(sizes, sizes[1:])), "each resolution must double the one before (16,32,64)"),
        (sizes[-1] != image_size, f"ends at {sizes[-1]} px, {'above' if sizes[-1] > image_size else 'not'} "
                                  f"--image-size {image_size}; the last resolution is the training resolution"),
        (any(steps < 1 for _, steps in stages[:-1]), "each stage but the last needs at least 1 step")]:
        if bad:
            raise ValueError(message)
    return tuple(stages)


def stage(args, done):
    """(index, resolution, its steps so far counting this one) of the generator step after `done` steps."""
    begin, stages = 0, parse_grow(args.grow, args.image_size) if args.grow else ((args.image_size, None),)
    for k, (res, steps) in enumerate(stages):
        if steps is None or done < begin + steps:
            return k, res, done - begin + 1
        begin += steps


def growth(args, done):
    """(resolution, fade-in weight alpha) of the generator step after `done` steps; (--image-size, 1) without
    --grow. Alpha goes from 1/fade to 1 over the first --fade steps of each stage after the first."""
    k, res, into = stage(args, done)
    return res, 1.0 if k == 0 or into >= args.fade else into / args.fade


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
    """The images under root whose headers read; the unreadable ones are counted once, in one line."""
    if not root:
        fail("--data is required: pass the folder of training images, e.g. --data fish/")
    if Path(root).is_file():
        fail(f"--data {root} is a file; give the folder that holds the training images")
    if not Path(root).is_dir():
        fail(f"--data {root}: no such folder")
    files, bad, big = [], 0, 0
    for path in find_images(root):
        try:
            with Image.open(path) as im:
                im.verify()
            files.append(path)
        except Image.DecompressionBombError:
            big += 1
        except Exception:
            bad += 1
    if big:
        say(f"{SCRIPT}: skipped {big} image(s) over twice PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); downscale them to use them")
    if not files:
        fail(f"--data {root}: no readable images (jpg, png, bmp, webp) in it or below it"
             + (f"; {bad + big} file(s) could not be read" if bad + big else ""))
    if bad:
        say(f"{SCRIPT}: skipped {bad} unreadable image file(s) of {bad + len(files)} under {root}")
    return files


def load_image(path, channels):
    """PIL image of `channels` bands with 8 bits each, whatever the file holds (16-bit, alpha, palette), upright
    (a phone photo's EXIF orientation applied)."""
    with Image.open(path) as im:
        if im.getexif().get(0x0112, 1) != 1:  # an orientation tag: transposing copies, so only then
            im = ImageOps.exif_transpose(im)
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
    arr = np.asarray(im).reshape(im.height, im.width, -1)  # [H, W, C], grayscale too
    h, w = arr.shape[:2]
    if mode == "crop":
        top, left = (h - size) // 2, (w - size) // 2
        arr = arr[top:top + size, left:left + size]
    else:
        arr = np.pad(arr, (((size - h) // 2, (size - h + 1) // 2), ((size - w) // 2, (size - w + 1) // 2), (0, 0)),
                     mode="symmetric")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # uint8 [C, size, size]


def channel_gain(x, spread):
    """Each channel times triangular(1 - spread, 1 + spread, mode 1), drawn from torch's RNG, clipped to [0, 1]."""
    u = torch.rand(x.shape[0], 1, 1)
    gain = torch.where(u < 0.5, (2 * u).sqrt() - 1, 1 - (2 - 2 * u).sqrt())  # symmetric triangle on [-1, 1]
    return (x * (1 + spread * gain)).clamp(0, 1)


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
        steps.append(functools.partial(channel_gain, spread=args.color_gain))
    return v2.Compose(steps) if args.augment and steps else None


class RunFailed(RuntimeError):
    """Said in one line (exit 1) once the bar has ended: no image decodes (at start: truncated files; mid-run
    without the cache: moved or deleted), or the disk is full at a checkpoint (the last good one is kept)."""


class ImageFolder(torch.utils.data.Dataset):
    """Images fitted to a square, augmented with a per-sample seed, in [-1, 1]. An item is (index, seed): the
    augmentation is a function of both, so the batches do not depend on the workers and a resume sees a straight
    run's. With `cache`, each image is decoded and fitted once and kept as uint8; files that do not decode are
    counted in one line and left out. Without it, a file that fails later is replaced by the next that decodes."""

    def __init__(self, files, args, augment=True, cache=False):
        self.files, self.args, self.images = list(files), args, None
        self.augment = build_augment(args) if augment else None
        if cache:
            fitted = [(path, x) for path in self.files if (x := self.fit(path)) is not None]
            if fitted and len(fitted) < len(self.files):
                say(f"{SCRIPT}: skipped {len(self.files) - len(fitted)} image file(s) that do not decode "
                    f"(truncated?) of {len(self.files)}")
            self.files = [path for path, _ in fitted]
            self.images = torch.stack([x for _, x in fitted]) if fitted else None
        try:
            self.uint8(0)
        except RuntimeError:
            fail(f"--data {args.data}: none of its {len(files)} images decodes (truncated files?)")

    def __len__(self):
        return len(self.files)

    def fit(self, path):
        try:
            return fit_square(load_image(path, self.args.channels), self.args.image_size, self.args.fit)
        except OSError:  # truncated after a valid header
            return None

    def uint8(self, index):
        if self.images is not None:
            return self.images[index]
        for step in range(len(self)):  # a file truncated after its header: the next one that decodes
            if (x := self.fit(self.files[(index + step) % len(self)])) is not None:
                return x
        raise RunFailed(f"--data {self.args.data}: none of its {len(self)} images decodes (gone: moved or deleted "
                         "during the run?)")

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        x = self.uint8(index).float() / 255
        if self.augment:  # torchvision draws from the global CPU generator: seed it alone (torch.manual_seed
            with torch.random.fork_rng(devices=[]):  # would reseed CUDA's, i.e. the training noise) and put it back
                torch.default_generator.manual_seed(seed)
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


def load_data(args, world, lead):
    """The folder's images, decoded once into memory when they fit in CACHE_BYTES."""
    files = scan_folder(args.data)
    cache = args.cache_images and len(files) * args.channels * args.image_size ** 2 <= CACHE_BYTES
    if args.cache_images and not cache and lead:
        say(f"{SCRIPT}: not caching {len(files)} images of {args.image_size}px in memory (over "
            f"{CACHE_BYTES / 2 ** 30:.0f} GiB); they are decoded for every batch")
    data = ImageFolder(files, args, cache=cache)
    if args.batch_size * world > len(data):
        fail(f"--batch-size {args.batch_size} x {world} process(es) is more than the {len(data)} images in "
             f"{args.data}; use a smaller --batch-size")
    return data


def leave_signals_to_the_main_process(worker_id):
    """A terminal (or Slurm) signals the whole process group: a worker that died of it would crash the main
    process's last step, before its checkpoint."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(data, args, rank, world, images_seen, device):
    """An endless iterator of real batches that starts where `images_seen` left off; and images per epoch."""
    batches = Batches(data, args.batch_size, args.seed, rank, world, images_seen // (args.batch_size * world))
    workers = args.num_workers if args.num_workers >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=workers,
                                         pin_memory=device.type == "cuda", generator=torch.Generator(),
                                         worker_init_fn=leave_signals_to_the_main_process)
    return iter(loader), batches.per_epoch * args.batch_size * world  # own generator: leaves the global RNG alone


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
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)  # unit mean square over channels


class PixelNorm(nn.Module):
    def forward(self, x):
        return pixel_norm(x)


def conv_block(cin, cout, k, after, stride=1, equalized=False):
    """A conv and what follows each conv of its net: pixel norm + LeakyReLU (generator), LeakyReLU + dropout
    (critic). Layers, not a module, so that the nets' parameter names stay flat (net.2.weight)."""
    return [Conv(cin, cout, k, stride, equalized=equalized), *after()]


def minibatch_stddev(x, group_size=4, groups=1):
    """ProGAN's minibatch stddev as one extra channel, computed within each of `groups` equal parts of the
    batch (real, fake and interpolates go through one pass but are never mixed). Groups take strided members."""
    n, c, h, w = x.shape
    per = n // groups  # images per part
    g = min(group_size, per)  # members per statistics group
    if per * groups != n or per % g:
        raise ValueError(f"minibatch stddev: a batch of {per} is not a multiple of the group size {g}")
    y = x.float().reshape(groups, g, per // g, c, h, w)  # [parts, g, M, C, H, W]: member k of group m at k*M + m
    std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(2, 3, 4))  # [parts, M]: one number per group
    std = std.to(x.dtype).view(groups, 1, per // g, 1, 1, 1).expand(groups, g, per // g, 1, h, w)
    return torch.cat([x, std.reshape(n, 1, h, w)], dim=1)  # [N, C + 1, H, W]


def grow_sizes(args):
    return [res for res, _ in parse_grow(args.grow, args.image_size)] if args.grow else [args.image_size]


def block_shape(args, c, res):
    """(width, kernel) of the convs at resolution `res` of a net of width `c`: --slim-above halves the width per
    doubling above max(--slim-above, the first size) and makes the kernels 3x3 there."""
    halvings = int(math.log2(res / max(args.slim_above, grow_sizes(args)[0]))) if args.slim_above else 0
    return (max(1, c >> halvings), 3) if halvings > 0 else (c, 5)


class Generator(nn.Module):
    """z -> 8x8, two convs; per doubling: nearest upsample + 5x5 conv (two at the second-to-last size); to RGB.
    With --grow: that net at the first size (a finished run of it loads), per later size an upsample + conv block
    (block_shape) and its to-RGB; the loop sets `res` and `alpha` (in a fade, lerp of the upsampled old and the new)."""

    def __init__(self, args):
        super().__init__()
        c, eq, sizes = args.g_channels, args.equalized_lr, grow_sizes(args)
        self.c, self.base, self.res, self.alpha = c, sizes[0], args.image_size, 1.0
        self.fc = Dense(args.latent_dim, c * 8 * 8, equalized=eq)

        def after():
            return [PixelNorm(), nn.LeakyReLU(0.2)]

        def to_rgb(width=c, k=5):
            return [Conv(width, args.channels, k, gain=1.0, equalized=eq), nn.Tanh()]

        layers = [*after(), *conv_block(c, c, 5, after, equalized=eq), *conv_block(c, c, 4, after, equalized=eq)]
        doublings = int(math.log2(self.base // 8))
        for i in range(doublings):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            for _ in range(2 if i == doublings - 2 else 1):
                layers += conv_block(c, c, 5, after, equalized=eq)
        self.net = nn.Sequential(*layers, *to_rgb())
        shapes = [block_shape(args, c, res) for res in sizes]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                  *conv_block(cin, cout, k, after, equalized=eq))
                                    for (cin, _), (cout, k) in zip(shapes, shapes[1:]))
        self.to_rgb = nn.ModuleList(nn.Sequential(*to_rgb(*shape)) for shape in shapes[1:])

    def forward(self, z):  # z: [N, latent]
        x = self.fc(pixel_norm(z)).view(-1, self.c, 8, 8)  # [N, c, 8, 8]
        if self.res == self.base:
            return self.net(x)  # [N, channels, S, S] in [-1, 1]
        x, rgb = self.net[:-2](x), self.net[-2:]
        for block, next_rgb in zip(self.blocks[:int(math.log2(self.res // self.base))], self.to_rgb):
            before, x, rgb, old = x, block(x), next_rgb, rgb
        out = rgb(x)  # [N, channels, res, res]
        return out if self.alpha == 1 else torch.lerp(F.interpolate(old(before), scale_factor=2), out, self.alpha)


class Critic(nn.Module):
    """5x5 conv; stride-2 4x4 convs down to 4x4 (3x3 convs at 16 and 4); minibatch stddev; linear to 1. With --grow
    as the generator: per later size a from-RGB conv (block_shape) and a stride-2 block; the input's size picks."""

    def __init__(self, args):
        super().__init__()
        c, eq, p, sizes = args.d_channels, args.equalized_lr, args.critic_dropout, grow_sizes(args)
        self.group_size, self.base, self.alpha = args.mbstd_group, sizes[0], 1.0

        def after():
            return [nn.LeakyReLU(0.2)] + ([nn.Dropout(p)] if p else [])

        layers, res, cin = conv_block(args.channels, c, 5, after, equalized=eq), self.base, c
        self.first = len(layers)  # the from-RGB layers of the first resolution
        while res > 4:
            res, cout = res // 2, (2 * c if res == 8 else c)
            layers += conv_block(cin, cout, 4, after, stride=2, equalized=eq)  # [N, cout, res, res]
            cin = cout
            if res in (16, 4):
                layers += conv_block(cin, cin, 3, after, equalized=eq)
        self.features = nn.Sequential(*layers)
        self.head = Dense((cin + 1) * 16, 1, gain=1.0, equalized=eq)
        shapes = [block_shape(args, c, res) for res in sizes]
        self.from_rgb = nn.ModuleList(nn.Sequential(*conv_block(args.channels, width, k, after, equalized=eq))
                                      for width, k in shapes[1:])
        self.down = nn.ModuleList(nn.Sequential(*conv_block(cin, cout, 4, after, stride=2, equalized=eq),
                                                *(conv_block(cout, cout, 3, after, equalized=eq) if res == 32 else []))
                                  for res, (cout, _), (cin, _) in zip(sizes[1:], shapes, shapes[1:]))

    def forward(self, x, groups=1):  # x: [N, channels, S, S], S one of the grown resolutions
        k = int(math.log2(x.shape[-1] // self.base))  # blocks above the first resolution
        if k:
            h = self.down[k - 1](self.from_rgb[k - 1](x))
            if self.alpha < 1:
                old = self.from_rgb[k - 2] if k > 1 else self.features[:self.first]
                h = torch.lerp(old(F.avg_pool2d(x, 2)), h, self.alpha)
            for j in reversed(range(k - 1)):
                h = self.down[j](h)
            x = self.features[self.first:](h)
        else:
            x = self.features(x)  # [N, 2c, 4, 4]
        x = minibatch_stddev(x, self.group_size, groups)  # [N, 2c + 1, 4, 4]
        return self.head(x.flatten(1)).squeeze(1)  # [N]


# --------------------------------------------------------------------------------------------- losses
def interpolate(real, fake):
    alpha = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    return torch.lerp(real, fake, alpha).requires_grad_(True)  # real + alpha * (fake - real)


def gradient_penalty(critic, real, fake):
    """mean((||dD/dx_hat||_2 - 1)^2), the norm over all non-batch dimensions; keeps the graph for backward. Float32
    on a CPU even under --amp: oneDNN's bf16 double backward of padded stride-1 convs is wrong (torch 2.14)."""
    x_hat = interpolate(real, fake.detach())
    with torch.autocast("cpu", enabled=False):
        (grad,) = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


# --------------------------------------------------------------------------------- one-step functions
def bf16_cpu():
    """Whether this CPU has bf16 units (AVX512-BF16, AMX): only there does --amp make a CPU run faster."""
    try:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN (a private op: it may also move)
        return False


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def sync_gradients(module):
    """Average gradients over processes (torchrun); a no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def critic_step(generator, critic, opt_critic, real, args, penalize=True):
    """One critic update: -(D(real) - D(fake)) + lambda * K * GP + drift * D(real)^2, the penalty only when
    `penalize` (every K = --gp-every-th step). Real and fake share one pass (minibatch stddev per half); the
    interpolates get their own, so that the double backward runs over N images, not 3N (1.2-2.1x faster on CPU)."""
    n = real.shape[0]
    z = torch.randn(n, args.latent_dim, device=real.device)
    with torch.no_grad(), autocast(real.device, args.amp):
        fake = generator(z).to(real.dtype)
    with autocast(real.device, args.amp):
        d_real, d_fake = critic(torch.cat([real, fake]), groups=2).float().split(n)
        pay = args.gp_lambda and penalize
        gp = gradient_penalty(critic, real, fake) if pay else torch.zeros((), device=real.device)
    wasserstein = d_real.mean() - d_fake.mean()
    drift = d_real.square().mean()
    loss = -wasserstein + args.gp_lambda * args.gp_every * gp + args.drift * drift
    opt_critic.zero_grad(set_to_none=True)
    loss.backward()
    sync_gradients(critic)
    opt_critic.step()
    out = {"loss_critic": loss.detach(), "wasserstein": wasserstein.detach(), "drift": drift.detach()}
    return {**out, "gp": gp.detach()} if pay or not args.gp_lambda else out


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


def shrink(images, res):
    """Images (float, or uint8 rounded back) averaged down to res x res: the real data of a grown stage."""
    if images.shape[-1] == res:
        return images
    small = F.avg_pool2d(images.float(), images.shape[-1] // res)
    return small.round().to(torch.uint8) if images.dtype == torch.uint8 else small.to(images.dtype)


def set_growth(nets, res, alpha):
    for net in filter(None, (nets.generator, nets.ema, nets.critic)):  # the critic takes the size from its input
        net.res, net.alpha = res, alpha


def build_nets(args, device):
    """Generator, critic, EMA and their Adams, from the seed (identical initial weights on every rank)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    memory = torch.channels_last  # NHWC: on CUDA, and on a CPU too (1.1-1.3x the CPU recipes' steps: RESULTS.md)
    generator = Generator(args).to(device, memory_format=memory)
    critic = Critic(args).to(device, memory_format=memory)
    adam = dict(lr=args.lr, betas=tuple(args.betas), eps=1e-8, fused=device.type == "cuda")
    return argparse.Namespace(
        generator=generator, critic=critic, memory=memory, stats={"gp": torch.zeros((), device=device)},
        ema=copy.deepcopy(generator).eval().requires_grad_(False) if args.ema else None,
        opt_g=torch.optim.Adam(generator.parameters(), **adam), opt_d=torch.optim.Adam(critic.parameters(), **adam))


def train_step(nets, loader, iteration, lr, args, device):
    """Generator step `iteration` (1-based): its critic steps on fresh batches (the penalty on every
    --gp-every-th), the generator update and the EMA. Returns the losses to log, on the device."""
    for group in nets.opt_g.param_groups + nets.opt_d.param_groups:
        group["lr"] = lr
    for j in range(args.critic_its):
        real = shrink(next(loader).to(device, non_blocking=True, memory_format=nets.memory), nets.generator.res)
        if nets.critic.alpha < 1:  # ProGAN fades the real images in too: the critic sees no sharper reals than fakes
            real = torch.lerp(F.interpolate(F.avg_pool2d(real, 2), scale_factor=2), real, nets.critic.alpha)
        penalize = ((iteration - 1) * args.critic_its + j) % args.gp_every == 0
        nets.stats.update(critic_step(nets.generator, nets.critic, nets.opt_d, real, args, penalize))
    nets.stats.update(generator_step(nets.generator, nets.critic, nets.opt_g, args))
    if nets.ema is not None:
        into = stage(args, iteration - 1)[2]  # restarts at each doubling: see the docstring
        decay = min(args.ema, into / (into + 9)) if args.ema_warmup else args.ema
        update_ema(nets.ema, nets.generator, decay)
    return torch.stack([nets.stats[k] for k in LOGGED])


class Meter:
    """Sums of the logged losses since the last log line and the first non-finite step, kept on the device:
    the host waits for them only at log and checkpoint steps."""

    def __init__(self, device):
        self.sums, self.count, self.since = torch.zeros(len(LOGGED), device=device), 0, time.time()
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, iteration, values):
        self.sums, self.count = self.sums + values, self.count + 1
        self.first_bad = torch.where((self.first_bad < 0) & ~values.isfinite().all(), iteration, self.first_bad)

    def bad_step(self, device, world):
        """The first non-finite step over all ranks, or None."""
        bad = agree(float(self.first_bad) if self.first_bad >= 0 else math.inf, device, world, dist.ReduceOp.MIN)
        return None if bad == math.inf else int(bad)

    def record(self, now, images_per_step):
        means = dict(zip(LOGGED, (self.sums / self.count).tolist()))
        rate = self.count * images_per_step / (now - self.since)
        self.sums, self.count, self.since = torch.zeros_like(self.sums), 0, now
        return {**means, "images_per_s": rate}


# ------------------------------------------------------------------------------------- images and FID
@torch.no_grad()
def generate(generator, z, batch=256):
    return torch.cat([generator(part).float().clamp(-1, 1).cpu() for part in z.split(batch)])


def noise(n, args, device, offset):
    """Latents for figures and FID from their own seeded stream: drawing them leaves the training RNG alone."""
    return torch.randn(n, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + offset)).to(device)


def as_rgb(x):
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale to Inception's three channels


def to_uint8_rgb(x):
    return as_rgb(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


def save_grid(images, path, nrow=8):
    with atomic(path) as tmp:
        save_image(images, tmp, nrow=nrow, normalize=True, value_range=(-1, 1), format="png")


def slerp(a, b, t):
    omega = torch.arccos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    if omega < 1e-6:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def write_interpolation(generator, args, path, device):
    """4 x 10 walk around a loop through four latent points (row k goes from point k to point k+1)."""
    points = noise(4, args, "cpu", 1)
    ts = torch.linspace(0, 1, 10)
    z = torch.stack([slerp(points[k], points[(k + 1) % 4], t) for k in range(4) for t in ts]).to(device)
    save_grid(generate(generator, z), path, nrow=10)


def write_nearest_neighbours(generator, data, args, path, device, count=256):
    """Histogram of RMS pixel distances to the nearest neighbour: real-real, fake-fake and fake-to-real.
    Fake-to-real far below real-real means the generator copies training images."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state
    count = min(count, len(data))
    real = shrink(torch.stack([data.uint8(i) for i in np.linspace(0, len(data) - 1, count).astype(int)]),
                  generator.res)
    real = (real.float() / 127.5 - 1).flatten(1)
    fake = generate(generator, noise(count, args, device, 3)).flatten(1)
    scale = math.sqrt(real.shape[1])

    def nearest(a, b, same):
        d = torch.cdist(a.double(), b.double())
        if same:
            d.fill_diagonal_(float("inf"))
        return (d.min(dim=1).values / scale).numpy()

    distances = {"real-real": nearest(real, real, True), "fake-fake": nearest(fake, fake, True),
                 "fake-real": nearest(fake, real, False)}
    bins = np.linspace(min(map(np.min, distances.values())), max(map(np.max, distances.values())), 41)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, d in distances.items():
        ax.hist(d, bins=bins, alpha=0.5, label=f"{name} (median {np.median(d):.3f})")
    ax.set(xlabel="RMS pixel distance to nearest neighbour ([-1, 1] scale)", ylabel="images",
           title=f"nearest neighbours, {count} real and {count} generated")
    ax.legend()
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def write_gif(sample_dir, path):
    """The grids in order, a grown run's smaller ones upsampled to the last's size; one that does not load (cut by
    a kill mid-write) is left out."""
    frames = []
    for p in sorted(Path(sample_dir).glob("iter_*.png")):
        try:
            with Image.open(p) as im:
                frames.append(im.convert("RGB"))
        except OSError:
            pass
    if frames:
        frames = [f.resize(frames[-1].size, Image.NEAREST) for f in frames]
        with atomic(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)


def load_inception(args, device):
    """torch-fidelity's FID Inception, built at start so that a missing torch-fidelity or bad --fid-weights stops
    the run before training; on a CPU in channels_last (its NHWC kernels measured 1.3x faster there)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        fail("--fid-every needs torch-fidelity (pip install torch-fidelity)")
    if args.fid_weights and not Path(args.fid_weights).is_file():
        fail(f"--fid-weights {args.fid_weights}: no such file; give torch-fidelity's Inception weights")
    try:
        with torch.random.fork_rng(devices=[]):  # its layers' initialisation must not move the training RNG
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=args.fid_weights)
    except Exception as e:
        fail(f"--fid-weights {args.fid_weights}: not torch-fidelity's Inception weights ({type(e).__name__})")
    return net.eval().to(device, memory_format=torch.channels_last if device.type == "cpu" else torch.preserve_format)


@torch.no_grad()
def inception_features(inception, images, device):
    """Pool features [n, 2048] of uint8 [n, C, H, W] images, in batches of 25 on a CPU (faster there than 100)."""
    chunks = as_rgb(images).split(25 if device.type == "cpu" else 250)
    return torch.cat([inception(chunk.to(device))[0].cpu() for chunk in chunks])


def fid_cache(args, n, device, res):
    """Where the real images' features are kept. Keyed by the device type too: Inception runs in TF32 on CUDA.
    ("upright": images are read with their EXIF orientation applied; caches made before that are not reused.)"""
    size = args.image_size if res == args.image_size else f"{args.image_size}>{res}"
    what = f"{Path(args.data).resolve()}|{size}|{args.channels}|{args.fit}|{n}|upright|{device.type}"
    return Path(args.out) / ".fid_cache" / f"real-{hashlib.sha1(what.encode()).hexdigest()[:16]}.pt"


def compute_fid(inception, generator, data, args, device):
    """FID and KID (torch-fidelity's metric code) of the generator against up to --fid-samples training images
    (fitted, not augmented, at the generator's resolution), whose features are cached under --out."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    n = min(args.fid_samples, len(data))
    cache = fid_cache(args, n, device, generator.res)
    try:
        real = torch.load(cache, weights_only=True) if cache.is_file() else None
    except Exception:  # cut by a kill, or not a cache: computed again and rewritten
        real = None
    if not (isinstance(real, torch.Tensor) and real.shape[0] == n):
        picks = np.linspace(0, len(data) - 1, n).astype(int)
        real = inception_features(inception, shrink(torch.stack([data.uint8(i) for i in picks]), generator.res),
                                  device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic(cache) as tmp:
            torch.save(real, tmp)
    fake = inception_features(inception, to_uint8_rgb(generate(generator, noise(n, args, device, 7))), device)
    fid = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
    kid = kid_features_to_metric(fake, real, kid_subset_size=min(1000, n), verbose=False)
    return {"fid": fid["frechet_inception_distance"], "kid": kid["kernel_inception_distance_mean"], "fid_n": n}


def sample_mode(args, device, ckpt, signals):
    """--sample N: N PNGs from a checkpoint's EMA generator (or its generator), for any FID tool."""
    generator = Generator(args).to(device).eval()
    generator.load_state_dict(ckpt["ema"] if ckpt.get("ema") else ckpt["generator"])
    generator.res, generator.alpha = growth(args, max(0, ckpt["iteration"] - 1))
    out = Path(args.sample_out) if args.sample_out else Path(args.resume).parent.parent / "generated"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--sample-out: cannot create {out} ({e.strerror or type(e).__name__})")
    signals.doing, signals.saved = "--sample", f"the images written so far are in {out}"
    stream = torch.Generator().manual_seed(args.seed)  # noise()'s offset 0: the first 64 are the grids' z
    for written in range(0, args.sample, 256):  # drawn 256 at a time (the same numbers): any N fits in memory
        part = torch.randn(min(256, args.sample - written), args.latent_dim, generator=stream)
        for k, img in enumerate(generate(generator, part.to(device))):
            try:
                with atomic(out / f"{written + k:06d}.png") as tmp:
                    save_image(img, tmp, normalize=True, value_range=(-1, 1), format="png")
            except OSError as e:
                fail(f"--sample: cannot write to {out} ({e.strerror or e}); {written + k} images were written", 1)
    say(f"wrote {args.sample} images to {out}")


# -------------------------------------------------------------------------- run folder and checkpoint
def rng_state(device):
    """This process's generators; of CUDA's only the device in use (a list of one), so that a resume with fewer
    visible GPUs restores it."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                     *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def set_rng_state(state, device):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":  # older checkpoints hold one state per visible GPU
        cuda, index = state["cuda"], device.index or 0
        torch.cuda.set_rng_state(cuda[index] if len(cuda) > 1 and index < len(cuda) else cuda[0], device)


def settings(args):
    return {k: v for k, v in vars(args).items() if k != "resume"}


def save_checkpoint(path, nets, args, iteration, images_seen, world):
    """Nets, optimizers, progress, every rank's RNG (gathered under torchrun) and the settings; rank 0 writes
    them to a temporary file that replaces `path` only when complete."""
    device = next(nets.generator.parameters()).device
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
        if dist.get_rank() != 0:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save({"generator": nets.generator.state_dict(), "critic": nets.critic.state_dict(),
                        "ema": nets.ema.state_dict() if nets.ema is not None else None,
                        "opt_generator": nets.opt_g.state_dict(), "opt_critic": nets.opt_d.state_dict(),
                        "iteration": iteration, "images_seen": images_seen, "rng": rngs, "args": settings(args)}, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch's writer says a full disk as "file write failed"
        if not (getattr(e, "errno", None) == errno.ENOSPC or "file write failed" in str(e)
                or "inline_container" in str(e)):
            raise
        raise RunFailed(f"no space left on the device writing the checkpoint of iteration {iteration}") from None


def checkpoint_file(path):
    """A run folder's ckpt/last.pt, or a checkpoint inside <run>/ckpt/: a copy elsewhere has no run folder to
    continue, and the one above it may be another run's."""
    given, path = path, Path(path)
    path = path / "ckpt" / "last.pt" if path.is_dir() else path
    if path.is_file() and not (path.parent.name == "ckpt" and (path.parent.parent / "args.json").is_file()):
        fail(f"--resume {given}: not a run folder's checkpoint (<run>/ckpt/*.pt); copy it to <run>/ckpt/last.pt")
    return path


def load_checkpoint(path):
    if not Path(path).is_file():
        fail(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--resume {path}: not a readable checkpoint ({type(e).__name__}); "
             "it may be truncated: use an earlier copy or start afresh")
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    saved = ckpt.get("args") if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) else {}
    other = "noise_morph.py" if "models" in keys else "wgan_mnist.py" if "penalty" in saved else None
    if other or not {"generator", "args", "iteration"} <= keys:
        fail(f"--resume {path} is another script's checkpoint{f' ({other})' if other else ''}, not {SCRIPT}'s")
    return ckpt


def restore(ckpt, nets, args, rank, world, device):
    """Nets, optimizers (the command line's --lr, fused Adam on CUDA whatever wrote them), the EMA (the generator
    when the checkpoint has none) and this rank's RNG; (iteration, images seen). A run grown further keeps its
    layers and their Adam moments; the new layers, registered after them, start as initialised."""
    same = ckpt["args"].get("grow") == args.grow
    nets.generator.load_state_dict(ckpt["generator"], strict=same)
    nets.critic.load_state_dict(ckpt["critic"], strict=same)
    if nets.ema is not None:
        nets.ema.load_state_dict(ckpt.get("ema") or ckpt["generator"], strict=same)
    for opt, key in ((nets.opt_g, "opt_generator"), (nets.opt_d, "opt_critic")):
        count = len(opt.param_groups[0]["params"])  # one group: a grown run's saved ids are its first params
        groups = [{**g, "lr": args.lr, "fused": device.type == "cuda", "foreach": None, "params": list(range(count))}
                  for g in ckpt[key]["param_groups"]]  # set before loading: fused Adam keeps its steps on the GPU
        opt.load_state_dict({**ckpt[key], "param_groups": groups})
        for param, state in opt.state.items():  # a CPU checkpoint's moments are contiguous; on CUDA the weights are
            for name in ("exp_avg", "exp_avg_sq"):  # channels_last, and fused Adam needs both in one layout
                state[name] = torch.empty_like(param).copy_(state[name])
    states = ckpt["rng"]
    set_rng_state(states[rank] if len(states) == world else states[0], device)
    if len(states) != world:  # resumed under another process count: fresh, distinct noise per rank
        torch.manual_seed(args.seed + 7919 * ckpt["iteration"] + rank)
    return ckpt["iteration"], ckpt["images_seen"]


def open_run_folder(args, lead, held):
    """The checkpoint's folder when resuming, else a new <out>/<run name> that must not hold a run already;
    the writer (rank 0) locks it for its whole life (`held` lets go), so that two processes never share one."""
    if args.resume:
        run_dir = Path(args.resume).parent.parent
    else:  # a folder name that is not UTF-8 would be one that TensorBoard cannot write
        args.dataset = args.dataset or os.fsencode(Path(args.data).resolve().name).decode("utf-8", "replace")
        name = args.run_name or f"{Path(SCRIPT).stem}__{args.dataset}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.out) / name
        if lead and (run_dir / "args.json").exists():
            fail(f"--run-name: {run_dir} already holds a run; pass --resume {run_dir} to continue it, or another "
                 "--run-name")
    if lead:
        try:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            fcntl.flock(held.enter_context(open(run_dir / ".lock", "a")), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"{run_dir} is in use by another process")
        except OSError as e:
            fail(f"{'--resume' if args.resume else '--out'}: cannot create or write to the run folder {run_dir} "
                 f"({e.strerror or type(e).__name__})")
    return run_dir


class RunLog:
    """One record, three places: metrics.jsonl, TensorBoard and the progress bar (rank 0 only)."""

    def __init__(self, run_dir, args, start, lead):
        self.path, self.writer, self.bar = run_dir / "metrics.jsonl" if lead else None, None, None
        if not lead:
            return
        if start and self.path.exists():  # rows past the checkpoint (a kill before it) are trained again
            rows = [line for line in self.path.read_text().splitlines()  # a line cut by a kill does not end in }
                    if line.endswith("}") and json.loads(line)["iter"] <= start]
            with atomic(self.path) as tmp:
                tmp.write_text("".join(row + "\n" for row in rows))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir), purge_step=start or None)
        except ImportError:
            say(f"{SCRIPT}: tensorboard is not installed; logging to metrics.jsonl only")
        try:
            from tqdm import tqdm
            timed = dict(total=args.max_time, unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")
            self.bar = tqdm(**(timed if args.max_time else dict(total=args.iters, initial=start)),
                            dynamic_ncols=True, desc=args.run_name[:40])  # --max-time: the budget's seconds
        except ImportError:
            pass

    def log(self, record):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in record.items():
                if k != "iter":
                    self.writer.add_scalar(("eval/" if k in ("fid", "kid", "fid_n") else "train/") + k, v,
                                           record["iter"])
        if self.bar and "loss_critic" in record:
            self.bar.set_postfix(loss_d=f"{record['loss_critic']:.3f}", W=f"{record['wasserstein']:.3f}",
                                 img_s=f"{record['images_per_s']:.0f}")

    def close(self):
        for part in filter(None, (self.bar, self.writer)):
            part.close()
        self.bar = self.writer = None


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (torchrun, schedulers) and SIGHUP (a closed terminal, taken as SIGTERM). While
    training (`deferring`) the first asks to stop after the step and a second stops at once; at any other moment the
    first stops at once. The first decides the exit code. Installed where Python allows (the main thread)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    class Stop(BaseException):
        """Out at once, through every `except Exception`."""

    def __init__(self):
        self.received, self.handlers, self.deferring = None, {}, False
        self.doing, self.saved = "start-up", "nothing saved"  # for the one line said when it stops at once

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.handlers[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        first = self.received is None
        self.received = self.received or signum
        if not (first and self.deferring):
            raise self.Stop

    @property
    def name(self):
        return signal.Signals(self.received).name if self.received else "a signal to another rank"

    @property
    def code(self):
        return 130 if self.received == signal.SIGINT else 143  # 130 for Ctrl-C: `train && next` stops

    def __exit__(self, *exc):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


def agree(value, device, world, op):
    """The same number on every rank (torchrun): the largest or smallest of the ranks' values."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op)
    return t.item()


# ----------------------------------------------------------------------------------------------- main
def setup(args):
    """The device, this process's rank and the world size (under torchrun: NCCL on CUDA, gloo on CPU), and
    the precision and determinism switches."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is visible; use --device cpu")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))  # modulo: launchers that show each process one GPU
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():  # torchrun, even with
        dist.init_process_group("nccl" if cuda else "gloo")  # one process: so that one GPU exercises NCCL
    if args.torch_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world


def main(argv=None):
    """train() with the signals handled at every moment and the run folder's lock let go at the end."""
    with StopSignals() as signals, contextlib.ExitStack() as held:
        try:
            return train(argv, signals, held)
        except StopSignals.Stop:
            print(f"{SCRIPT}: stopped at once by {signals.name} during {signals.doing}; {signals.saved}",
                  file=sys.stderr)
            raise SystemExit(signals.code) from None


def train(argv, signals, held):
    args = parse_args(argv)
    device, rank, world = setup(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if args.sample:
        if ckpt is None:
            fail("--sample needs --resume CHECKPOINT (or run folder) to sample from")
        return sample_mode(args, device, ckpt, signals)
    lead, batch = rank == 0, args.batch_size * world  # batch: real images per critic step, all processes
    inception = load_inception(args, device) if args.fid_every and lead else None
    data = load_data(args, world, lead)
    run_dir = open_run_folder(args, lead, held)
    args.run_name, ckpt_path = run_dir.name, run_dir / "ckpt" / "last.pt"
    nets = build_nets(args, device)
    shown = nets.ema if nets.ema is not None else nets.generator  # what grids, figures and FIDs show
    torch.manual_seed(args.seed + rank)  # different noise per rank
    start, images_seen = restore(ckpt, nets, args, rank, world, device) if ckpt else (0, 0)
    stages = parse_schedule(args.lr_schedule) if args.lr_schedule else None
    loader, per_epoch = make_loader(data, args, rank, world, images_seen, device)
    fixed_z = noise(64, args, device, 0)
    if lead:
        with atomic(run_dir / "args.json") as tmp:
            tmp.write_text(json.dumps(settings(args), indent=2))
        say(f"{SCRIPT}: {len(data)} images, batch {args.batch_size} x {world} process(es) = {batch} per critic "
            f"step, {device}, run folder {run_dir}")
        if device.type == "cpu" and args.image_size > 32 and not args.grow:
            amp = " --amp" if bf16_cpu() else ""
            say(f"{SCRIPT}: {args.image_size}px on a CPU takes hours per recognisable sample; for a first look "
                f"try the README's CPU recipe, grown from 16 to 64 px in two hours: {CPU_RECIPE}{amp}")
    run, meter = RunLog(run_dir, args, start, lead), Meter(device)
    set_growth(nets, *growth(args, max(0, start - 1)))  # the stage of the checkpoint's step (if no step follows)
    t_start = time.time()
    deadline, stop, iteration = t_start + args.max_time if args.max_time else None, 0, start
    signals.deferring, signals.doing = True, "training"
    signals.saved = f"the last checkpoint is {ckpt_path}" if ckpt else "nothing saved yet"
    try:
        while iteration < args.iters and not stop:
            iteration += 1
            lr = lr_at(stages, images_seen // per_epoch) if stages else args.lr
            set_growth(nets, *growth(args, iteration - 1))
            meter.add(iteration, train_step(nets, loader, iteration, lr, args, device))
            images_seen += args.critic_its * batch
            now = time.time()
            if (world == 1 and not dist.is_initialized()) or iteration % AGREE_EVERY == 0:  # 1: time, 2: a signal
                stop = int(agree(2.0 if signals.received else float(bool(deadline and now >= deadline)),
                                 device, world, dist.ReduceOp.MAX))
            last = iteration == args.iters or stop
            fid_due = args.fid_every and (iteration % args.fid_every == 0 or last) and stop != 2
            ckpt_due = (args.ckpt_every and iteration % args.ckpt_every == 0) or last or fid_due
            if (iteration % args.log_every == 0 or ckpt_due) and (bad := meter.bad_step(device, world)):
                run.close()
                kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else \
                    "no checkpoint was written yet"
                fail(f"non-finite loss at iteration {bad}; training stopped, {kept}", code=1)
            if iteration % args.log_every == 0 or last:
                grown = {"res": shown.res, "alpha": shown.alpha} if args.grow else {}
                run.log({"iter": iteration, **meter.record(now, args.critic_its * batch), "lr": lr, **grown,
                         "epoch": images_seen / per_epoch, "global_batch": batch, "seconds": now - t_start})
            if run.bar:
                run.bar.update(min(now - t_start, args.max_time) - run.bar.n if args.max_time else 1)
            if lead and args.sample_every and (iteration % args.sample_every == 0 or last):
                save_grid(generate(shown, fixed_z), run_dir / "samples" / f"iter_{iteration:06d}.png")
            if ckpt_due:  # before the FID, so that a failing FID loses nothing
                save_checkpoint(ckpt_path, nets, args, iteration, images_seen, world)
                signals.saved = f"the last checkpoint is {ckpt_path}"
            if fid_due and lead:
                fid = compute_fid(inception, shown, data, args, device)
                run.log({"iter": iteration, **fid})
                say(f"iteration {iteration}: FID {fid['fid']:.2f}, KID {fid['kid']:.4f} (n = {fid['fid_n']})")
    except RunFailed as e:  # the bar ends first, so that the line is one of its own
        run.close()
        fail(f"{e}; {signals.saved}", code=1)
    except BaseException:  # a stop at once: the bar ends before its line
        run.close()
        raise
    finally:
        signals.deferring = False
    run.close()
    if stop == 2 and lead:
        print(f"{SCRIPT}: stopped by {signals.name} after iteration {iteration}: checkpoint written to "
              f"{ckpt_path}; continue with --resume {run_dir}", file=sys.stderr)
    elif lead:
        signals.doing = "the end-of-run figures"
        write_gif(run_dir / "samples", run_dir / "progress.gif")
        write_interpolation(shown, args, run_dir / "interpolation.png", device)
        try:
            write_nearest_neighbours(shown, data, args, run_dir / "nearest_neighbours.png", device)
        except ImportError:
            say(f"{SCRIPT}: matplotlib is not installed; skipped nearest_neighbours.png")
        why = f"stopped on time (--max-time {args.max_time:g} s)" if stop == 1 else "done"
        say(f"{why}: {iteration} iterations in {time.time() - t_start:.0f} s; run folder {run_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if stop == 2:
        raise SystemExit(signals.code)


if __name__ == "__main__":
    main()
