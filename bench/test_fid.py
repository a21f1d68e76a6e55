"""FID and KID (torch-fidelity) of each script's generator against its real data, and Inception's throughput.

    WGAN_MNIST_CKPT=runs/<run>/ckpt/last.pt WGAN_FID_N=2000 pytest bench/test_fid.py -k wgan_mnist
    pytest bench/test_fid.py --bench-quick          # short training runs, n = 20: a smoke test of the pipeline

Real data: the MNIST test split (torchvision, from $WGAN_SHARED/data, default ../shared/data) for wgan_mnist.py
and noise_morph.py; the fish folder ($WGAN_SHARED/data/fish) fitted to the generator's image size for
wgan_gp_64.py; a fixed subset of n, drawn by a seeded permutation. The generator comes from the checkpoint named
by WGAN_GP_64_CKPT / WGAN_MNIST_CKPT / NOISE_MORPH_CKPT (wgan_gp_64's EMA generator where it has one), or, when
none is named, from a short run of the script's main() with tiny sizes in a temporary folder (WGAN_FID_TRAIN_ITERS
generator steps; its FID only shows that the pipeline works). n = WGAN_FID_N (default 20 with --bench-quick,
200 on CPU, 5000 on CUDA). FID is biased at small n: compare only at the same n; the real-vs-real floor at the
same n (another n real images against the same real set) is given with each FID, except under --bench-quick.
Real features are cached in .benchmarks/fid_cache under a name holding the split, image size, n and a hash of
the data path. Inception weights: $WGAN_FID_WEIGHTS or ../shared/models/weights-inception-2015-12-05-6726825d.pth
(skipped when absent; nothing is downloaded).
"""
import argparse
import hashlib
import importlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = ROOT / ".benchmarks" / "fid_cache"
# script -> (checkpoint variable, real data)
SCRIPTS = {"wgan_gp_64": ("WGAN_GP_64_CKPT", "fish"), "wgan_mnist": ("WGAN_MNIST_CKPT", "mnist"),
           "noise_morph": ("NOISE_MORPH_CKPT", "mnist")}
FLOORS = {}  # cache name -> floor FID, computed once per session


def fid_n(plan):
    return plan.fid_n  # $WGAN_FID_N, else 20 with --bench-quick, 200 on CPU, 5000 on CUDA (conftest.plan)


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
    return generator, args, f"{which} of {path} (step {step})"


