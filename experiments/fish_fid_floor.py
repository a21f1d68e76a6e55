"""FID floor of a folder: n fitted images against n other fitted images, same preprocessing as training.

    PYTHONPATH=. python experiments/fish_fid_floor.py [folder] [n] [image size]      # default: fish, 500, 32
"""
import sys

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

import wgan_gp_64 as w

folder, n, size = (sys.argv[1:] + ["../shared/data/fish", "500", "32"][len(sys.argv) - 1:])[:3]
n = int(n)
args = w.parse_args(["--data", folder, "--image-size", size,
                     "--fid-weights", "../shared/models/weights-inception-2015-12-05-6726825d.pth"])
files = w.find_images(args.data)
perm = np.random.default_rng(0).permutation(len(files))
data = w.ImageFolder(files, args, augment=False)
inception, cpu = w.load_inception(args, torch.device("cpu")), torch.device("cpu")
a, b = (w.inception_features(inception, torch.stack([data.uint8(i) for i in part]), cpu)
        for part in (perm[:n], perm[n:2 * n]))
fid = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
kid = kid_features_to_metric(a, b, kid_subset_size=min(1000, n), verbose=False)
print({"n": n, "fid": fid["frechet_inception_distance"], "kid": kid["kernel_inception_distance_mean"]})
