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
Real features are cached in .benchmarks/fid_cache under a name holding the split, image size, n, a hash of
the data path and the device (CPU and CUDA features differ slightly); a cache that does not load is recomputed.
Inception weights: $WGAN_FID_WEIGHTS or ../shared/models/weights-inception-2015-12-05-6726825d.pth (skipped when
absent; nothing is downloaded).
"""
import importlib
import os

import pytest
import torch
from fidtools import CACHE_ROOT, Images, fidelity, fish_sets, generate_uint8, load_generator, mnist_sets

# script -> (checkpoint variable, real data)
SCRIPTS = {"wgan_gp_64": ("WGAN_GP_64_CKPT", "fish"), "wgan_mnist": ("WGAN_MNIST_CKPT", "mnist"),
           "noise_morph": ("NOISE_MORPH_CKPT", "mnist")}
FLOORS = {}  # cache name -> floor FID, computed once per session


def fid_n(plan):
    return plan.fid_n  # $WGAN_FID_N, else 20 with --bench-quick, 200 on CPU, 5000 on CUDA (conftest.plan)


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

    scores = benchmark.pedantic(fidelity, args=(fake, real, cache_name, n, plan.device.type == "cuda", fid_weights), rounds=1,
                                iterations=1)
    floor = None
    if not plan.quick and other is not None:  # real vs real at the same n: the best this n can show
        if cache_name not in FLOORS:
            FLOORS[cache_name] = fidelity(other, real, cache_name, n, plan.device.type == "cuda", fid_weights,
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


def test_fast_path_equals_calculate_metrics(plan, fid_weights, tmp_path):
    """fidtools.fidelity (channels_last Inception, own batches and cache) gives calculate_metrics' FID and KID."""
    import torch_fidelity
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (24, 3, 28, 28), dtype=torch.uint8, generator=g)
    b = (a.float() * 0.7 + 40).to(torch.uint8)  # a related set: FID well above 0
    fake, real = Images(24, lambda i: a[i]), Images(24, lambda i: b[i])
    fid, kid = fidelity(fake, real, None, 24, False, fid_weights)
    m = torch_fidelity.calculate_metrics(input1=fake, input2=real, fid=True, kid=True, kid_subset_size=24,
                                         feature_extractor_weights_path=str(fid_weights), cuda=False,
                                         batch_size=24, save_cpu_ram=True, verbose=False)
    assert fid > 1
    assert fid == pytest.approx(m["frechet_inception_distance"], rel=1e-3)
    assert kid == pytest.approx(m["kernel_inception_distance_mean"], rel=1e-3, abs=1e-5)


def test_feature_cache_is_per_device_and_recomputed_when_it_does_not_load(tmp_path, monkeypatch):
    """Inception runs its convolutions in TF32 on CUDA: CPU and CUDA features are cached apart. A cache file that
    does not load, or holds another number of images, is computed again and replaced."""
    import fidtools
    calls = []

    def fake_extractor(weights, cuda):
        def net(x):
            calls.append(len(x))
            return [x.float().flatten(1)[:, :1].repeat(1, 2048)]
        return net

    monkeypatch.setattr(fidtools, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(fidtools, "extractor", fake_extractor)
    images = Images(3, lambda i: torch.full((3, 4, 4), i, dtype=torch.uint8))
    first = fidtools.features(images, None, False, "real")
    path = fidtools.cache_file("real", False)
    assert calls == [3] and path.is_file() and path != fidtools.cache_file("real", True)
    assert torch.equal(fidtools.features(images, None, False, "real"), first) and calls == [3]  # read back
    path.write_bytes(b"cut short")
    assert torch.equal(fidtools.features(images, None, False, "real"), first) and calls == [3, 3]
    torch.save(torch.zeros(2, 2048), path)  # features of another n under this name
    assert torch.equal(fidtools.features(images, None, False, "real"), first) and calls == [3, 3, 3]
    assert torch.equal(torch.load(path), first)


def test_a_grown_run_is_scored_at_its_stage_upsampled_to_its_image_size(tmp_path):
    """wgan_gp_64 --grow: a snapshot inside the 8 px stage draws 8 px images (its last step's stage), handed to
    Inception at --image-size like the final ones, so every point of a curve compares against the same reals."""
    import numpy as np
    from PIL import Image
    w = importlib.import_module("wgan_gp_64")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    w.main(["--data", str(tmp_path), "--out", str(tmp_path / "runs"), "--run-name", "g", "--image-size", "32",
            "--g-channels", "8", "--d-channels", "8", "--latent-dim", "16", "--batch-size", "4", "--critic-its", "1",
            "--num-workers", "0", "--sample-every", "0", "--iters", "2", "--grow", "8:3,16:3,32", "--fade", "2"])
    generator, args, _ = load_generator(w, tmp_path / "runs" / "g" / "ckpt" / "last.pt")
    assert (generator.res, generator.alpha) == (8, 1.0)
    images = generate_uint8(w, generator, args, 3, "cpu")
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[..., ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2), images)  # nearest
