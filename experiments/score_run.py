"""FID and KID of one script's run folder at n, scored as the time-to-quality bench scores its arms (the same real
images, the same fixed noise, the EMA generator where the run keeps one, bench/fidtools.py), with the floor
(those n real images against n others). Writes <run>/score.json and <run>/score_grid.png, the first 64 scored
images as an 8x8 grid: the gallery's pictures of runs made alone (the README's 2 h rows).

    PYTHONPATH=. .venv/bin/python experiments/score_run.py wgan_mnist runs/<run> 2000 --data ../shared/data
    PYTHONPATH=. .venv/bin/python experiments/score_run.py wgan_gp_64 runs/<run> 1000 --data ../shared/data/fish
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fidtools import Images, fidelity, fish_sets, generate_uint8, load_generator, mnist_sets  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("script", choices=["wgan_mnist", "wgan_gp_64", "noise_morph"])
p.add_argument("run", type=Path)
p.add_argument("n", type=int)
p.add_argument("--data", type=Path, required=True, help="MNIST's torchvision root, or the image folder")
p.add_argument("--weights", type=Path, default=Path("../shared/models/weights-inception-2015-12-05-6726825d.pth"))
args = p.parse_args()

module = importlib.import_module(args.script)
generator, run_args, what = load_generator(module, args.run / "ckpt" / "last.pt")
fake = generate_uint8(module, generator, run_args, args.n, torch.device("cpu"))
if args.script == "wgan_gp_64":
    real, other, name = fish_sets(args.data, args.n, module, run_args)
else:
    real, other, name = mnist_sets(args.data, args.n)
fid, kid = fidelity(Images(args.n, lambda i: fake[i]), real, name, args.n, False, args.weights)
floor_fid, floor_kid = fidelity(other, real, name, args.n, False, args.weights,
                                fake_cache_name=name.replace("bench-", "bench-floor-", 1))
save_image(fake[:64].float() / 255, args.run / "score_grid.png", nrow=8)
rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
score = {"scored": what, "n": args.n, "real": name, "fid": fid, "kid": kid, "floor_fid": floor_fid,
         "floor_kid": floor_kid, "last_row": rows[-1] if rows else None}
(args.run / "score.json").write_text(json.dumps(score, indent=1))
print(json.dumps(score))
