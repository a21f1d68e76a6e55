#!/usr/bin/env bash
# The untimed runs behind the docs' pictures (experiments/make_figures.py draws them): seed 001's five settings for
# 500 generator steps (its Wasserstein curves; k, lr and --ema given, so that a new clipped default leaves the figure) and
# noise_morph on 8 Gaussians (seed 003's D(G(z)) vs D(G(NM(z))) curve, critic contour, latent panels).
# Step counts, not wall time, fix these runs, so they may share the machine. Usage: bash experiments/docs_runs.sh
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
MNIST=${MNIST:-../shared/data}
COMMON="--data $MNIST --out runs/docs --iters 500 --log-every 5 --sample-every 100 --ckpt-every 500 --seed 1"
py() { echo "=== $(date -u +%T) python $*"; .venv/bin/python "$@" 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -2; }
py wgan_mnist.py $COMMON --run-name seed001_k5 --critic-its 5 --lr 5e-5 --ema 0
py wgan_mnist.py $COMMON --run-name seed001_k1 --critic-its 1 --lr 5e-5 --ema 0
py wgan_mnist.py $COMMON --run-name seed001_clip05 --critic-its 5 --clip-value 0.05 --lr 5e-5 --ema 0
py wgan_mnist.py $COMMON --run-name seed001_lr5e-4 --critic-its 5 --lr 5e-4 --ema 0
py wgan_mnist.py $COMMON --run-name seed001_gp --penalty gp
py noise_morph.py --dataset 8gaussians --width 128 --iters 5000 --seed 1 --log-every 50 --sample-every 1000 \
    --ckpt-every 1000 --out runs/docs --run-name morph_8gaussians
echo "=== done $(date -u +%T)"