def train_briefly(name, module, tmp_path, shared, plan, iters):
    """A few generator steps of the script's own main() with tiny sizes; returns its checkpoint path."""
    data = shared / "data"
    common = ["--iters", str(iters), "--log-every", "1", "--sample-every", "0", "--ckpt-every", "0",
              "--out", str(tmp_path), "--run-name", "bench", "--device", plan.device.type, "--seed", "1"]
    if name == "wgan_gp_64":
        if not (data / "fish").is_dir():
            pytest.skip(f"fish folder not found at {data / 'fish'}")
        subset = tmp_path / "fish"  # 64 linked images: the script checks every file of its folder at start
        subset.mkdir()
        files = module.find_images(data / "fish")
        for i in range(64):
            src = files[i * len(files) // 64]
            (subset / f"{i:03d}{src.suffix}").symlink_to(src.resolve())
        argv = ["--data", str(subset), "--image-size", "32", "--g-channels", "16", "--d-channels", "16",
                "--batch-size", "8", "--critic-its", "1", "--num-workers", "0"]
    elif name == "wgan_mnist":
        argv = ["--data", str(data), "--batch-size", "16", "--critic-its", "1"]
    else:
        argv = ["--dataset", "mnist", "--data", str(data), "--batch-size", "16", "--width", "8",
                "--critic-its", "1", "--morph-its", "1", "--eval-samples", "64"]
    if name != "wgan_gp_64" and not (data / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {data}")
    module.main(argv + common)
    return tmp_path / "bench" / "ckpt" / "last.pt"


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
        out.append(((x + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def fidelity(fake, real, cache_name, n, plan, weights, fake_cache_name=None):
    import torch_fidelity
    cache1 = {"input1_cache_name": fake_cache_name} if fake_cache_name else {}  # the floor's second real set
    m = torch_fidelity.calculate_metrics(**cache1,
        input1=fake, input2=real, fid=True, kid=True, kid_subset_size=min(1000, n),
        feature_extractor_weights_path=str(weights), cuda=plan.device.type == "cuda", batch_size=min(100, n),
        verbose=False, cache=True, cache_root=str(CACHE_ROOT), input2_cache_name=cache_name,
        save_cpu_ram=plan.device.type != "cuda")  # no loader worker processes on a shared CPU
    return m["frechet_inception_distance"], m["kernel_inception_distance_mean"]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_fid(benchmark, plan, shared_dir, fid_weights, record_fid, tmp_path, name):
    try:
        module = importlib.import_module(name)
    except Exception as e:  # a script mid-edit by its owner: its tests report it
        pytest.skip(f"{name}.py does not import ({type(e).__name__}: {e})")
    env, dataset = SCRIPTS[name]
    n, device = fid_n(plan), plan.device
    if os.environ.get(env):
        generator, args, source = load_generator(module, os.environ[env])
    else:
        iters = int(os.environ.get("WGAN_FID_TRAIN_ITERS", 2 if plan.quick else 20))
        generator, args, _ = load_generator(module, train_briefly(name, module, tmp_path, shared_dir, plan, iters))
        source = f"short run: {iters} generator steps of main() at tiny sizes (${env} not set)"
    if dataset == "mnist" and getattr(args, "dataset", "mnist") != "mnist":
        pytest.skip(f"{os.environ.get(env)}: a {args.dataset} run; FID needs an mnist run")
    if dataset == "mnist":
        real, other, cache_name = mnist_sets(shared_dir / "data", n)
    else:
        real, other, cache_name = fish_sets(shared_dir / "data" / "fish", n, module, args)
    fake_images = generate_uint8(module, generator.to(device), args, n, device)
    fake = Images(n, lambda i: fake_images[i])
    cached = CACHE_ROOT.is_dir() and any(p.name.startswith(cache_name + "-") for p in CACHE_ROOT.iterdir())

    scores = benchmark.pedantic(fidelity, args=(fake, real, cache_name, n, plan, fid_weights), rounds=1,
                                iterations=1)
    floor = None
    if not plan.quick and other is not None:  # real vs real at the same n: the best this n can show
        if cache_name not in FLOORS:
            FLOORS[cache_name] = fidelity(other, real, cache_name, n, plan, fid_weights,
                                          fake_cache_name=cache_name.replace("bench-", "bench-floor-", 1))[0]
        floor = FLOORS[cache_name]
    fid, kid = scores
    benchmark.extra_info.update(plan.extra_info(), script=f"{name}.py", n=n, fid=fid, kid=kid, floor_fid=floor,
                                real=cache_name, real_features_cached=cached, generator=source,
                                image_size=list(fake_images.shape[1:]))
    print(f"{name}: FID {fid:.2f}, KID {kid:.4f} at n = {n}"
          + (f" (real-vs-real floor {floor:.2f})" if floor is not None else "") + f"; {source}")
    record_fid({"script": name, "n": n, "fid": fid, "kid": kid, "floor_fid": floor, "source": source,
                "device": str(device)})
    assert fid == fid and kid == kid, "FID/KID is NaN"


def test_inception_throughput(benchmark, plan, fid_weights, record_fid):
    """Images per second through the FID feature extractor (Inception resizes every input to 299 x 299)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    n, batch = fid_n(plan), 100 if plan.device.type == "cpu" else 250
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(fid_weights)).to(plan.device)
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def extract():
        for chunk in images.split(batch):
            net(chunk.to(plan.device))
        plan.sync()

    with torch.no_grad():
        net(images[:2].to(plan.device))  # first call: allocations, cuDNN autotuning
    cuda = plan.device.type == "cuda"
    benchmark.pedantic(extract, rounds=3 if cuda else 1, warmup_rounds=1 if cuda else 0, iterations=1)
    per_s = n / benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(plan.extra_info(), n=n, batch=min(batch, n), images_per_s=per_s, input="64x64 uint8")
    print(f"Inception: {per_s:.1f} images/s at n = {n}, batch {min(batch, n)}, on {plan.device}")
    record_fid({"images_per_s": per_s, "n": n, "batch": min(batch, n), "device": str(plan.device)})
