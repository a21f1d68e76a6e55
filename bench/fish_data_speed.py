"""Milliseconds per training image of wgan_gp_64.py's data path on one thread: decoding and fitting each time or
once at start (--cache-images), with and without augmentation, interleaved over rounds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fish_data_speed.py --data ../shared/data/fish --image-size 32
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wgan_gp_64 as w  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", default="32")
    p.add_argument("--images", type=int, default=300, help="images per arm and round")
    p.add_argument("--rounds", type=int, default=3)
    opts = p.parse_args()
    torch.set_num_threads(1)
    files = w.scan_folder(opts.data)
    start = time.perf_counter()
    cached = w.ImageFolder(files, w.parse_args(["--image-size", opts.image_size]), cache=True)
    cache_s = time.perf_counter() - start
    arms = {}
    for augment in (True, False):
        args = w.parse_args(["--image-size", opts.image_size] + ([] if augment else ["--no-augment"]))
        arms[f"decode each time, {'augmented' if augment else 'plain'}"] = w.ImageFolder(files, args)
        data = w.ImageFolder(files, args)
        data.files, data.images = cached.files, cached.images  # share the one cache
        arms[f"cached, {'augmented' if augment else 'plain'}"] = data
    times = {k: [] for k in arms}
    step = max(1, len(files) // opts.images)
    for r in range(opts.rounds):
        for name, data in arms.items():
            t = time.perf_counter()
            for i in range(0, len(data), step)[:opts.images]:
                data[(i, r * 100003 + i)]
            times[name].append((time.perf_counter() - t) / opts.images * 1000)
    print(f"{len(files)} files, {opts.image_size}px; caching all at start took {cache_s:.1f} s "
          f"({len(cached.images) * cached.images[0].numel() / 2**20:.0f} MiB)")
    for name, t in times.items():
        print(f"{name:<30} {statistics.median(t):6.2f} ms per image (median of {opts.rounds} rounds)")


if __name__ == "__main__":
    main()
