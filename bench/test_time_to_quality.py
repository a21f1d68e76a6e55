"""Time to quality: a script's main() and a baseline trained for the same wall-clock budget, side by side, with
learning curves.

Both arms start together, one thread of this process each, each running its processes with WGAN_TTQ_THREADS (1)
thread(s), so both see the same load, on one device (WGAN_TTQ_DEVICE: CUDA when present, else CPU; CPU under
--bench-quick), passed to the script as --device and to the baseline as --device. Each trains for T seconds of
its own clock and keeps its generator at the moments of WGAN_TTQ_SNAPSHOTS (T/8, T/4, T/2, T), saved off the
clock, so each arm trains as long as without snapshots: the script in one segment per moment, each a --resume of
its run folder (same flags) with the script's own --max-time set to what is left to the next moment (a resume's
budget counts from the resume), its checkpoint copied between segments; the baseline with --snapshot-at, which
pauses its clock while it saves. Then, for every kept generator of both arms, FID and KID of n images against
the same n real images (torch-fidelity, the real side's features cached in .benchmarks/fid_cache per device), with
the real-vs-real floor at that n. Written to .benchmarks/ttq/<time>/: table.txt (one row per arm and moment:
training seconds, generator steps, FID, KID; the device named), table.json, curve.png (FID against training
seconds for both arms, the floor dashed), curve.json (its points), an 8x8 grid of each arm's final generator,
both run folders, snapshots/ and one log per arm.

    pytest bench/test_time_to_quality.py --bench-quick                  # smoke test: T = 20 s, n = 50, T/2 and T
    WGAN_TTQ_T=600 WGAN_TTQ_N=1000 WGAN_TTQ_FLAGS="--penalty gp" pytest bench/test_time_to_quality.py
    WGAN_TTQ_T=1800 WGAN_TTQ_SNAPSHOTS="1/16,1/8,1/4,1/2,1" pytest bench/test_time_to_quality.py   # 5 points
    WGAN_TTQ_SCRIPT=noise_morph WGAN_TTQ_FLAGS="--dataset mnist --no-morph" pytest bench/test_time_to_quality.py
    WGAN_TTQ_FLAGS="--penalty gp --gp-every 4" WGAN_TTQ_VS="--penalty gp" pytest bench/test_time_to_quality.py
    WGAN_TTQ_T=3600 WGAN_TTQ_FLAGS="--penalty gp --iters 2500" WGAN_TTQ_VS="--penalty gp --gp-every 1 --iters 2500" \
        pytest bench/test_time_to_quality.py          # equal generator steps: --iters in both arms' flags

Settings (environment): WGAN_TTQ_T seconds (600; 20 with --bench-quick), WGAN_TTQ_N images per side (1000; 50),
WGAN_TTQ_SNAPSHOTS fractions of T, increasing, the last 1 ("1/8,1/4,1/2,1"; "1/2,1" with --bench-quick),
WGAN_TTQ_DEVICE (cpu or cuda), WGAN_TTQ_SCRIPT (wgan_mnist, noise_morph or wgan_gp_64), WGAN_TTQ_FLAGS (the
script's flags), WGAN_TTQ_VS (flags of the same script for the second arm, instead of the baseline), WGAN_TTQ_DATA
(MNIST's torchvision root, default $WGAN_SHARED/data; or wgan_gp_64's image folder, default
$WGAN_SHARED/data/fish), WGAN_TTQ_SEED (1), WGAN_TTQ_THREADS (1). With --iters in the flags an arm may end before
T: its later moments are not kept. Baselines: bench/mlp_wgan_gp.py on MNIST (PyTorch-GAN's MLP WGAN-GP),
bench/dcgan_wgan_gp.py on a folder. FID of every kept generator costs n Inception passes: on a CPU at n = 1000,
about 0.1-0.5 s per image per core, so 8 points take minutes on many cores and much longer on two.
"""
import datetime
import importlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from fidtools import Images, fidelity, fish_sets, generate_uint8, load_generator, mnist_sets

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


