"""Time to quality: a script's main() and a baseline trained for the same wall-clock budget, side by side.

Both arms start together as two processes with WGAN_TTQ_THREADS (1) thread each, so both see the same load; each
trains for T seconds (the script through its own --max-time); then FID and KID of n images of each arm against n
real images (torch-fidelity, the real side's features cached in .benchmarks/fid_cache), with the real-vs-real
floor at that n, the generator steps each arm made and an 8x8 sample grid of each. One table, printed and written
to .benchmarks/ttq/<time>/table.txt beside the grids and both run folders.

    pytest bench/test_time_to_quality.py --bench-quick                  # smoke test: T = 20 s, n = 50
    WGAN_TTQ_T=600 WGAN_TTQ_N=1000 WGAN_TTQ_FLAGS="--penalty gp" pytest bench/test_time_to_quality.py
    WGAN_TTQ_SCRIPT=noise_morph WGAN_TTQ_FLAGS="--dataset mnist --no-morph" pytest bench/test_time_to_quality.py
    WGAN_TTQ_FLAGS="--penalty gp --gp-every 4" WGAN_TTQ_VS="--penalty gp" pytest bench/test_time_to_quality.py
    WGAN_TTQ_T=3600 WGAN_TTQ_FLAGS="--penalty gp --iters 2500" WGAN_TTQ_VS="--penalty gp --gp-every 1 --iters 2500" \
        pytest bench/test_time_to_quality.py          # equal generator steps: --iters in both arms' flags

Settings (environment): WGAN_TTQ_T seconds (600; 20 with --bench-quick), WGAN_TTQ_N images per side (1000; 50),
WGAN_TTQ_SCRIPT (wgan_mnist, noise_morph or wgan_gp_64), WGAN_TTQ_FLAGS (the script's flags), WGAN_TTQ_VS (flags of
the same script for the second arm, instead of the baseline), WGAN_TTQ_DATA (MNIST's torchvision root, default
$WGAN_SHARED/data; or wgan_gp_64's image folder, default $WGAN_SHARED/data/fish), WGAN_TTQ_SEED (1).
Baselines: bench/mlp_wgan_gp.py on MNIST (PyTorch-GAN's MLP WGAN-GP), bench/dcgan_wgan_gp.py on a folder.
"""
import datetime
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
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
    return dict(script=script, seconds=float(os.environ.get("WGAN_TTQ_T", 20 if quick else 600)),
                n=int(os.environ.get("WGAN_TTQ_N", 50 if quick else 1000)),
                flags=shlex.split(os.environ.get("WGAN_TTQ_FLAGS", default_flags)),
                vs=os.environ.get("WGAN_TTQ_VS"), data=Path(os.environ.get("WGAN_TTQ_DATA", default_data)),
                seed=os.environ.get("WGAN_TTQ_SEED", "1"), threads=os.environ.get("WGAN_TTQ_THREADS", "1"))


