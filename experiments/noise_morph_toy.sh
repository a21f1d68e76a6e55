#!/usr/bin/env bash
# one process at a time, one thread: 8gaussians then 25gaussians, morph vs no-morph, seeds 1-3, width 128
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
for ds in 8gaussians 25gaussians; do
  for seed in 1 2 3; do
    for mode in morph nomorph; do
      flag=""; [ $mode = nomorph ] && flag="--no-morph"
      name=exp_${ds}_${mode}_s${seed}
      [ -f runs/exp/$name/ckpt/last.pt ] && grep -q '"iter": 5000' runs/exp/$name/metrics.jsonl && continue
      echo "$(date -u +%T) start $name"
      .venv/bin/python noise_morph.py --dataset $ds --width 128 --iters 5000 --seed $seed $flag \
        --log-every 100 --sample-every 1000 --ckpt-every 1000 --out runs/exp --run-name $name 2>/dev/null | tail -1
    done
  done
done
echo "$(date -u +%T) all done"
