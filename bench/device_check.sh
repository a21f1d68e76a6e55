#!/usr/bin/env bash
# The GPU path in one command (issue 25): run from the repository root on a machine with one CUDA GPU, within
# 8 minutes, with the files bench/device_pack.sh put in .carry/ (fish subset, float16 Inception weights,
# torch-fidelity wheel, MNIST subset). Prints one table and writes it (table.md), its log (log.txt) and two
# sample grids under $OUT when set, else under .benchmarks/device/.
#
#   bash bench/device_check.sh           # on the GPU machine (bench/README.md: the device tool's carry)
#   bash bench/device_check.sh --quick   # the same steps on the CPU at toy sizes, about a minute; made-up data
#
# Every step runs even when one before it failed; a step that fails is a FAIL row, and the exit status is 1
# when any row is FAIL. A goal that is missed (a ratio, the FID agreement) is a MISS row, exit status 0.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "usage: bash bench/device_check.sh [--quick]" >&2; exit 2 ;;
esac
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
DEST="${OUT:-.benchmarks/device$([ $QUICK = 1 ] && echo _quick)}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$DEST/log.txt"; ROWS="$WORK/rows.tsv"
: >"$LOG"; : >"$ROWS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"; say "row: $1 | $2 | $3 | $4"; }
run_logged() { say "\$ $*"; "$@" >>"$LOG" 2>&1; }

# ---------------------------------------------------------------------------------------------- sizes
if [ $QUICK = 1 ]; then
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""  # CPU only, one thread per process (shared cores)
  DEV=cpu; T_MAIN=2; T_SMALL=2; FID_N=10; AGREE_N=0; TORCHRUN_STEPS=3
  FISH="$WORK/fish"; MNIST="$WORK/mnist"
  GP64_TOY=(--image-size 32 --g-channels 8 --d-channels 8 --latent-dim 16 --batch-size 4 --num-workers 0
            --sample-every 5 --log-every 2)
  MNIST_TOY=(--g-width 4 --d-width 4 --batch-size 8 --log-every 2 --sample-every 5)
  MORPH_TOY=(--width 32 --eval-samples 256 --log-every 2 --sample-every 5)
  WEIGHTS="${WGAN_SHARED:-../shared}/models/weights-inception-2015-12-05-6726825d-fp16.pth"
else
  DEV=cuda; T_MAIN=90; T_SMALL=30; FID_N=5000; AGREE_N=500; TORCHRUN_STEPS=20
  FISH=.carry/fish; MNIST="$WORK/mnist"
  GP64_TOY=(); MNIST_TOY=(); MORPH_TOY=()
  WEIGHTS=.carry/weights-inception-2015-12-05-6726825d-fp16.pth
fi
RUNS="$WORK/runs"

# helpers in Python: the made-up data, run folders' metrics, the FID; one file so that each step is one call
cat >"$WORK/helpers.py" <<'PYEOF'
import json, math, sys, time
from pathlib import Path


def fake_data(fish, mnist):
    """--quick's data: 16 random images of assorted sizes, and an MNIST-layout IDX set of 64 + 16 digits."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(16):
        h, w = rng.integers(24, 80, size=2)
        sub = Path(fish) / f"class_{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"img_{i}.jpg")
    write_idx(mnist, "train", rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64))
    write_idx(mnist, "t10k", rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), rng.integers(0, 10, 16))


def write_idx(root, split, images, labels):
    import numpy as np
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    head = np.array([2051, len(images), 28, 28], dtype=">i4").tobytes()
    (raw / f"{split}-images-idx3-ubyte").write_bytes(head + images.astype(np.uint8).tobytes())
    head = np.array([2049, len(labels)], dtype=">i4").tobytes()
    (raw / f"{split}-labels-idx1-ubyte").write_bytes(head + np.asarray(labels, dtype=np.uint8).tobytes())


def env(device, *fake_data_folders):
    """One line on the software and the device (and --quick's made-up data, in the same process)."""
    import torch
    if fake_data_folders:
        fake_data(*fake_data_folders)
    cuda = device == "cuda" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise SystemExit("no CUDA device is visible")
    where = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, bf16 "
             f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}") if cuda else "CPU"
    import torchvision
    try:
        import torch_fidelity
        fidelity = f", torch-fidelity {torch_fidelity.__version__}"
    except ImportError:
        fidelity = ", no torch-fidelity"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}{fidelity}, {where}")


