"""Every picture under docs/images/, made from the run folders that the docs' commands write.

    .venv/bin/python experiments/make_figures.py \
        --mnist-ttq .benchmarks/ttq/<time>     # WGAN_TTQ_T=1800 WGAN_TTQ_FLAGS="--penalty gp" (docs/wgan_mnist.md)
        --mnist-clip-ttq .benchmarks/ttq/<time>   # WGAN_TTQ_T=1800 WGAN_TTQ_FLAGS="": the clipped default
        --fish-ttq .benchmarks/ttq/<time>      # the CPU recipe vs the DCGAN baseline (docs/wgan_gp_64.md)
        --fish64-ttq .benchmarks/ttq/<time>    # 64 px, 1 h: grown vs from scratch (WGAN_TTQ_VS, docs/wgan_gp_64.md)
        --fish64-2h-ttq .benchmarks/ttq/<time> # 64 px, 2 h: grown vs the DCGAN baseline (docs/wgan_gp_64.md)
        --fish64-2h-vs-ttq .benchmarks/ttq/<time>  # 64 px, 2 h, seed 2: grown vs from scratch (WGAN_TTQ_VS)
        --fish64-amp-ttq .benchmarks/ttq/<time>    # 64 px, 2 h, seed 2: grown with --amp vs grown in float32
        --fish64-from32-ttq .benchmarks/ttq/<time> # 64 px, 2 h, seed 2: grown from 32 px vs the recipe's schedule
        --fish64-slim-ttq .benchmarks/ttq/<time>   # 64 px, 2 h, seed 2, --amp: --slim-above 32 vs full width
        --fish64-ema-ttq .benchmarks/ttq/<time>    # 64 px, 2 h, seed 2, slim, --ema 0.9999: lr 4e-4 vs a late 1e-4
        --fish64-critic1-ttq .benchmarks/ttq/<time>  # the same with --critic-its 1: lr 4e-4 vs 6e-4
        --fish64-lr-ttq .benchmarks/ttq/<time>       # the same: lr 8e-4 vs 1.2e-3
        --fish64-seed3-ttq .benchmarks/ttq/<time>    # 64 px, 2 h, seed 3: the CPU recipe vs the earlier one
        --fish64-dcgan-ttq .benchmarks/ttq/<time>    # 64 px, 2 h, seed 1: the CPU recipe vs the DCGAN baseline
        --mnist-2h runs/gallery/mnist2h        # the README's 2 h MNIST run, then experiments/score_run.py on it
        --fish32-2h runs/gallery/fish32_2h     # the README's 2 h fish 32 px run, then experiments/score_run.py
        --seed001 runs/docs                    # bash experiments/docs_runs.sh (seed001_* runs)
        --morph runs/docs/morph_8gaussians     # the same script's noise_morph run

Each option is independent; the ones given overwrite their images. Grids are cropped or upscaled by an integer
factor (nearest), never resampled, and written as optimised PNG (the 64 px grids, over 400 KB as PNG or lossless
WebP, as WebP of quality 90; the seed-1 and seed-3 pairs' progress strips and interpolations too).
"""
import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
SEED001 = {"seed001_k5": "k = 5 (clip 0.01, RMSprop 5e-5)", "seed001_k1": "k = 1", "seed001_clip05": "clip 0.05",
           "seed001_lr5e-4": "RMSprop lr 5e-4", "seed001_gp": "--penalty gp"}


def save_png(image, name, scale=1):
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if name.endswith(".webp"):  # the 64 px grids: as PNG (and lossless WebP) over 400 KB
        image.save(OUT / name, quality=90, method=6)
    else:
        image.save(OUT / name, optimize=True)
    print(f"{OUT / name}: {image.width}x{image.height}, {(OUT / name).stat().st_size // 1024} KB")


