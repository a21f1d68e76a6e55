"""FID/KID of a wgan_mnist.py checkpoint against the MNIST test split at n images (the script's own FID code).

    PYTHONPATH=. python experiments/wgan_mnist_fid.py runs/<run> 2000 ../shared/models/weights-inception-2015-12-05-6726825d.pth
"""
import json
import sys

import torch

import wgan_mnist as wm

run, n, weights = sys.argv[1], int(sys.argv[2]), sys.argv[3]
path, ckpt = wm.load_checkpoint(run)
args = wm.parse_args(wm.as_flags(ckpt["args"], str(path)) + ["--fid-samples", str(n), "--fid-weights", weights,
                                                            "--device", "cpu"])
generator = wm.Generator(args)
generator.load_state_dict(ckpt["generator"])
scores = wm.fid_of_generator(generator, wm.load_split(args, train=False), args, torch.device("cpu"))
print(json.dumps({"run": run, "step": ckpt["step"], **scores}))