def run_summary(run):
    """'<images/s> <step> <finite: 1/0>' of a run folder's metrics.jsonl: the last logged rate, the last
    logged step (every script logs its last step), and whether every number logged is finite."""
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line]
    numbers = [v for r in records for v in r.values() if isinstance(v, (int, float))]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    steps = [r[k] for r in records for k in ("iter", "step", "iteration") if k in r]
    finite = bool(records) and all(math.isfinite(v) for v in numbers)
    print(f"{rates[-1] if rates else float('nan'):.1f} {max(steps, default=0)} {int(finite)}")


def gp_ratios(path):
    """pytest-benchmark's JSON -> lines 'batch penalty/no-penalty reference/script' of wgan_gp_64."""
    cells = {}
    for b in json.loads(Path(path).read_text())["benchmarks"]:
        info = b["extra_info"]
        if info.get("config") == "wgan_gp_64":
            cells.setdefault(info["batch"], {})[info["variant"]] = b["stats"]["median"]
    for batch, v in sorted(cells.items()):
        print(batch, v["gp"] / v["nogp"], v["ref"] / v["gp"])


def fid(run, fish, weights, n, agree_n, device, part):
    """part 'cpu': the agreement's FID of agree_n generated vs agree_n real images on the CPU, saved beside the
    run with the generated images; part 'device': FID/KID of n generated images against every carried real
    image on `device`, timed (Inception's loading included), then the agreement's FID of the same images on
    `device` against the saved CPU one. Prints table rows, tab-separated."""
    import torch
    import wgan_gp_64 as w
    sys.path.insert(0, "bench")
    import fidtools
    generator, args, _ = fidtools.load_generator(w, Path(run) / "ckpt" / "last.pt")
    files = w.find_images(fish)
    real_all = w.ImageFolder(files, args, augment=False)
    real = fidtools.Images(len(files), real_all.uint8)
    k = min(agree_n, len(files))
    saved, same = Path(run) / "fid_cpu.json", Path(run) / "fid_images.pt"
    if part == "cpu":
        images = fidtools.generate_uint8(w, generator, args, k, "cpu")
        torch.save(images, same)
        start = time.time()
        value = fidtools.fidelity(fidtools.Images(k, images.__getitem__), fidtools.Images(k, real.__getitem__),
                                  None, k, False, weights)[0]
        saved.write_text(json.dumps({"fid": value, "n": k, "seconds": time.time() - start}))
        return
    cuda = device == "cuda"
    generator.to(device)
    torch.cuda.synchronize() if cuda else None
    start = time.time()
    fake = generate(fidtools, w, generator, args, n, device)
    score, kid = fidtools.fidelity(fake, real, None, min(n, len(files)), cuda, weights)
    seconds = time.time() - start
    print(f"FID of {n} generated vs {len(files)} real\t{score:.3f}\tKID {kid:.5f}, {seconds:.1f} s on {device}\tok")
    print(f"FID/KID time, {n} generated\t{seconds:.1f}\ts on {device} (generation and both sides' features)\tok")
    if not cuda:
        print(f"FID of the same images on CUDA and on the CPU\tskipped\tno CUDA device (--quick)\tskipped")
        return
    if not saved.is_file():
        print(f"FID of the same images on CUDA and on the CPU\t-\tthe CPU side failed (log)\tFAIL")
        return
    cpu = json.loads(saved.read_text())
    images = torch.load(same)
    here = fidtools.fidelity(fidtools.Images(k, images.__getitem__), fidtools.Images(k, real.__getitem__),
                             None, k, True, weights)[0]
    diff = abs(here - cpu["fid"]) / abs(cpu["fid"]) * 100
    print(f"FID {k} vs {k}: CUDA {here:.3f} against CPU {cpu['fid']:.3f}\t{diff:.3f}\t% apart, goal < 1 "
          f"(CPU side {cpu['seconds']:.0f} s)\t{'ok' if diff < 1 else 'MISS'}")