def save_figure(fig, name):
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=80)
    plt.close(fig)
    save_png(Image.open(OUT / name).convert("RGB"), name)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curve(ttq, name, title, labels=None):
    """FID against training seconds for both arms, from the bench's curve.json, floor dashed."""
    data = json.loads((ttq / "curve.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm in data["arms"]:
        ax.plot(arm["seconds"], arm["fid"], "o-", label=(labels or {}).get(arm["name"], arm["label"]))
    ax.axhline(data["floor"], ls="--", c="gray", label=f"floor (real vs real) {data['floor']:.2f}")
    ax.set(xlabel="training seconds (one CPU thread each, side by side)", ylabel=f"FID, n = {data['n']}",
           title=title, ylim=(0, None))
    ax.legend(fontsize=8)
    save_figure(fig, name)


# the 2 h, seed 2 pairs of issue 23 (WGAN_TTQ_VS): option --fish64-<name>-ttq -> (title, script arm, vs arm)
SEED2_PAIRS_64 = {
    "2h_vs": (": grown vs from scratch", "grown 16 -> 32 -> 64 (64 px at both points)", "from scratch at 64 px"),
    "amp": (": grown in bf16 vs float32", "grown, --amp (bf16)", "grown, float32"),
    "from32": (": two growing schedules", "grown 32 -> 64: --grow 32:16000,64",
               "grown 16 -> 32 -> 64: --grow 16:4500,32:6500,64"),
    "slim": (", bf16: slim vs full 64 px layers", "grown, --slim-above 32 (64 px: 16 channels, 3x3)",
             "grown, full width (32, 5x5)"),
    "ema": (", bf16: a late lr drop or none", "slim, --ema 0.9999", "slim, --ema 0.9999, lr 1e-4 from epoch 110"),
    "critic1": (", bf16: one critic step", "slim, --ema 0.9999, --critic-its 1, lr 4e-4", "the same, lr 6e-4"),
    "lr": (", bf16: one critic step, larger lr", "slim, --ema 0.9999, --critic-its 1, lr 8e-4", "the same, lr 1.2e-3"),
}

CURVE_ONLY = {"ema", "slim", "from32", "amp"}  # their grids left docs/images (its 5 MB budget); described in the docs


def ttq_images(ttq, prefix, title, scale, other="baseline", labels=None, ext="png", grids=True):
    curve(ttq, f"{prefix}_curve.png", title, labels)
    for arm in ("script", other) if grids else ():
        save_png(Image.open(ttq / f"{arm}_grid.png").convert("RGB"), f"{prefix}_{arm}_grid.{ext}", scale)


def fish_figures(run, prefix, scale, ext="png"):
    frames = sorted((run / "samples").glob("iter_*.png"))
    picked = [frames[round(i * (len(frames) - 1) / 5)] for i in range(6)] if len(frames) >= 6 else frames
    size = Image.open(frames[-1]).size  # a grown run's early grids are smaller: upsampled (nearest) to the last's
    tiles = []
    for frame in picked:  # the top-left 4x4 tiles of each grid (torchvision's 2 px padding between tiles)
        grid = Image.open(frame).convert("RGB").resize(size, Image.NEAREST)
        tile = (grid.width - 2) // 8
        tiles.append(grid.crop((0, 0, 4 * tile + 2, 4 * tile + 2)))
    strip = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * tile.width, 0))
    save_png(strip, f"{prefix}_progress.{ext}", scale)
    print("  progress frames:", ", ".join(p.stem for p in picked))
    save_png(Image.open(run / "interpolation.png").convert("RGB"), f"{prefix}_interpolation.{ext}", scale)
    save_png(Image.open(run / "nearest_neighbours.png").convert("RGB"), f"{prefix}_nearest_neighbours.png")


