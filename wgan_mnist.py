"""Wasserstein GAN with weight clipping on MNIST / Fashion-MNIST, with the knobs its debugger turns.

What: the original WGAN (Arjovsky, Chintala, Bottou 2017, arXiv 1701.07875): a critic D kept K-Lipschitz
by clipping every critic parameter to [-c, c] after each critic step, trained with RMSprop; its loss
mean D(fake) - mean D(real) makes mean D(real) - mean D(fake) an estimate of the earth-mover distance.
`--penalty gp` replaces clipping with the gradient penalty of WGAN-GP (Gulrajani et al. 2017,
arXiv 1704.00028), where the seed-001 experiment log ended. FID (Heusel et al. 2017, arXiv 1706.08500)
against the real test split through torch-fidelity.

Usage:
    python wgan_mnist.py --data ../shared/data                           # paper defaults, dcgan nets
    python wgan_mnist.py --data ../shared/data --critic-its 1            # seed 001: k too small
    python wgan_mnist.py --data ../shared/data --clip-value 0.05         # seed 001: looser clipping
    python wgan_mnist.py --data ../shared/data --lr 5e-4                 # seed 001: RMSprop 5e-4
    python wgan_mnist.py --data ../shared/data --penalty gp              # WGAN-GP, Adam 1e-4 (0.5, 0.9)
    python wgan_mnist.py --data ../shared/data --arch mlp --critic-warmup   # the paper's MLP and schedule
    python wgan_mnist.py --data ../shared/data --fid-floor --fid-samples 1000 \
        --fid-weights ../shared/models/weights-inception-2015-12-05-6726825d.pth   # real-vs-real FID floor
    python wgan_mnist.py --resume runs/<run-name>                        # continue a run exactly

Departures from the paper and the seed (PyTorch default initialisation throughout; the paper used N(0, 0.02)):
  1. The dcgan critic has BatchNorm after its 2nd and 3rd conv in clip mode, as the paper's DCGAN critic did
     (its parameters are clipped with the rest), and none in gp mode (`--critic-norm`). Without it the clipped
     critic at lr 5e-5 collapsed the generator in all our runs (k = 1 and 5, c = 0.01 and 0.05): its input
     gradient pointed the same way for every sample (cosine 0.999 at step 500), so every z was pushed to one
     pattern (experiments/wgan_mnist_collapse.py); with it, samples stay varied (README, wgan_mnist Results).
     The generator keeps BatchNorm and is switched to eval mode only to draw sample grids and FID images.
  2. `--critic-warmup` (100 critic steps for generator steps 0..24 and every 500th) is off by default so that
     short runs compare `--critic-its` settings directly; the paper had it on.
  3. Optimizers: RMSprop with torch defaults (alpha 0.99, eps 1e-8, no momentum); `--optimizer adam` uses
     betas (0.5, 0.9) in both modes. The default optimizer and lr follow `--penalty`: clip -> RMSprop 5e-5,
     gp -> Adam 1e-4; an explicit `--optimizer` keeps the penalty's default lr unless `--lr` is given.
  4. The whole split is held as one uint8 tensor on the device and batches are drawn by index from a per-epoch
     permutation seeded by (seed, epoch), so `--num-workers` is accepted but unused.
  5. Logged losses and the Wasserstein estimate are means over the steps since the previous log step.
"""
import argparse
import json
import os
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

PROG = "wgan_mnist.py"


def fail(msg):
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        fail(message)


