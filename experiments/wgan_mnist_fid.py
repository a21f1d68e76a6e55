"""FID/KID of a wgan_mnist.py checkpoint against the MNIST test split at n images (the script's own FID code),
and a 64-image grid of it, samples/ckpt_<step>[_ema].png (eval mode, z seeded 0). The last argument picks the
training generator (`generator`) or its moving average (`ema`); by default the one the script's own grids and
FIDs show: the average when the run keeps one (the clipped default does, --ema 0.999), else the generator.

    PYTHONPATH=. python experiments/wgan_mnist_fid.py runs/<run> 2000 ../shared/models/weights-inception-2015-12-05-6726825d.pth [generator|ema]
"""
import json
import sys

import torch
from torchvision.utils import save_image

import wgan_mnist as wm

run, n, weights = sys.argv[1], int(sys.argv[2]), sys.argv[3]
path = wm.checkpoint_file(run)
args = wm.parse_args(["--resume", str(path), "--fid-samples", str(n), "--fid-weights", weights, "--device", "cpu"])
ckpt, device = wm.load_checkpoint(path), torch.device("cpu")
which = sys.argv[4] if len(sys.argv) > 4 else "ema" if ckpt.get("ema") else "generator"
generator = wm.Generator(args)
generator.load_state_dict(ckpt[which])
generator.eval()
with torch.no_grad():
    grid = generator(torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(0)))
suffix = "_ema" if which == "ema" else ""
save_image(grid * 0.5 + 0.5, path.parent.parent / "samples" / f"ckpt_{ckpt['step']:06d}{suffix}.png", nrow=8)
scores = wm.compute_fid(wm.load_inception(args, device), generator, wm.load_split(args, train=False), args, device)
print(json.dumps({"run": run, "step": ckpt["step"], "generator": which, **scores}))