def seed001(runs):
    """One line per run; clip 0.01 on the left, the two whose critic scale is larger on the right (the estimate
    grows with the clip value, so it compares over time within a run, not across panels)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, label in SEED001.items():
        r = [x for x in rows(runs / name / "metrics.jsonl") if "wasserstein" in x]
        ax = axes[1] if name in ("seed001_clip05", "seed001_gp") else axes[0]
        ax.plot([x["iter"] for x in r], [x["wasserstein"] for x in r], label=label, lw=1)
    for ax, title in zip(axes, ("clip 0.01", "clip 0.05 and the gradient penalty")):
        ax.set(xlabel="generator step", ylabel="mean D(real) - mean D(fake)", title=title)
        ax.legend(fontsize=8)
    fig.suptitle("seed 001: the critic's Wasserstein estimate over training (MNIST, batch 64)", fontsize=10)
    save_figure(fig, "seed001_wasserstein.png")


def morph(run):
    r = [x for x in rows(run / "metrics.jsonl") if x.get("d_gnmz") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([x["iter"] for x in r], [x["d_gz"] for x in r], label="mean D(G(z))")
    ax.plot([x["iter"] for x in r], [x["d_gnmz"] for x in r], label="mean D(G(NM(z)))")
    ax.set(xlabel="generator step", ylabel="critic score", title="seed 003's graph: 8 Gaussians, morphing on")
    ax.legend(fontsize=8)
    save_figure(fig, "morph_scores.png")
    for src, name in (("critic_contour.png", "morph_contour.png"), ("latent.png", "morph_latent.png")):
        shutil.copyfile(run / src, OUT / name)
        save_png(Image.open(OUT / name).convert("RGB"), name)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist-ttq", type=Path)
    p.add_argument("--mnist-clip-ttq", type=Path)
    p.add_argument("--fish-ttq", type=Path)
    p.add_argument("--fish64-ttq", type=Path)
    p.add_argument("--fish64-2h-ttq", type=Path)
    for name in SEED2_PAIRS_64:
        p.add_argument(f"--fish64-{name.replace('_', '-')}-ttq", type=Path)
    p.add_argument("--fish64-seed3-ttq", type=Path)
    p.add_argument("--fish64-dcgan-ttq", type=Path)
    p.add_argument("--mnist-2h", type=Path)
    p.add_argument("--fish32-2h", type=Path)
    p.add_argument("--seed001", type=Path)
    p.add_argument("--morph", type=Path)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.mnist_ttq:
        ttq_images(args.mnist_ttq, "mnist", "MNIST: wgan_mnist.py --penalty gp vs MLP WGAN-GP", 2)
    if args.mnist_clip_ttq:
        ttq_images(args.mnist_clip_ttq, "mnist_clip", "MNIST: wgan_mnist.py (weight clipping) vs MLP WGAN-GP", 2)
    if args.fish_ttq:
        ttq_images(args.fish_ttq, "fish32", "fish 32x32: CPU recipe vs DCGAN WGAN-GP", 2)
        fish_figures(args.fish_ttq / "script", "fish32", 2)
    if args.fish64_ttq:
        labels = {"script": "grown: --grow 16:4500,32:6500,64 --fade 500 (before T: upsampled)",
                  "vs": "from scratch at 64 px"}
        ttq_images(args.fish64_ttq, "fish64", "fish 64x64: CPU recipe grown vs from scratch", 1, "vs", labels, "webp")
    if args.fish64_2h_ttq:
        labels = {"script": "grown: the CPU recipe (before T: upsampled)", "baseline": "DCGAN WGAN-GP at 64 px"}
        ttq_images(args.fish64_2h_ttq, "fish64_2h", "fish 64x64, 2 h: CPU recipe grown vs DCGAN WGAN-GP", 1,
                   labels=labels, ext="webp")
    for name, (title, script, vs) in SEED2_PAIRS_64.items():
        if ttq := getattr(args, f"fish64_{name}_ttq"):
            ttq_images(ttq, f"fish64_{name}", f"fish 64x64, 2 h, seed 2{title}", 1, "vs", {"script": script, "vs": vs},
                       "webp", grids=name not in CURVE_ONLY)
    if args.fish64_seed3_ttq:
        labels = {"script": "the CPU recipe: one critic step, lr 8e-4, slim 64 px layers, EMA 0.9999, bf16",
                  "vs": "the earlier recipe: two critic steps, lr 4e-4, full width, EMA 0.999, float32"}
        ttq_images(args.fish64_seed3_ttq, "fish64_seed3", "fish 64x64, 2 h, seed 3: the CPU recipe vs the earlier one",
                   1, "vs", labels, "webp")
        fish_figures(args.fish64_seed3_ttq / "script", "fish64_seed3", 1, "webp")
    if args.fish64_dcgan_ttq:
        labels = {"script": "the CPU recipe: grown 16 -> 32 -> 64 px, bf16", "baseline": "DCGAN WGAN-GP at 64 px"}
        ttq_images(args.fish64_dcgan_ttq, "fish64_dcgan", "fish 64x64, 2 h, seed 1: the CPU recipe vs DCGAN WGAN-GP", 1,
                   labels=labels, ext="webp")
        fish_figures(args.fish64_dcgan_ttq / "script", "fish64_dcgan", 1, "webp")
    if args.mnist_2h:
        save_png(Image.open(args.mnist_2h / "score_grid.png").convert("RGB"), "mnist_2h_grid.png", 2)
    if args.fish32_2h:
        save_png(Image.open(args.fish32_2h / "score_grid.png").convert("RGB"), "fish32_2h_grid.png", 2)
        fish_figures(args.fish32_2h, "fish32_2h", 2)
    if args.seed001:
        seed001(args.seed001)
    if args.morph:
        morph(args.morph)


if __name__ == "__main__":
    main()