def build_parser():
    p = Parser(prog=PROG, description="WGAN (weight clipping) on MNIST",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default="data", help="torchvision root holding MNIST/raw or FashionMNIST/raw")
    a("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="which torchvision dataset")
    a("--download", action="store_true", help="download the dataset when its files are missing")
    a("--arch", default="dcgan", choices=["dcgan", "mlp"], help="conv nets or the paper's 4x512 ReLU MLPs")
    a("--image-size", type=int, default=28, choices=[28], help="image side (MNIST is 28)")
    a("--channels", type=int, default=1, choices=[1], help="image channels (MNIST is grayscale)")
    a("--batch-size", type=int, default=64, help="images per critic and generator step")
    a("--latent-dim", type=int, default=100, help="size of z ~ N(0, I)")
    a("--iters", type=int, default=10000, help="generator steps")
    a("--critic-its", type=int, default=5, help="critic steps per generator step (k)")
    a("--critic-warmup", action="store_true",
      help="paper schedule: 100 critic steps for generator steps 0..24 and every 500th")
    a("--penalty", default="clip", choices=["clip", "gp"], help="Lipschitz constraint: weight clipping or GP")
    a("--clip-value", type=float, default=0.01, help="c: critic parameters are clipped to [-c, c]")
    a("--critic-norm", default="auto", choices=["auto", "batch", "none"],
      help="BatchNorm in the dcgan critic: auto = batch with clip (the paper's DCGAN critic), none with gp")
    a("--gp-lambda", type=float, default=10.0, help="gradient penalty weight (gp mode)")
    a("--optimizer", default=None, choices=["rmsprop", "adam"],
      help="default: rmsprop with clip, adam (betas 0.5, 0.9) with gp")
    a("--lr", type=float, default=None, help="learning rate; default 5e-5 with clip, 1e-4 with gp")
    a("--seed", type=int, default=1, help="random seed")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    a("--torch-deterministic", action="store_true", help="deterministic kernels (bit-exact resume on CPU)")
    a("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    a("--out", default="runs", help="folder for run folders")
    a("--run-name", default=None, help="run folder name; default wgan_mnist__<dataset>__<seed>__<time>")
    a("--resume", default=None, help="checkpoint .pt or run folder to continue")
    a("--config", default=None, help="JSON/YAML file of flag values; command-line flags win")
    a("--log-every", type=int, default=50, help="generator steps between metric lines")
    a("--sample-every", type=int, default=500, help="generator steps between sample grids (0: end only)")
    a("--ckpt-every", type=int, default=1000, help="generator steps between checkpoints (0: end only)")
    a("--num-workers", type=int, default=0, help="unused: the split lives in one tensor on the device")
    a("--fid-every", type=int, default=0, help="generator steps between FIDs (0: none; >0 also at the end)")
    a("--fid-samples", type=int, default=10000, help="n generated images vs n test images for FID/KID")
    a("--fid-weights", default=None, help="Inception weights for torch-fidelity (offline use)")
    a("--fid-floor", action="store_true", help="print FID of n real train vs n real test images and exit")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    checks = [(args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
              (args.critic_its < 1, f"--critic-its must be at least 1 critic step, got {args.critic_its}"),
              (args.clip_value <= 0, f"--clip-value must be positive (clipping to [-c, c]), got {args.clip_value}"),
              (args.lr is not None and args.lr <= 0, f"--lr must be positive, got {args.lr}"),
              (args.iters < 0, f"--iters must be 0 or more, got {args.iters}"),
              (args.gp_lambda < 0, f"--gp-lambda must be 0 or more, got {args.gp_lambda}"),
              (args.latent_dim < 1, f"--latent-dim must be at least 1, got {args.latent_dim}"),
              (args.log_every < 1, f"--log-every must be at least 1, got {args.log_every}"),
              (min(args.sample_every, args.ckpt_every, args.fid_every) < 0,
               "--sample-every, --ckpt-every and --fid-every must be 0 or more"),
              (args.fid_samples < 2, f"--fid-samples must be at least 2, got {args.fid_samples}"),
              (args.critic_norm == "batch" and args.penalty == "gp",
               "--critic-norm batch cannot be used with --penalty gp: the penalty is per sample, BatchNorm mixes"
               " the batch"),
              (args.critic_norm == "batch" and args.arch == "mlp",
               "--critic-norm batch is for --arch dcgan; the paper's MLP critic has no BatchNorm")]
    for bad, msg in checks:
        if bad:
            fail(msg)
    gp = args.penalty == "gp"
    args.optimizer = args.optimizer or ("adam" if gp else "rmsprop")
    args.lr = args.lr if args.lr is not None else (1e-4 if gp else 5e-5)
    if args.critic_norm == "auto":
        args.critic_norm = "batch" if args.arch == "dcgan" and not gp else "none"
    return args


def as_flags(values, source):
    """Turn a dict of flag values (config file or checkpoint args) into command-line tokens."""
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings}
    tokens = []
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest in ("config", "resume", "run_name"):
            continue
        if dest not in actions or dest == "help":
            fail(f"{source}: unknown key '{key}'; keys are the script's flags (see --help)")
        flag = actions[dest].option_strings[0]
        if isinstance(actions[dest], argparse._StoreTrueAction):
            tokens += [flag] if value else []
        elif value is not None:
            tokens += [flag, str(value)]
    return tokens


def read_config(path):
    try:
        text = Path(path).read_text()
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:
        fail(f"--config: cannot read {path} ({type(e).__name__}); give a JSON or YAML file of flag values")
    if not isinstance(values, dict):
        fail(f"--config: {path} must hold a mapping of flag names to values")
    return values


def load_checkpoint(path):
    path = Path(path)
    path = path / "ckpt" / "last.pt" if path.is_dir() else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(ckpt, dict) and "generator" in ckpt
    except Exception as e:
        fail(f"--resume: {path} is missing, truncated or not a checkpoint of this script ({type(e).__name__}); "
             "point --resume at a run folder or its ckpt/last.pt")
    return path, ckpt


def build_args(argv=None):
    """parse_args plus what needs files: checkpoint args < config file < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, ckpt, tokens = parse_args(argv), None, []
    if args.resume:
        ckpt_path, ckpt = load_checkpoint(args.resume)
        ckpt["args"].setdefault("critic_norm", "none")  # checkpoints from before --critic-norm: no critic BN
        tokens += as_flags(ckpt["args"], f"--resume {ckpt_path}")
    if args.config:
        tokens += as_flags(read_config(args.config), f"--config {args.config}")
    if tokens:
        args = parse_args(tokens + argv)
    if ckpt is not None:
        args.run_dir = str(ckpt_path.parent.parent)
    return args, ckpt


# ----------------------------------------------------------------------------------------------- data
def load_split(args, train):
    """Whole split as a uint8 tensor [N, 28, 28]; download only when files are missing and --download."""
    from torchvision import datasets
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[args.dataset]
    folder = Path(args.data) / cls.__name__ / "raw"
    try:
        return cls(args.data, train=train, download=args.download).data
    except RuntimeError:
        fail(f"--data: no {args.dataset} files in {folder}; pass --download to fetch them there "
             "or point --data at the torchvision root that holds them")
    except Exception as e:
        fail(f"--download: could not fetch {args.dataset} into {folder} ({type(e).__name__}: {e})")


def to_unit(images_uint8):
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [-1, 1]."""
    return images_uint8.unsqueeze(1).float().div(127.5).sub(1)


class Batches:
    """Batches by index from a device tensor; epoch e uses the permutation seeded by (seed, e)."""

    def __init__(self, images, batch_size, seed):
        self.images, self.bs, self.seed = images, batch_size, seed
        self.epoch, self.pos, self.perm = 0, 0, None

    def next(self):
        if self.perm is None or self.pos + self.bs > len(self.perm):
            if self.perm is not None:
                self.epoch, self.pos = self.epoch + 1, 0
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            self.perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
        idx = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return to_unit(self.images[idx])

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        g = torch.Generator().manual_seed(self.seed * 100003 + state["epoch"])
        self.perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
        self.epoch, self.pos = state["epoch"], state["pos"]


# --------------------------------------------------------------------------------------------- models
def mlp(sizes, last):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(n_in, n_out), nn.ReLU() if i < len(sizes) - 2 else last]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """dcgan: z -> linear 4x4x256 -> tconv 7x7x128 -> 14x14x64 -> 28x28x1, tanh; mlp: 4 x 512 ReLU."""

    def __init__(self, args):
        super().__init__()
        if args.arch == "mlp":
            self.net = nn.Sequential(mlp([args.latent_dim] + [512] * 4 + [784], nn.Tanh()),
                                     nn.Unflatten(1, (1, 28, 28)))
            return
        def up(c_in, c_out, k):
            return [nn.ConvTranspose2d(c_in, c_out, k, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(
            nn.Linear(args.latent_dim, 4 * 4 * 256, bias=False), nn.BatchNorm1d(4 * 4 * 256), nn.ReLU(),
            nn.Unflatten(1, (256, 4, 4)), *up(256, 128, 3), *up(128, 64, 4),
            nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Critic(nn.Module):
    """dcgan: conv 64-128-256 stride 2, LeakyReLU 0.2, BatchNorm after the 2nd and 3rd conv with
    `--critic-norm batch`, linear head; mlp: 4 x 512 ReLU."""

    def __init__(self, args):
        super().__init__()
        if args.arch == "mlp":
            self.net = nn.Sequential(nn.Flatten(), mlp([784] + [512] * 4 + [1], nn.Identity()))
            return
        act, bn = nn.LeakyReLU(0.2), args.critic_norm == "batch"

        def down(c_in, c_out, k, norm):
            return [nn.Conv2d(c_in, c_out, k, 2, 1, bias=not norm)] + [nn.BatchNorm2d(c_out)] * norm + [act]
        self.net = nn.Sequential(*down(1, 64, 4, False), *down(64, 128, 4, bn), *down(128, 256, 3, bn),  # 14, 7, 4
                                 nn.Flatten(), nn.Linear(256 * 4 * 4, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


# --------------------------------------------------------------------------------------------- losses
def gradient_penalty(critic, real, fake):
    """Unscaled mean((||dD/dx_hat||_2 - 1)^2), norm over all non-batch dims, one alpha per sample."""
    alpha = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = (real + alpha * (fake.detach() - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    # bf16 autocast gives a bf16 gradient: no GradScaler is used, so no unscaling; the norm in real's dtype
    return (grad.flatten(1).to(real.dtype).norm(dim=1) - 1).pow(2).mean()


def critic_iters_for(step, args):
    """Critic steps before generator step `step` (0-based); the paper's warm-up when asked."""
    if args.critic_warmup and (step < 25 or step % 500 == 0):
        return 100
    return args.critic_its


def make_optimizers(generator, critic, args):
    def make(params):
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=args.lr, betas=(0.5, 0.9))
        return torch.optim.RMSprop(params, lr=args.lr, alpha=0.99, eps=1e-8, momentum=0.0)
    return make(generator.parameters()), make(critic.parameters())


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


# ------------------------------------------------------------------------------------------ one step
def critic_step(generator, critic, opt_critic, real, args):
    z = torch.randn(real.shape[0], args.latent_dim, device=real.device)
    with torch.no_grad():
        fake = generator(z)
    with autocast(args, real.device):
        wasserstein = critic(real).float().mean() - critic(fake).float().mean()
        loss = -wasserstein
        out = {}
        if args.penalty == "gp" and args.gp_lambda:  # lambda 0: no penalty pass (the bench's no-penalty step)
            gp = gradient_penalty(critic, real, fake)
            loss = loss + args.gp_lambda * gp
            out["gp"] = gp.detach()
    opt_critic.zero_grad(set_to_none=True)
    loss.backward()
    opt_critic.step()
    if args.penalty == "clip":
        with torch.no_grad():
            for p in critic.parameters():
                p.clamp_(-args.clip_value, args.clip_value)
    out.update(loss_critic=loss.detach(), wasserstein=wasserstein.detach())
    return out


def generator_step(generator, critic, opt_generator, args):
    device = next(generator.parameters()).device
    critic.requires_grad_(False)
    z = torch.randn(args.batch_size, args.latent_dim, device=device)
    with autocast(args, device):
        loss = -critic(generator(z)).float().mean()
    opt_generator.zero_grad(set_to_none=True)
    loss.backward()
    opt_generator.step()
    critic.requires_grad_(True)
    return {"loss_gen": loss.detach()}


def clip_fraction(critic, c):
    at_bound = sum(int((p.abs() >= c).sum()) for p in critic.parameters())
    return at_bound / sum(p.numel() for p in critic.parameters())


# ------------------------------------------------------------------------------------- images and FID
@torch.no_grad()
def generate(generator, z):
    """Eval-mode (BatchNorm running stats) images in [-1, 1] for grids and FID."""
    was_training = generator.training
    generator.eval()
    x = generator(z).float()
    generator.train(was_training)
    return x


def to_uint8(x):
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def subset(images, n, seed):
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


class RGBImages(torch.utils.data.Dataset):
    """uint8 [N, 28, 28] or [N, 1, 28, 28] -> uint8 [3, 28, 28] items, as torch-fidelity takes them."""

    def __init__(self, images):
        self.images = images.reshape(len(images), 1, *images.shape[-2:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1).contiguous()


def fid_vs_test(images, test_images, args, device):
    """FID and KID of n uint8 images against n images of the real test split (fixed subset)."""
    import torch_fidelity
    n = len(images)
    data_key = zlib.crc32(str(Path(args.data).resolve()).encode())  # another root, another cache entry
    if args.fid_weights and not Path(args.fid_weights).is_file():
        fail(f"--fid-weights: file {args.fid_weights} not found; give torch-fidelity's Inception weights")
    m = torch_fidelity.calculate_metrics(
        input1=RGBImages(images), input2=RGBImages(subset(test_images, n, 0)), fid=True, kid=True,
        kid_subset_size=min(1000, n), feature_extractor_weights_path=args.fid_weights,
        cuda=device.type == "cuda", batch_size=100, verbose=False, cache=True, save_cpu_ram=True,  # no workers
        cache_root=str(Path(args.out) / ".fid_cache"), input2_cache_name=f"{args.dataset}-test-n{n}-seed0-{data_key}")
    return {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"], "fid_n": n}


def fid_of_generator(generator, test_images, args, device):
    g = torch.Generator(device=device).manual_seed(args.seed + 7)  # own stream: FID leaves training RNG alone
    chunks = [to_uint8(generate(generator, torch.randn(min(500, args.fid_samples - i), args.latent_dim,
                                                       generator=g, device=device)))
              for i in range(0, args.fid_samples, 500)]
    return fid_vs_test(torch.cat(chunks), test_images, args, device)


def save_gif(sample_dir, path):
    from PIL import Image
    frames = [Image.open(f) for f in sorted(Path(sample_dir).glob("iter_*.png"))]
    if frames:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=300, loop=0)


# ----------------------------------------------------------------------------------------- checkpoint
def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    args, ckpt = build_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here; use --device cpu or auto")
    if args.amp and not cuda:
        fail("--amp needs CUDA; drop --amp on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    if args.fid_floor:  # real train vs real test at the same n: the best FID a generator can reach at this n
        train = subset(load_split(args, train=True), args.fid_samples, 1)
        print(json.dumps({"fid_floor": fid_vs_test(train, load_split(args, train=False), args, device),
                          "dataset": args.dataset}))
        return
    train_images = load_split(args, train=True).to(device)
    test_images = load_split(args, train=False) if args.fid_every else None

    generator, critic = Generator(args).to(device), Critic(args).to(device)
    if cuda and args.arch == "dcgan":  # cuDNN's faster conv layout
        generator, critic = (m.to(memory_format=torch.channels_last) for m in (generator, critic))
    opt_g, opt_c = make_optimizers(generator, critic, args)
    batches = Batches(train_images, args.batch_size, args.seed)
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    step = 0
    if ckpt is not None:
        generator.load_state_dict(ckpt["generator"])
        critic.load_state_dict(ckpt["critic"])
        opt_g.load_state_dict(ckpt["opt_generator"])
        opt_c.load_state_dict(ckpt["opt_critic"])
        batches.load_state_dict(ckpt["batches"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        run_dir = Path(args.run_dir)
    else:
        run_dir = Path(args.out) / (args.run_name or f"wgan_mnist__{args.dataset}__{args.seed}__{int(time.time())}")
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    saved_args = {k: v for k, v in vars(args).items() if k != "run_dir"}
    (run_dir / "args.json").write_text(json.dumps(saved_args, indent=2))
    ckpt_path = run_dir / "ckpt" / "last.pt"
    try:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
    except ImportError:
        writer = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.iters, initial=step, dynamic_ncols=True)
    except ImportError:
        bar = None

    first_bad = torch.tensor(-1, device=device)  # first non-finite iteration, read only at log/ckpt steps
    sums, counts = {}, {}
    last_log_time, last_log_critic_steps, critic_steps, start = time.time(), 0, 0, time.time()
    row = {}

    def check_finite():
        bad = int(first_bad)
        if bad >= 0:
            if bar:
                bar.close()
            print(f"{PROG}: non-finite loss at iteration {bad}; stopped, last good checkpoint kept at {ckpt_path}",
                  file=sys.stderr)
            raise SystemExit(1)

    def checkpoint():
        check_finite()
        save_checkpoint(ckpt_path, {
            "generator": generator.state_dict(), "critic": critic.state_dict(), "opt_generator": opt_g.state_dict(),
            "opt_critic": opt_c.state_dict(), "batches": batches.state_dict(), "rng": rng_state(), "step": step,
            "args": saved_args})

    def accumulate(out, it):
        nonlocal first_bad
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v
            counts[k] = counts.get(k, 0) + 1
        bad = ~torch.isfinite(out.get("loss_critic", out.get("loss_gen")))
        first_bad = torch.where((first_bad < 0) & bad, it, first_bad)

    try:
        while step < args.iters:
            for _ in range(critic_iters_for(step, args)):
                accumulate(critic_step(generator, critic, opt_c, batches.next(), args), step + 1)
                critic_steps += 1
            accumulate(generator_step(generator, critic, opt_g, args), step + 1)
            step += 1
            last = step == args.iters
            if step % args.log_every == 0 or last:
                check_finite()
                now = time.time()
                row = {"iter": step, **{k: float(sums[k]) / counts[k] for k in sums}, "lr": args.lr,
                       "images_per_s": (critic_steps - last_log_critic_steps) * args.batch_size
                       / (now - last_log_time),
                       "seconds": now - start}
                if args.penalty == "clip":
                    row["clip_fraction"] = clip_fraction(critic, args.clip_value)
                if args.fid_every and (step % args.fid_every == 0 or last):
                    row.update(fid_of_generator(generator, test_images, args, device))
                sums, counts = {}, {}
                last_log_time, last_log_critic_steps = now, critic_steps
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if writer:
                    for k, v in row.items():
                        writer.add_scalar(k, v, step)
                if bar:
                    bar.set_postfix(loss_c=f"{row['loss_critic']:.4f}", w=f"{row['wasserstein']:.4f}",
                                    img_s=f"{row['images_per_s']:.0f}")
            if bar:
                bar.update(1)
            if (args.sample_every and step % args.sample_every == 0) or last:
                check_finite()
                from torchvision.utils import save_image
                save_image(generate(generator, fixed_z) * 0.5 + 0.5, run_dir / "samples" / f"iter_{step:06d}.png",
                           nrow=8)
            if (args.ckpt_every and step % args.ckpt_every == 0) or last:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        print(f"{PROG}: interrupted at iteration {step}; checkpoint {ckpt_path}", file=sys.stderr)
        return
    finally:
        if bar:
            bar.close()
        if writer:
            writer.close()
    save_gif(run_dir / "samples", run_dir / "progress.gif")
    summary = ", ".join(f"{k} {row[k]:.4g}" for k in ("wasserstein", "loss_critic", "fid") if k in row)
    print(f"{PROG}: {step} generator steps in {time.time() - start:.0f} s; {summary}; run folder {run_dir}")
    return row


if __name__ == "__main__":
    main()