def settings(quick, shared):
    script = os.environ.get("WGAN_TTQ_SCRIPT", "wgan_mnist").removesuffix(".py")
    if script not in ("wgan_mnist", "noise_morph", "wgan_gp_64"):
        pytest.fail(f"WGAN_TTQ_SCRIPT={script}: use wgan_mnist, noise_morph or wgan_gp_64")
    default_flags = {"wgan_mnist": "--penalty gp", "noise_morph": "--dataset mnist", "wgan_gp_64": ""}[script]
    default_data = shared / "data" / ("fish" if script == "wgan_gp_64" else "")
    device = os.environ.get("WGAN_TTQ_DEVICE") or ("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device not in ("cpu", "cuda"):
        pytest.fail(f"WGAN_TTQ_DEVICE={device}: use cpu or cuda")
    return dict(script=script, seconds=float(os.environ.get("WGAN_TTQ_T", 20 if quick else 600)),
                n=int(os.environ.get("WGAN_TTQ_N", 50 if quick else 1000)),
                flags=shlex.split(os.environ.get("WGAN_TTQ_FLAGS", default_flags)),
                vs=os.environ.get("WGAN_TTQ_VS"), data=Path(os.environ.get("WGAN_TTQ_DATA", default_data)),
                seed=os.environ.get("WGAN_TTQ_SEED", "1"), threads=os.environ.get("WGAN_TTQ_THREADS", "1"),
                moments=moments(os.environ.get("WGAN_TTQ_SNAPSHOTS", "1/2,1" if quick else "1/8,1/4,1/2,1")),
                device=device)


def moments(text):
    """WGAN_TTQ_SNAPSHOTS: the fractions of T at which both arms' generators are kept, increasing, the last 1."""
    try:
        out = [Fraction(part.strip()) for part in text.split(",")]
    except (ValueError, ZeroDivisionError):
        out = []
    if not out or out[0] <= 0 or out[-1] != 1 or any(b <= a for a, b in zip(out, out[1:])):
        pytest.fail(f"WGAN_TTQ_SNAPSHOTS={text!r}: increasing fractions of T, the last one 1 (e.g. 1/8,1/4,1/2,1)")
    return out


def script_arm(name, cfg, flags, out):
    argv = [str(ROOT / f"{cfg['script']}.py"), *flags, "--data", str(cfg["data"]), "--device", cfg["device"],
            "--seed", cfg["seed"], "--out", str(out), "--run-name", name, "--ckpt-every", "0", "--log-every", "100"]
    if "--sample-every" not in flags:  # sampling is off unless asked for (a long run's progress GIF)
        argv += ["--sample-every", "0"]
    if "--iters" not in flags:  # flags with --iters compare at equal generator steps (whichever ends first)
        argv += ["--iters", str(10**9)]
    if cfg["script"] == "wgan_gp_64":
        argv += ["--num-workers", "0"]  # one thread per arm: loader workers would take the other arm's core
    return {"name": name, "kind": "script", "flags": flags, "argv": argv, "run": out / name}


def baseline_arm(cfg, out):
    if cfg["script"] == "wgan_gp_64":
        module, extra = "dcgan_wgan_gp", ["--image-size", str(image_size_of(cfg["flags"]))]
    else:
        module, extra = "mlp_wgan_gp", []
    snapshots = ",".join(f"{float(m) * cfg['seconds']:.3f}" for m in cfg["moments"][:-1])
    argv = [str(BENCH / f"{module}.py"), "--data", str(cfg["data"]), "--max-time", str(cfg["seconds"]),
            "--seed", cfg["seed"], "--out", str(out / "baseline"), "--device", cfg["device"], *extra]
    argv += ["--snapshot-at", snapshots] if snapshots else []
    return {"name": "baseline", "kind": module, "flags": [], "argv": argv, "run": out / "baseline"}


def image_size_of(flags):
    return int(flags[flags.index("--image-size") + 1]) if "--image-size" in flags else 64


def train_script(arm, cfg, call):
    """The script's own --max-time, once per moment: each segment resumes the run folder (its flags kept) with the
    budget left to the next moment, counted from the resume, and its checkpoint is copied between segments, so
    the script trains T seconds in all as without snapshots. The seconds are the script's own (metrics.jsonl)."""
    log, last, trained = arm["run"] / "metrics.jsonl", arm["run"] / "ckpt" / "last.pt", 0.0
    for k, moment in enumerate(cfg["moments"]):
        budget = f"{max(float(moment) * cfg['seconds'] - trained, 0.01):.3f}"  # already past the moment: one step
        argv = (arm["argv"] if k == 0 else [arm["argv"][0], "--resume", str(arm["run"])]) + ["--max-time", budget]
        seen = len(log.read_text().splitlines()) if log.exists() else 0
        call(argv)
        trained += [r for r in map(json.loads, log.read_text().splitlines()[seen:]) if "seconds" in r][-1]["seconds"]
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        steps = next(ckpt[key] for key in ("step", "iter", "iteration") if key in ckpt)
        snapshot = arm["run"].parent / "snapshots" / f"{arm['name']}_{k}.pt"
        snapshot.parent.mkdir(exist_ok=True)
        shutil.copy2(last, snapshot)
        arm["points"].append({"moment": moment, "seconds": trained, "steps": steps, "file": snapshot})
        if steps >= ckpt["args"]["iters"]:  # its --iters came first: later moments have nothing new to show
            break


def train_baseline(arm, cfg, call):
    """One run with --snapshot-at the moments before T (each kept after the step that crosses it), then its end."""
    call(arm["argv"])
    summary = json.loads((arm["run"] / "summary.json").read_text())
    for snap in summary["snapshots"]:
        moment = max(m for m in cfg["moments"] if m * cfg["seconds"] <= snap["seconds"] + 1e-3)
        arm["points"].append({"moment": moment, "seconds": snap["seconds"], "steps": snap["generator_steps"],
                              "file": arm["run"] / snap["file"]})
    arm["points"].append({"moment": cfg["moments"][-1], "seconds": summary["seconds"],
                          "steps": summary["generator_steps"], "file": arm["run"] / "generator.pt"})


def moment_name(fraction):
    """1/8 -> T/8, 3/4 -> 3T/4, 1 -> T."""
    top = f"{fraction.numerator}T" if fraction.numerator > 1 else "T"
    return top + (f"/{fraction.denominator}" if fraction.denominator > 1 else "")


def run_side_by_side(arms, cfg):
    """Both arms at once, one thread each (WGAN_TTQ_THREADS per process), so both see the same load."""
    env = {**os.environ, "OMP_NUM_THREADS": cfg["threads"], "MKL_NUM_THREADS": cfg["threads"], "PYTHONPATH": str(ROOT)}

    def arm_thread(arm):
        arm["run"].parent.mkdir(parents=True, exist_ok=True)
        with open(arm["run"].parent / f"{arm['name']}.log", "w") as log:
            def call(argv):
                try:
                    code = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, timeout=2 * cfg["seconds"] + 600).returncode
                except subprocess.TimeoutExpired:
                    code = "timeout"
                if code != 0:
                    raise RuntimeError(f"ended with {code}: {' '.join(argv)}")
            started = time.time()
            try:
                (train_script if arm["kind"] == "script" else train_baseline)(arm, cfg, call)
            except Exception as e:  # reported by the main thread, with the log's tail
                arm["error"] = f"{type(e).__name__}: {e}"
            arm["wall_s"] = time.time() - started

    threads = [threading.Thread(target=arm_thread, args=(arm,)) for arm in arms]
    for arm, thread in zip(arms, threads):
        arm["points"] = []
        thread.start()
    for thread in threads:
        thread.join()
    for arm in arms:
        if "error" in arm:
            tail = (arm["run"].parent / f"{arm['name']}.log").read_text()[-2000:]
            pytest.fail(f"arm {arm['name']}: {arm['error']}\n{tail}")