def script_arm(name, cfg, flags, out):
    argv = [str(ROOT / f"{cfg['script']}.py"), *flags, "--data", str(cfg["data"]), "--max-time", str(cfg["seconds"]),
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
    argv = [str(BENCH / f"{module}.py"), "--data", str(cfg["data"]), "--max-time", str(cfg["seconds"]),
            "--seed", cfg["seed"], "--out", str(out / "baseline"), *extra]
    return {"name": "baseline", "kind": module, "flags": [], "argv": argv, "run": out / "baseline"}


def image_size_of(flags):
    return int(flags[flags.index("--image-size") + 1]) if "--image-size" in flags else 64


def run_side_by_side(arms, cfg):
    env = {**os.environ, "OMP_NUM_THREADS": cfg["threads"], "MKL_NUM_THREADS": cfg["threads"], "PYTHONPATH": str(ROOT)}
    procs = []
    for arm in arms:
        arm["run"].parent.mkdir(parents=True, exist_ok=True)
        log = open(arm["run"].parent / f"{arm['name']}.log", "w")
        procs.append((arm, log, time.time(), subprocess.Popen([sys.executable, *arm["argv"]], cwd=ROOT, env=env,
                                                               stdout=log, stderr=subprocess.STDOUT)))
    for arm, log, started, proc in procs:
        try:
            code = proc.wait(timeout=2 * cfg["seconds"] + 600)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        arm["wall_s"] = time.time() - started
        log.close()
        if code != 0:
            tail = Path(log.name).read_text()[-2000:]
            pytest.fail(f"arm {arm['name']} ended with {code}: {' '.join(arm['argv'])}\n{tail}")


def arm_images(arm, cfg, n):
    """uint8 [n, C, H, W] images of the arm's final generator (the EMA one where there is one), and its steps."""
    if arm["kind"] == "script":
        module = importlib.import_module(cfg["script"])
        generator, args, _ = load_generator(module, arm["run"] / "ckpt" / "last.pt")
        ckpt = torch.load(arm["run"] / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
        steps = next(ckpt[k] for k in ("step", "iter", "iteration") if k in ckpt)
        return generate_uint8(module, generator, args, n, torch.device("cpu")), steps, module, args
    module = importlib.import_module(arm["kind"])
    summary = json.loads((arm["run"] / "summary.json").read_text())
    x = module.sample(module.load_generator(arm["run"]), n)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), summary["generator_steps"], None, None


def real_sets(cfg, n, module, args):
    if cfg["script"] == "wgan_gp_64":
        real, floor, name = fish_sets(cfg["data"], n, module, args)
        if floor is None:
            pytest.skip(f"{cfg['data']} has fewer than {2 * n} images: no real-vs-real floor at n = {n}")
        return real, floor, name
    return mnist_sets(cfg["data"], n)


def test_time_to_quality(pytestconfig, shared_dir, fid_weights, capsys):
    quick = pytestconfig.getoption("--bench-quick")
    cfg = settings(quick, shared_dir)
    if cfg["script"] != "wgan_gp_64" and not (cfg["data"] / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {cfg['data']} (set WGAN_TTQ_DATA or WGAN_SHARED)")
    if cfg["script"] == "wgan_gp_64" and not cfg["data"].is_dir():
        pytest.skip(f"image folder {cfg['data']} not found (set WGAN_TTQ_DATA)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = ROOT / ".benchmarks" / "ttq" / (stamp + ("_quick" if quick else ""))
    arms = [script_arm("script", cfg, cfg["flags"], out)]
    arms.append(script_arm("vs", cfg, shlex.split(cfg["vs"]), out) if cfg["vs"] is not None
                else baseline_arm(cfg, out))
    run_side_by_side(arms, cfg)

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # the arms are done: Inception may use every core
    n, rows, floor_fid = cfg["n"], [], None
    for arm in arms:
        fake, steps, module, args = arm_images(arm, cfg, n)
        if arm is arms[0]:
            real, other, cache_name = real_sets(cfg, n, module, args)
        from torchvision.utils import save_image
        grid = out / f"{arm['name']}_grid.png"
        save_image(fake[:64].float() / 255, grid, nrow=8)
        fid, kid = fidelity(Images(n, lambda i: fake[i]), real, cache_name, n, False, fid_weights)
        rows.append({**{k: arm[k] for k in ("name", "kind", "flags", "wall_s")}, "steps": steps, "fid": fid,
                     "kid": kid, "grid": str(grid.relative_to(ROOT))})
    floor_fid, floor_kid = fidelity(other, real, cache_name, n, False, fid_weights,
                                    fake_cache_name=cache_name.replace("bench-", "bench-floor-", 1))
    lines = [f"time to quality, {stamp} UTC, torch {torch.__version__}, {cfg['script']}.py vs "
             f"{arms[1]['kind'] if arms[1]['kind'] != 'script' else 'itself'}: T = {cfg['seconds']:g} s each, "
             f"side by side, {cfg['threads']} thread(s) per arm; FID/KID at n = {n} vs {cache_name}"
             + (" (--bench-quick: a smoke test, not a measurement)" if quick else ""),
             f"{'arm':<10}{'generator steps':>16}{'wall s':>9}{'FID':>9}{'KID':>9}  grid; flags"]
    for r in rows:
        lines.append(f"{r['name']:<10}{r['steps']:>16}{r['wall_s']:>9.0f}{r['fid']:>9.2f}{r['kid']:>9.4f}  "
                     f"{r['grid']}; {r['kind'] if r['kind'] != 'script' else ' '.join(r['flags']) or '(defaults)'}")
    lines.append(f"{'floor':<10}{'':>16}{'':>9}{floor_fid:>9.2f}{floor_kid:>9.4f}  real vs real at n = {n}")
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps({"settings": {k: str(v) for k, v in cfg.items()}, "rows": rows,
                                                "floor": {"fid": floor_fid, "kid": floor_kid, "n": n}}, indent=1))
    with capsys.disabled():
        print("\n" + "\n".join(lines) + f"\n(written to {(out / 'table.txt').relative_to(ROOT)})")
    for r in rows:
        assert r["steps"] >= 1, r
        assert math.isfinite(r["fid"]) and math.isfinite(r["kid"]), r
