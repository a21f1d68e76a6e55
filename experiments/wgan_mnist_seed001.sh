#!/usr/bin/env bash
# seed 001 experiments, serial, one process at a time, 1 thread: the seed's settings, each pinned by its flags
# (k 5, RMSprop 5e-5, no average, then one change each), and the clipped default beside them. The clipped runs
# are made with the default critic (BatchNorm in clip mode) and, with NORMS="batch none", also with
# --critic-norm none (the critic of docs/wgan_mnist.md's first table). Usage: bash experiments/wgan_mnist_seed001.sh
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
W=../shared/models/weights-inception-2015-12-05-6726825d.pth
SEED001="--critic-its 5 --lr 5e-5 --ema 0"
COMMON="--data ../shared/data --out runs/exp001 --iters 500 --log-every 25 --sample-every 100 --ckpt-every 500 --fid-every 500 --fid-samples 500 --fid-weights $W --seed 1"
run() { name=$1; shift; echo "=== $name $(date -u +%T) :: python wgan_mnist.py $*"; /usr/bin/time -f "$name wall %e s cpu %U s" .venv/bin/python wgan_mnist.py "$@" 2>&1 | tr '\r' '\n' | grep -v '%|' ; }
run floor500 --data ../shared/data --out runs/exp001 --fid-floor --fid-samples 500 --fid-weights $W
run gp $COMMON --run-name gp --penalty gp
run default $COMMON --run-name default
for norm in ${NORMS:-batch}; do
  sfx=$([ $norm = none ] && echo _nobn)
  run base$sfx $COMMON --critic-norm $norm --run-name base$sfx $SEED001
  run k1$sfx $COMMON --critic-norm $norm --run-name k1$sfx $SEED001 --critic-its 1
  run clip05$sfx $COMMON --critic-norm $norm --run-name clip05$sfx $SEED001 --clip-value 0.05
  run lr5e-4$sfx $COMMON --critic-norm $norm --run-name lr5e-4$sfx $SEED001 --lr 5e-4
done
echo "=== done $(date -u +%T)"
