#!/usr/bin/env bash
# seed 001 experiments, serial, one process at a time, 1 thread. The clipped runs are made twice: with the
# default critic (BatchNorm in clip mode) and with --critic-norm none (the critic of the first table).
# The tables of docs/wgan_mnist.md came from commit 239a519 (64-wide nets); base, k1 and clip05 pin the paper's lr 5e-5,
# the clipped default then (now 5e-4).
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
W=../shared/models/weights-inception-2015-12-05-6726825d.pth
COMMON="--data ../shared/data --out runs/exp001 --iters 500 --log-every 25 --sample-every 100 --ckpt-every 500 --fid-every 500 --fid-samples 500 --fid-weights $W --seed 1"
run() { name=$1; shift; echo "=== $name $(date -u +%T) :: python wgan_mnist.py $*"; /usr/bin/time -f "$name wall %e s cpu %U s" .venv/bin/python wgan_mnist.py "$@" 2>&1 | tr '\r' '\n' | grep -v '%|' ; }
run floor500 --data ../shared/data --out runs/exp001 --fid-floor --fid-samples 500 --fid-weights $W
run gp $COMMON --run-name gp --penalty gp
for norm in batch none; do
  sfx=$([ $norm = none ] && echo _nobn)
  run base$sfx $COMMON --critic-norm $norm --run-name base$sfx --lr 5e-5
  run k1$sfx $COMMON --critic-norm $norm --run-name k1$sfx --critic-its 1 --lr 5e-5
  run clip05$sfx $COMMON --critic-norm $norm --run-name clip05$sfx --clip-value 0.05 --lr 5e-5
  run lr5e-4$sfx $COMMON --critic-norm $norm --run-name lr5e-4$sfx --lr 5e-4
done
echo "=== done $(date -u +%T)"
