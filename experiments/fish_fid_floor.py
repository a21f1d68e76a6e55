"""FID floor of a folder: n fitted images against n other fitted images, same preprocessing as training. With a
smaller size, also the first n averaged down to it and upsampled back (nearest, as the bench shows a grown run's
smaller stages, and bilinear) against the same others: the best a generator of that size scores at the full size.

    PYTHONPATH=. python experiments/fish_fid_floor.py [folder] [n] [image size] [smaller size]  # fish, 500, 32, none
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

import wgan_gp_64 as w

folder, n, size, small = (sys.argv[1:] + ["../shared/data/fish", "500", "32", "0"][len(sys.argv) - 1:])[:4]
n, small = int(n), int(small)
args = w.parse_args(["--data", folder, "--image-size", size,
                     "--fid-weights", "../shared/models/weights-inception-2015-12-05-6726825d.pth"])
files = w.find_images(args.data)
perm = np.random.default_rng(0).permutation(len(files))
data = w.ImageFolder(files, args, augment=False)
inception, cpu = w.load_inception(args, torch.device("cpu")), torch.device("cpu")
first, others = (torch.stack([data.uint8(i) for i in part]) for part in (perm[:n], perm[n:2 * n]))
sets = {"floor": first}
if small:
    down = w.shrink(first, small).float()
    for mode in ("nearest", "bilinear"):
        up = F.interpolate(down, size=args.image_size, mode=mode)
        sets[f"{small} px, {mode} up"] = up.round().clamp(0, 255).to(torch.uint8)
b = w.inception_features(inception, others, cpu)
for name, images in sets.items():
    a = w.inception_features(inception, images, cpu)
    fid = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    kid = kid_features_to_metric(a, b, kid_subset_size=min(1000, n), verbose=False)
    print({"set": name, "n": n, "size": args.image_size, "fid": fid["frechet_inception_distance"],
           "kid": kid["kernel_inception_distance_mean"]})