def point_images(arm, point, cfg, n, device):
    """uint8 [n, C, H, W] images of one kept generator (the EMA one where there is one), with the script's module
    and args (None for a baseline)."""
    if arm["kind"] == "script":
        module = importlib.import_module(cfg["script"])
        generator, args, _ = load_generator(module, point["file"])
        return generate_uint8(module, generator.to(device), args, n, device), module, args
    module = importlib.import_module(arm["kind"])
    x = module.sample(module.load_generator(point["file"]).to(device), n)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), None, None


def real_sets(cfg, n, module, args):
    if cfg["script"] == "wgan_gp_64":
        real, floor, name = fish_sets(cfg["data"], n, module, args)
        if floor is None:
            pytest.skip(f"{cfg['data']} has fewer than {2 * n} images: no real-vs-real floor at n = {n}")
        return real, floor, name
    return mnist_sets(cfg["data"], n)


def draw_curve(path, arms, floor_fid, cfg, title):
    """FID against each arm's training seconds, the real-vs-real floor dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arm in arms:
        ax.plot([p["seconds"] for p in arm["points"]], [p["fid"] for p in arm["points"]], "o-", label=arm["label"])
    ax.axhline(floor_fid, ls="--", c="gray", label=f"real vs real at n = {cfg['n']}: {floor_fid:.2f}")
    ax.set(xlabel=f"training seconds ({cfg['device']}, {cfg['threads']} thread(s) per arm, side by side)",
           ylabel=f"FID (n = {cfg['n']})", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def test_time_to_quality(pytestconfig, shared_dir, fid_weights, capsys):
    quick = pytestconfig.getoption("--bench-quick")
    cfg = settings(quick, shared_dir)
    if cfg["script"] != "wgan_gp_64" and not (cfg["data"] / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {cfg['data']} (set WGAN_TTQ_DATA or WGAN_SHARED)")
    if cfg["script"] == "wgan_gp_64" and not cfg["data"].is_dir():
        pytest.skip(f"image folder {cfg['data']} not found (set WGAN_TTQ_DATA)")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("WGAN_TTQ_DEVICE=cuda but torch sees no CUDA device")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = ROOT / ".benchmarks" / "ttq" / (stamp + ("_quick" if quick else ""))
    arms = [script_arm("script", cfg, cfg["flags"], out)]
    arms.append(script_arm("vs", cfg, shlex.split(cfg["vs"]), out) if cfg["vs"] is not None
                else baseline_arm(cfg, out))
    run_side_by_side(arms, cfg)

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # the arms are done: Inception may use every core
    n, device, cuda = cfg["n"], torch.device(cfg["device"]), cfg["device"] == "cuda"
    from torchvision.utils import save_image
    real = None
    for arm in arms:
        arm["label"] = (f"{cfg['script']}.py {' '.join(arm['flags']) or '(defaults)'}" if arm["kind"] == "script"
                        else f"{arm['kind']}.py (baseline)")
        for point in arm["points"]:
            fake, module, args = point_images(arm, point, cfg, n, device)
            if real is None:  # the fish's real set is fitted to the script's image size: known from a checkpoint
                real, other, cache_name = real_sets(cfg, n, module, args)
            point["fid"], point["kid"] = fidelity(Images(n, lambda i: fake[i]), real, cache_name, n, cuda, fid_weights)
        arm["grid"] = out / f"{arm['name']}_grid.png"  # of the final generator
        save_image(fake[:64].float() / 255, arm["grid"], nrow=8)
    floor_fid, floor_kid = fidelity(other, real, cache_name, n, cuda, fid_weights,
                                    fake_cache_name=cache_name.replace("bench-", "bench-floor-", 1))
    gpu = f" ({torch.cuda.get_device_name(device)})" if cuda else ""
    lines = [f"time to quality, {stamp} UTC, torch {torch.__version__}, {cfg['script']}.py vs "
             f"{arms[1]['kind'] if arms[1]['kind'] != 'script' else 'itself'}: T = {cfg['seconds']:g} s each, "
             f"side by side on {cfg['device']}{gpu}, {cfg['threads']} thread(s) per arm; generators kept at "
             f"{', '.join(map(moment_name, cfg['moments']))} off the clock; FID/KID at n = {n} vs {cache_name}"
             + (" (--bench-quick: a smoke test, not a measurement)" if quick else ""),
             f"{'arm':<10}{'moment':>8}{'train s':>9}{'generator steps':>16}{'FID':>9}{'KID':>9}"]
    for arm in arms:
        for p in arm["points"]:
            lines.append(f"{arm['name']:<10}{moment_name(p['moment']):>8}{p['seconds']:>9.0f}{p['steps']:>16}"
                         f"{p['fid']:>9.2f}{p['kid']:>9.4f}")
    lines.append(f"{'floor':<10}{'':>8}{'':>9}{'':>16}{floor_fid:>9.2f}{floor_kid:>9.4f}  real vs real at n = {n}")
    for arm in arms:
        lines.append(f"{arm['name']}: {arm['label']}; {arm['wall_s']:.0f} s wall in all; final grid "
                     f"{arm['grid'].relative_to(ROOT)}")
    lines.append(f"curve: {(out / 'curve.png').relative_to(ROOT)} (points in curve.json)")
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    points = lambda arm: [{**p, "moment": str(p["moment"]), "file": str(p["file"].relative_to(ROOT))}  # noqa: E731
                          for p in arm["points"]]
    (out / "table.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in cfg.items()}, "floor": {"fid": floor_fid, "kid": floor_kid, "n": n},
         "rows": [{**{k: arm[k] for k in ("name", "kind", "flags", "label", "wall_s")}, "argv": arm["argv"],
                   "grid": str(arm["grid"].relative_to(ROOT)), "points": points(arm)} for arm in arms]}, indent=1))
    (out / "curve.json").write_text(json.dumps(
        {"n": n, "device": cfg["device"], "T": cfg["seconds"], "floor": floor_fid, "floor_kid": floor_kid,
         "arms": [{"name": arm["name"], "label": arm["label"], "moment": [str(p["moment"]) for p in arm["points"]],
                   **{k: [p[k] for p in arm["points"]] for k in ("seconds", "steps", "fid", "kid")}}
                  for arm in arms]}, indent=1))
    draw_curve(out / "curve.png", arms, floor_fid, cfg, f"{cfg['script']}.py vs {arms[1]['label']}, "
               f"T = {cfg['seconds']:g} s")
    with capsys.disabled():
        print("\n" + "\n".join(lines) + f"\n(written to {(out / 'table.txt').relative_to(ROOT)})")
    curve = json.loads((out / "curve.json").read_text())
    assert (out / "curve.png").stat().st_size > 0 and math.isfinite(curve["floor"])
    for arm in curve["arms"]:
        assert all(math.isfinite(v) for k in ("seconds", "fid", "kid") for v in arm[k]), arm
        assert arm["steps"][0] >= 1 and all(b > a for a, b in zip(arm["steps"], arm["steps"][1:])), arm
        assert all(b > a for a, b in zip(arm["seconds"], arm["seconds"][1:])), arm
        if not any("--iters" in a["flags"] for a in arms):  # on time: every moment kept, T trained in all
            assert len(arm["fid"]) == len(cfg["moments"]), arm
            assert arm["seconds"][-1] >= cfg["seconds"], arm


def test_snapshot_moments_are_increasing_fractions_of_t_ending_at_t():
    assert moments("1/8, 1/4,0.5,1") == [Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), 1]
    assert [moment_name(m) for m in moments("1/8,3/4,1")] == ["T/8", "3T/4", "T"]
    for bad in ("1/2", "1/2,1/4,1", "0,1", "1/2,1,2", "a,1", "1/0,1", ""):
        with pytest.raises(pytest.fail.Exception):
            moments(bad)


def test_script_arm_resumes_each_segment_with_the_budget_left_to_its_moment(tmp_path):
    """Each segment overshoots its budget by 2 s (the step that crosses it): the next one gets what is left."""
    cfg = {"moments": moments("1/4,1/2,1"), "seconds": 100.0}
    arm = {"name": "script", "argv": ["s.py", "--flags"], "run": tmp_path / "script", "points": []}
    calls = []

    def call(argv):
        calls.append(argv)
        step, budget = 10 * len(calls), float(argv[-1])
        (arm["run"] / "ckpt").mkdir(parents=True, exist_ok=True)
        with open(arm["run"] / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iter": step - 5, "seconds": budget / 2}) + "\n")
            f.write(json.dumps({"iter": step, "seconds": budget + 2}) + "\n" + json.dumps({"fid": 1.0}) + "\n")
        torch.save({"step": step, "args": {"iters": 10**9}, "weights": step}, arm["run"] / "ckpt" / "last.pt")

    train_script(arm, cfg, call)
    assert calls == [["s.py", "--flags", "--max-time", "25.000"],
                     ["s.py", "--resume", str(arm["run"]), "--max-time", "23.000"],  # 50 - 27
                     ["s.py", "--resume", str(arm["run"]), "--max-time", "48.000"]]  # 100 - 52
    assert [(p["moment"], p["seconds"], p["steps"]) for p in arm["points"]] == [
        (Fraction(1, 4), 27, 10), (Fraction(1, 2), 52, 20), (1, 102, 30)]
    assert [torch.load(p["file"])["weights"] for p in arm["points"]] == [10, 20, 30]  # a copy per segment
