"""wgan_gp_64.py under torchrun: 2 CPU processes over gloo. Slow-ish (process start-up), so few and small."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wgan_gp_64 as w
from test_wgan_gp_64 import TINY, make_folder

ROOT = Path(w.__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(script, *argv, cwd, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


STEP = """
import os, sys, torch, torch.distributed as dist
import wgan_gp_64 as w
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
args = w.parse_args(%(tiny)r + ["--batch-size", str(8 // world), "--mbstd-group", "1", "--critic-dropout", "0"])
torch.manual_seed(0)
generator, critic = w.Generator(args), w.Critic(args)
start = {k: v.clone() for k, v in critic.state_dict().items()}
opt_d = torch.optim.SGD(critic.parameters(), lr=1e-2)
opt_g = torch.optim.SGD(generator.parameters(), lr=1e-2)
real = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
# the noise a single process of batch 8 draws; each rank takes its own share of it
noise = torch.Generator().manual_seed(2)
def share(draw):
    def drawn(n, *shape, **kw):
        return draw(n * world, *shape, generator=noise, **kw)[rank * n:(rank + 1) * n]
    return drawn
torch.randn, torch.rand = share(torch.randn), share(torch.rand)
n = 8 // world
for _ in range(2):
    w.critic_step(generator, critic, opt_d, real[rank * n:(rank + 1) * n], args)
w.generator_step(generator, critic, opt_g, args)
torch.save({"critic": critic.state_dict(), "generator": generator.state_dict(), "start": start}, f"{sys.argv[1]}_{world}_{rank}.pt")
"""


def test_two_processes_match_one_process_of_twice_the_batch(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP % {"tiny": TINY})
    single = subprocess.run([sys.executable, str(script), "out"], capture_output=True, text=True, cwd=tmp_path,
                            env=ENV, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    result = torchrun(script, "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one, r0, r1 = (torch.load(tmp_path / f"out_{k}.pt", weights_only=True) for k in ("1_0", "2_0", "2_1"))
    for part in ("critic", "generator"):
        for k in one[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"ranks differ in {part}.{k}"
            assert torch.allclose(r0[part][k], one[part][k], rtol=1e-4, atol=1e-6), \
                f"{part}.{k}: max difference {(r0[part][k] - one[part][k]).abs().max():.3g}"  # how far, if it fails
    moved = [k for k, v in one["critic"].items() if not torch.allclose(v, one["start"][k])]
    assert moved  # the step did something, so the comparison means something


def test_torchrun_trains_and_resumes_under_one_process(tmp_path):
    data = make_folder(tmp_path / "images", 24)
    out = tmp_path / "runs"
    result = torchrun(ROOT / "wgan_gp_64.py", *TINY, "--data", data, "--iters", "4", "--ckpt-every", "2",
                      "--sample-every", "2", "--out", out, "--run-name", "ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in (out / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4]  # one writer: rank 0
    assert all(r["global_batch"] == 8 for r in records)
    ckpt = torch.load(out / "ddp" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["rng"]) == 2
    w.main(["--resume", str(out / "ddp"), "--iters", "6"])  # a plain single process carries on
    assert torch.load(out / "ddp" / "ckpt" / "last.pt", weights_only=True)["iteration"] == 6


DIES = """
import os, sys
import wgan_gp_64 as w
step = w.generator_step
calls = [0]
def dying(*args):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 5:
        os._exit(3)
    return step(*args)
w.generator_step = dying
w.main(sys.argv[1:])
"""


def test_a_dying_rank_ends_the_run_and_the_checkpoint_still_loads(tmp_path):
    data = make_folder(tmp_path / "images", 24)
    script = tmp_path / "dies.py"
    script.write_text(DIES)
    out = tmp_path / "runs"
    result = torchrun(script, *TINY, "--data", data, "--iters", "50", "--ckpt-every", "2", "--sample-every", "0",
                      "--out", out, "--run-name", "dies", cwd=tmp_path)
    assert result.returncode != 0
    # torchrun's failure table names the dead rank and its code (the "first" failure may be rank 0, which
    # exits 1 on the broken connection within the same poll)
    assert re.search(r"local_rank: 1\)\s*\n\s*exitcode\s*: 3 ", result.stderr), result.stderr[-3000:]
    ckpt = torch.load(out / "dies" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 4
    w.main(["--resume", str(out / "dies"), "--iters", "6"])
    assert torch.load(out / "dies" / "ckpt" / "last.pt", weights_only=True)["iteration"] == 6


def test_ctrl_c_to_torchrun_stops_every_rank_at_one_step_and_the_checkpoint_resumes(tmp_path):
    """Ctrl-C reaches torchrun, which signals its workers: all stop after the same step, rank 0 writes the
    checkpoint once, and the run ends within seconds (not at torchrun's 30 s kill)."""
    import signal
    import time
    data = make_folder(tmp_path / "images", 24)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "wgan_gp_64.py"), *TINY, "--data", str(data), "--iters", "100000", "--ckpt-every", "0",
           "--sample-every", "0", "--log-every", "1", "--out", str(out), "--run-name", "int"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "int" / "metrics.jsonl"
    deadline = time.time() + 180

    def logged():
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    while time.time() < deadline and logged() < 3:
        time.sleep(0.5)
    assert logged() >= 3, proc.communicate(timeout=60)[1][-3000:]  # the signal must come mid-training
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - sent < 25, err[-3000:]  # well before torchrun's 30 s SIGKILL
    # torchrun prints its own traceback for the signal it got; the workers print none and agree on the step
    assert "collective" not in err.lower() and f'{ROOT / "wgan_gp_64.py"}", line' not in err, err[-3000:]
    assert "stopped by SIGINT after iteration" in err or "stopped by SIGTERM after iteration" in err
    ckpt = torch.load(out / "int" / "ckpt" / "last.pt", weights_only=True)
    done = ckpt["iteration"]
    assert done >= 3 and len(ckpt["rng"]) == 2
    w.main(["--resume", str(out / "int"), "--iters", str(done + 2)])
    assert torch.load(out / "int" / "ckpt" / "last.pt", weights_only=True)["iteration"] == done + 2
