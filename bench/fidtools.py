"""FID helpers shared by the benchmarks: what torch-fidelity takes, the real sets with their cache names, a
script's generator from its checkpoint, and one torch-fidelity call with the real side's features cached."""
import argparse
import hashlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = ROOT / ".benchmarks" / "fid_cache"


class Images(torch.utils.data.Dataset):
    """What torch-fidelity takes: uint8 [3, H, W] items; `load(i)` may read lazily (a cache hit reads nothing)."""

    def __init__(self, count, load):
        self.count, self.load = count, load

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        x = self.load(i)
        return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).contiguous()


def short_key(*parts):
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def mnist_sets(root, n):
    """(real test subset, another real subset from the train split for the floor, cache name)."""
    from torchvision.datasets import MNIST
    if not (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {root} (set WGAN_SHARED)")
    test, train = MNIST(str(root), train=False).data, MNIST(str(root), train=True).data
    if n > len(test):
        pytest.skip(f"WGAN_FID_N={n} is more than the {len(test)} MNIST test images")
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    other = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:n]
    name = f"bench-mnist-test-28px-n{n}-perm0-{short_key(Path(root).resolve(), n)}"
    return (Images(len(pick), lambda i: test[pick[i]].unsqueeze(0)),
            Images(len(other), lambda i: train[other[i]].unsqueeze(0)), name)


def fish_sets(folder, n, module, args):
    """The same for the fish folder, fitted (not augmented) to the generator's size as the script's FID does."""
    if not Path(folder).is_dir():
        pytest.skip(f"fish folder not found at {folder} (set WGAN_SHARED)")
    files = module.find_images(folder)
    if n > len(files):
        pytest.skip(f"WGAN_FID_N={n} is more than the {len(files)} images in {folder}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    data = module.ImageFolder(files, args, augment=False)
    pick, other = order[:n], order[n:2 * n]
    name = (f"bench-fish-{args.image_size}px-c{args.channels}-{args.fit}-n{n}-perm0-"
            f"{short_key(Path(folder).resolve(), len(files), args.image_size, args.channels, args.fit, n)}")
    floor = Images(n, lambda i: data.uint8(other[i])) if len(other) == n else None
    return Images(n, lambda i: data.uint8(pick[i])), floor, name


# ------------------------------------------------------------------------------------------ the generator
def load_generator(module, path):
    """Generator(args) from a checkpoint of the script: its args, and the EMA weights where there are some."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the scripts keep numpy RNG state in it
    args = argparse.Namespace(**{**vars(module.parse_args([])), **ckpt["args"]})
    if "models" in ckpt:  # noise_morph: [(generator, its optimizer), (critic, ...), (morpher, ...)]
        state, which = ckpt["models"][0][0], "generator"
    elif ckpt.get("ema"):
        state, which = ckpt["ema"], "EMA generator"
    else:
        state, which = ckpt["generator"], "generator"
    generator = module.Generator(args)
    generator.load_state_dict(state)
    step = next((ckpt[k] for k in ("iteration", "step", "iter") if k in ckpt), "?")
    if getattr(args, "grow", None):  # wgan_gp_64 --grow: the resolution and fade of its last step
        generator.res, generator.alpha = module.growth(args, max(0, step - 1))
    return generator, args, f"{which} of {path} (step {step})"


@torch.no_grad()
def generate_uint8(module, generator, args, n, device):
    """n generated images as uint8 [n, C, H, W] from a fixed noise stream (the script's noise distribution)."""
    generator.eval()  # wgan_mnist's generator has BatchNorm: running statistics, as its own FID uses
    g, out = torch.Generator().manual_seed(12345), []
    for start in range(0, n, 250):
        m = min(250, n - start)
        z = (module.sample_z(m, args.latent_dim, "cpu", g) if hasattr(module, "sample_z")
             else torch.randn(m, args.latent_dim, generator=g))
        x = generator(z.to(device)).float().clamp(-1, 1)
        if x.shape[-1] < getattr(args, "image_size", x.shape[-1]):  # a grown run before its last stage: shown
            x = torch.nn.functional.interpolate(x, size=args.image_size)  # upsampled, against the same reals
        out.append(((x + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


EXTRACTORS = {}


def extractor(weights, cuda):
    """torch-fidelity's FID Inception; on a CPU in channels_last, whose NHWC kernels measured 1.3-1.6x faster."""
    if (str(weights), cuda) not in EXTRACTORS:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(weights)).eval()
        EXTRACTORS[str(weights), cuda] = net.cuda() if cuda else net.to(memory_format=torch.channels_last)
    return EXTRACTORS[str(weights), cuda]


def cache_file(cache_name, cuda):
    """Where features cached under cache_name live: one file per device, as Inception's convolutions run in TF32
    on CUDA and its features differ from the CPU's in the last digits."""
    return CACHE_ROOT / f"{cache_name}-{'cuda' if cuda else 'cpu'}.pt"


@torch.no_grad()
def features(images, weights, cuda, cache_name=None):
    """Inception pool features [n, 2048] of a dataset of uint8 [3, H, W] items, read from / written to the
    cache when named; a cache file that does not load or holds another n is computed again. Batches of 25 on a
    CPU (measured faster than 100), 250 on CUDA, no loader workers."""
    path = cache_file(cache_name, cuda) if cache_name else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path)
        except Exception:  # cut short by a killed run, or written by another torch: recomputed below
            cached = None
        if isinstance(cached, torch.Tensor) and cached.shape == (len(images), 2048):
            return cached
    net, batch, parts = extractor(weights, cuda), 250 if cuda else 25, []
    for start in range(0, len(images), batch):
        x = torch.stack([images[i] for i in range(start, min(len(images), start + batch))])
        parts.append(net(x.cuda() if cuda else x)[0].cpu())
    out = torch.cat(parts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path.with_suffix(".tmp"))  # whole or not at all: a killed run leaves no half file
        path.with_suffix(".tmp").replace(path)
    return out


def fidelity(fake, real, cache_name, n, cuda, weights, fake_cache_name=None):
    """(FID, KID mean) with torch-fidelity's extractor and metric code, as its calculate_metrics computes them
    (bench/test_fid.py checks the two agree); the real side's features cached under cache_name."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    f1, f2 = features(fake, weights, cuda, fake_cache_name), features(real, weights, cuda, cache_name)
    fid = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), verbose=False)
    kid = kid_features_to_metric(f1, f2, kid_subset_size=min(1000, n), verbose=False)
    return fid["frechet_inception_distance"], kid["kernel_inception_distance_mean"]
