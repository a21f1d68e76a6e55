"""Run: PYTHONPATH=. python experiments/fish_fid_floor.py. FID floor: 500 fitted fish images vs 500 other fitted fish images, 32x32, same preprocessing as training."""
import numpy as np, torch, torch_fidelity, wgan_gp_64 as w
args = w.parse_args("--data ../shared/data/fish --image-size 32".split())
files = w.find_images(args.data)
perm = np.random.default_rng(0).permutation(len(files))
a, b = [files[i] for i in perm[:500]], [files[i] for i in perm[500:1000]]
m = torch_fidelity.calculate_metrics(
    input1=w.Uint8Images(folder=w.ImageFolder(a, args, augment=False)),
    input2=w.Uint8Images(folder=w.ImageFolder(b, args, augment=False)),
    fid=True, kid=True, kid_subset_size=500, cuda=False, verbose=False, save_cpu_ram=True,
    feature_extractor_weights_path="../shared/models/weights-inception-2015-12-05-6726825d.pth")
print({k: m[k] for k in ("frechet_inception_distance", "kernel_inception_distance_mean")})
