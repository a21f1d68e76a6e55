#!/usr/bin/env bash
# Fills .carry/ (git-ignored) with what bench/device_check.sh needs on the GPU machine, where nothing can be
# fetched and at most 64 MiB travel with the working tree; run here, from anywhere in the repository:
#   .carry/fish/          2,000 of the fish (a fixed random pick), shorter side cut to 64 px where longer
#                         (the check trains at 64x64), JPEG quality 95
#   .carry/mnist/         the first 10,000 MNIST training and 1,000 test digits, gzipped IDX (wgan_mnist.py)
#   .carry/weights-...-fp16.pth   the float16 FID Inception (46 MB), checked to load into torch-fidelity's
#                         extractor as float32 and to give the float32 weights' features
#   .carry/wheels/        torch-fidelity 0.4.0 for Python 3.12 (pure Python; the machine has its needs)
# Fails when .carry/ would pass 60 MiB. WGAN_SHARED points at the shared folder (default ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${WGAN_SHARED:-../shared}"
PY="${PYTHON:-.venv/bin/python}"
DEST=.carry
FP16=weights-inception-2015-12-05-6726825d-fp16.pth
rm -rf "$DEST/fish" "$DEST/mnist" "$DEST/wheels"
mkdir -p "$DEST/fish" "$DEST/mnist" "$DEST/wheels"
cp "$SHARED/models/$FP16" "$DEST/$FP16"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$DEST/wheels" torch-fidelity==0.4.0
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" - "$SHARED" "$DEST" "$FP16" <<'PYEOF'
import gzip
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

shared, dest, fp16 = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
files = sorted(p for p in (shared / "data" / "fish").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
pick = random.Random(0).sample(files, 2000)
for path in pick:
    image = Image.open(path).convert("RGB")
    scale = 64 / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    out = dest / "fish" / path.parent.name / (path.stem + ".jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, quality=95)
print(f"fish: {len(pick)} of {len(files)} images")

raw = shared / "data" / "MNIST" / "raw"
for split, n in (("train", 10000), ("t10k", 1000)):
    for kind, head in (("images-idx3", 16), ("labels-idx1", 8)):
        name = f"{split}-{kind}-ubyte"
        data = bytearray((raw / name).read_bytes())
        item = 784 if kind.startswith("images") else 1
        data[4:8] = n.to_bytes(4, "big")  # the IDX header's count
        (dest / "mnist" / f"{name}.gz").write_bytes(gzip.compress(bytes(data[:head + n * item]), 9))
print("mnist: 10,000 train and 1,000 test digits")

# the float16 weights load into torch-fidelity's extractor as float32 and give the float32 weights' features
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
state = torch.load(dest / fp16, map_location="cpu")
assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}, "not a float16 state dict"
nets = [FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(p)).eval()
        for p in (dest / fp16, shared / "models" / fp16.replace("-fp16", ""))]
assert all(p.dtype == torch.float32 for p in nets[0].parameters()), "the extractor is not float32"
x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((64, 64)))).permute(2, 0, 1)
                 for p in pick[:8]])
with torch.no_grad():
    half, full = (net(x)[0] for net in nets)
err = ((half - full).norm() / full.norm()).item()
assert err < 1e-2, f"float16 weights' features differ from float32's by {err:.2e}"
print(f"weights: {fp16} loads into torch-fidelity's extractor (float32); features within {err:.1e} of float32's")
PYEOF
SIZE=$(du -sb "$DEST" | cut -f1)
echo "$DEST: $((SIZE / 1024 / 1024)) MiB ($SIZE bytes): $(ls "$DEST/wheels")"
if [ "$SIZE" -gt $((60 * 1024 * 1024)) ]; then echo "$DEST is over 60 MiB" >&2; exit 1; fi
