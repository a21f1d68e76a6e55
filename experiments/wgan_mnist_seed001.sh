#!/usr/bin/env bash
# seed 001 experiments, serial, one process at a time, 1 thread
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
W=../shared/models/weights-inception-2015-12-05-6726825d.pth
COMMON="--data ../shared/data --out runs/exp001 --iters 500 --log-every 25 --sample-every 100 --ckpt-every 500 --fid-every 500 --fid-samples 500 --fid-weights $W --seed 1"
run() { name=$1; shift; echo "=== $name $(date -u +%T) :: python wgan_mnist.py $*"; /usr/bin/time -f "$name wall %e s cpu %U s" .venv/bin/python wgan_mnist.py "$@" 2>&1 | tr '\r' '\n' | grep -v '%|' ; }
run floor500 --data ../shared/data --out runs/exp001 --fid-floor --fid-samples 500 --fid-weights $W
run base $COMMON --run-name base
run gp $COMMON --run-name gp --penalty gp
run k1 $COMMON --run-name k1 --critic-its 1
run clip05 $COMMON --run-name clip05 --clip-value 0.05
run lr5e-4 $COMMON --run-name lr5e-4 --lr 5e-4
echo "=== done $(date -u +%T)"