def generate(fidtools, w, generator, args, n, device):
    return fidtools.Images(n, fidtools.generate_uint8(w, generator.to(device), args, n, device).__getitem__)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "fid":
        run, fish, weights, n, agree_n, device, part = rest
        fid(run, fish, weights, int(n), int(agree_n), device, part)
    else:
        globals()[command](*rest)
PYEOF
H() { "$PY" "$WORK/helpers.py" "$@"; }

# ------------------------------------------------------------------------------------ set-up and environment
say "device check$([ $QUICK = 1 ] && echo ' --quick'), python $PY, results under $DEST"
has_fidelity() { "$PY" -c "import importlib.util as u; exit(u.find_spec('torch_fidelity') is None)"; }
if ! has_fidelity && ls .carry/wheels/*.whl >/dev/null 2>&1; then
  run_logged "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .carry/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
FAKE=()
if [ $QUICK = 1 ]; then
  FAKE=("$FISH" "$MNIST")
else
  mkdir -p "$MNIST/MNIST/raw"
  for f in .carry/mnist/*.gz; do gunzip -c "$f" >"$MNIST/MNIST/raw/$(basename "$f" .gz)"; done
fi
if ENV_LINE=$(H env "$DEV" "${FAKE[@]}" 2>>"$LOG"); then row "environment" "$ENV_LINE" "-" ok
else row "environment" "-" "$DEV" FAIL; fi

# ------------------------------------------------------------------- the critic step: ratios and same math
PYTEST_QUICK=(); [ $QUICK = 1 ] && PYTEST_QUICK=(--bench-quick)
run_logged "$PY" -m pytest bench/test_gp_step.py -q -p no:cacheprovider "${PYTEST_QUICK[@]}" \
  -k "wgan_gp_64 and not ablation" --benchmark-json "$WORK/gp.json"
RC=$?
PASSED=$(grep -Eo '[0-9]+ passed' "$LOG" | tail -1 | cut -d' ' -f1)
row "gp_step tests (wgan_gp_64: same math, main's set-up, timings)" "${PASSED:-0}" "passed, pytest exit $RC" \
  "$([ $RC = 0 ] && echo ok || echo FAIL)"
if [ -s "$WORK/gp.json" ] && RATIOS=$(H gp_ratios "$WORK/gp.json" 2>>"$LOG"); then
  while read -r batch over up; do
    goal_o=$(awk -v x="$over" 'BEGIN{print (x <= 1.5) ? "ok" : "MISS"}')
    goal_u=$(awk -v x="$up" 'BEGIN{print (x >= 1.5) ? "ok" : "MISS"}')
    [ $QUICK = 1 ] && goal_o=ok goal_u=ok  # toy sizes: the goals are for the GPU's 64x64 nets
    row "gp_step batch $batch penalty / no penalty" "$(printf %.3f "$over")" "goal <= 1.5" "$goal_o"
    row "gp_step batch $batch reference / script (speed-up)" "$(printf %.3f "$up")" "goal >= 1.5" "$goal_u"
  done <<<"$RATIOS"
else
  row "gp_step ratios" "-" "no benchmark results" FAIL
fi

# --------------------------------------------------- the README's main command: float32, --amp, --resume
main_run() {  # name, extra flags...: the run, its log kept apart so that --quick can run two at once
  local name=$1; shift
  say "\$ wgan_gp_64.py --data $FISH --critic-its 4 --max-time ${T_MAIN}s $* (run $name)"
  timeout $((T_MAIN + 240)) "$PY" wgan_gp_64.py --data "$FISH" --critic-its 4 --device "$DEV" \
    "${GP64_TOY[@]}" --max-time "${T_MAIN}s" --out "$RUNS" --run-name "$name" "$@" >"$WORK/$name.log" 2>&1
  echo $? >"$WORK/$name.rc"
}
main_row() {  # name
  local name=$1 rc summary
  cat "$WORK/$name.log" >>"$LOG"; rc=$(cat "$WORK/$name.rc")
  if [ "$rc" = 0 ] && summary=$(H run_summary "$RUNS/$name" 2>>"$LOG"); then
    read -r rate step finite <<<"$summary"
    cp "$(ls "$RUNS/$name"/samples/*.png | tail -1)" "$DEST/grid_$name.png" 2>>"$LOG"
    row "main command, $name, ${T_MAIN} s: images/s" "$rate" "$step steps, losses finite: $finite" \
      "$([ "$finite" = 1 ] && [ -f "$DEST/grid_$name.png" ] && [ -f "$RUNS/$name/ckpt/last.pt" ] \
         && echo ok || echo FAIL)"
  else
    row "main command, $name, ${T_MAIN} s: images/s" "-" "exit $rc" FAIL
  fi
}
if [ $QUICK = 1 ]; then  # two shared cores, toy nets: side by side
  main_run fp32 & main_run amp --amp & wait
else  # one at a time, so that each has the GPU to itself
  main_run fp32; main_run amp --amp
fi
main_row fp32; main_row amp
resume_row() {  # label, run, step before, steps asked, exit status
  local after
  after=$(H run_summary "$2" 2>>"$LOG" | cut -d' ' -f2)
  row "$1" "$((${after:-0} - $3))" "steps done, exit $5" \
    "$([ "$5" = 0 ] && [ $((${after:-0} - $3)) = "$4" ] && echo ok || echo FAIL)"
}
BEFORE=$(H run_summary "$RUNS/fp32" 2>>"$LOG" | cut -d' ' -f2)
resume_fp32() {
  if [ -f "$RUNS/fp32/ckpt/last.pt" ]; then
    timeout 300 "$PY" wgan_gp_64.py --resume "$RUNS/fp32" --iters $((BEFORE + 20)) --max-time 1h \
      >"$WORK/resume.log" 2>&1
    echo $? >"$WORK/resume.rc"
  fi
}
[ $QUICK = 1 ] && { say "\$ wgan_gp_64.py --resume fp32 --iters $((BEFORE + 20)) (beside torchrun)"; resume_fp32 & }
[ $QUICK = 0 ] && { say "\$ wgan_gp_64.py --resume fp32 --iters $((BEFORE + 20))"; resume_fp32; }

# ------------------------------------------------------------- torchrun, one process, stopped with SIGTERM
say "\$ torchrun --nproc_per_node 1 wgan_gp_64.py ... (SIGTERM after $TORCHRUN_STEPS steps)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 wgan_gp_64.py --data "$FISH" --critic-its 4 \
  --device "$DEV" "${GP64_TOY[@]}" --iters 100000 --ckpt-every 0 --sample-every 0 --log-every 1 \
  --out "$RUNS" --run-name ddp >>"$LOG" 2>&1 &
PID=$!
for _ in $(seq 600); do  # up to 5 minutes for start-up and the steps
  [ -f "$RUNS/ddp/metrics.jsonl" ] && [ "$(wc -l <"$RUNS/ddp/metrics.jsonl")" -ge "$TORCHRUN_STEPS" ] && break
  kill -0 $PID 2>/dev/null || break
  sleep 0.5
done
kill -TERM $PID 2>/dev/null
SENT=$(date +%s); wait $PID; RC=$?
STEP=$(grep -Eo "stopped by [A-Za-z ]+ after iteration [0-9]+" "$LOG" | tail -1 | grep -Eo "[0-9]+$")
if [ -n "$STEP" ] && [ -f "$RUNS/ddp/ckpt/last.pt" ]; then
  row "torchrun --nproc_per_node 1, SIGTERM" "$STEP" "steps in the checkpoint, torchrun exit $RC, \
stopped $(($(date +%s) - SENT)) s after the signal (one process, its own NCCL/gloo group: the hand all-reduce and the stop agreement run)" ok
  run_logged timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 wgan_gp_64.py \
    --resume "$RUNS/ddp" --iters $((STEP + 5))
  resume_row "torchrun --resume for 5 steps" "$RUNS/ddp" "$STEP" 5 $?
else
  row "torchrun --nproc_per_node 1, SIGTERM" "-" "no checkpoint or no stop message, torchrun exit $RC" FAIL
  row "torchrun --resume for 5 steps" "-" "nothing to resume" FAIL
fi
wait  # --quick's resume beside torchrun
if [ -f "$WORK/resume.rc" ]; then
  cat "$WORK/resume.log" >>"$LOG"
  resume_row "main command, --resume for 20 steps" "$RUNS/fp32" "$BEFORE" 20 "$(cat "$WORK/resume.rc")"
else
  row "main command, --resume for 20 steps" "-" "no checkpoint of the float32 run" FAIL
fi

# ---------------- the other two scripts for T_SMALL s each, side by side with the CPU half of the FID check
FID_OK=0; FID_SKIP=""
if [ ! -f "$WEIGHTS" ]; then FID_SKIP="no Inception weights at $WEIGHTS"
elif ! has_fidelity; then FID_SKIP="no torch-fidelity"
elif [ -f "$RUNS/fp32/ckpt/last.pt" ]; then FID_OK=1; fi
fid_part() {  # cpu: the agreement's CPU side; device: FID/KID of FID_N on the device and the agreement
  say "\$ FID, the $1 part (n = $FID_N, agreement n = $AGREE_N)"
  H fid "$RUNS/fp32" "$FISH" "$WEIGHTS" "$FID_N" "$AGREE_N" "$DEV" "$1" >>"$WORK/fid.rows" 2>>"$WORK/fid.log"
  echo $? >"$WORK/fid_$1.rc"
}
small_run() {  # name, script, flags...
  local name=$1 script=$2; shift 2
  timeout $((T_SMALL + 240)) "$PY" "$script" --device "$DEV" --max-time "${T_SMALL}s" --out "$RUNS" \
    --run-name "$name" "$@" >"$WORK/$name.log" 2>&1
  echo $? >"$WORK/$name.rc"
}
say "\$ wgan_mnist.py --penalty gp and noise_morph.py --dataset 8gaussians, side by side with \
$([ $QUICK = 1 ] && echo "--quick's whole FID" || echo "the CPU side of the FID agreement")"
small_run mnist wgan_mnist.py --data "$MNIST" --penalty gp "${MNIST_TOY[@]}" &
P1=$!
small_run morph noise_morph.py --dataset 8gaussians "${MORPH_TOY[@]}" &
P2=$!
if [ $FID_OK = 1 ]; then fid_part "$([ $QUICK = 1 ] && echo device || echo cpu)"; fi
wait $P1 $P2
for name in mnist morph; do
  cat "$WORK/$name.log" >>"$LOG"
  RC=$(cat "$WORK/$name.rc")
  label="wgan_mnist.py --penalty gp"; [ $name = morph ] && label="noise_morph.py --dataset 8gaussians"
  if [ "$RC" = 0 ] && summary=$(H run_summary "$RUNS/$name" 2>>"$LOG"); then
    read -r rate step finite <<<"$summary"
    row "$label, ${T_SMALL} s: images/s" "$rate" "$step steps, losses finite: $finite (beside the other)" \
      "$([ "$finite" = 1 ] && echo ok || echo FAIL)"
  else
    row "$label, ${T_SMALL} s: images/s" "-" "exit $RC" FAIL
  fi
done

# ------------------------------------------------------------------------------------------------- FID
[ $FID_OK = 1 ] && [ $QUICK = 0 ] && fid_part device
cat "$WORK/fid.log" >>"$LOG" 2>/dev/null
if [ -n "$FID_SKIP" ]; then  # --quick without the weights may skip; the GPU check has them carried
  row "FID of $FID_N generated" skipped "$FID_SKIP" "$([ $QUICK = 1 ] && echo skipped || echo FAIL)"
elif [ $FID_OK = 0 ]; then
  row "FID of $FID_N generated" "-" "no checkpoint of the float32 run" FAIL
elif [ "$(cat "$WORK/fid_device.rc")" = 0 ]; then
  while IFS=$'\t' read -r a b c d; do row "$a" "$b" "$c" "$d"; done <"$WORK/fid.rows"
else
  row "FID of $FID_N generated" "-" "failed (log)" FAIL
fi

# ----------------------------------------------------------------------------------------------- the table
{
  echo "device check$([ $QUICK = 1 ] && echo ' --quick (CPU, toy sizes: a smoke test, not a measurement)'), \
$(date -u '+%Y-%m-%d %H:%M') UTC, $(($(date +%s) - T0)) s"
  echo
  echo "| check | value | detail | verdict |"
  echo "| --- | --- | --- | --- |"
  while IFS=$'\t' read -r a b c d; do echo "| $a | $b | $c | $d |"; done <"$ROWS"
} >"$DEST/table.md"
echo
cat "$DEST/table.md"
echo "(table, log and grids in $DEST)"
! grep -q $'\tFAIL$' "$ROWS"
