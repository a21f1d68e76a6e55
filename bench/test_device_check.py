"""bench/device_check.sh --quick: the GPU machine's check, run on the CPU at toy sizes, so that it cannot rot
between the rare tasks that are lent a GPU. Runs under `pytest bench/ --bench-quick` (CI); about a minute on
two idle cores, longer on a busy machine."""
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

ROWS = [  # every step the check has, as its table names them (the GPU check has the same rows at its sizes)
    r"environment", r"gp_step tests \(wgan_gp_64", r"gp_step batch 8 penalty / no penalty",
    r"gp_step batch 8 reference / script", r"gp_step batch 32 penalty / no penalty",
    r"gp_step batch 32 reference / script", r"main command, fp32, ", r"main command, amp, ",
    r"main command, --resume for 20 steps", r"torchrun --nproc_per_node 1, SIGTERM", r"torchrun --resume for 5 steps",
    r"wgan_mnist.py --penalty gp, ", r"noise_morph.py --dataset 8gaussians, ", r"FID of 10 generated",
    r"FID of the same images on CUDA and on the CPU"]


def table_rows(text):
    """{check: (value, detail, verdict)} of the markdown table the check writes."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "check" and not cells[0].startswith("---"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def test_table_rows_parses_the_checks_table():
    rows = table_rows("title\n\n| check | value | detail | verdict |\n| --- | --- | --- | --- |\n"
                      "| main command, fp32, 2 s: images/s | 20.4 | 3 steps, losses finite: 1 | ok |\n")
    assert rows == {"main command, fp32, 2 s: images/s": ("20.4", "3 steps, losses finite: 1", "ok")}


def test_quick_device_check(plan, tmp_path):
    if not plan.quick:
        pytest.skip("runs with --bench-quick; the GPU check itself is `bash bench/device_check.sh`")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "WGAN_SHARED": str(SHARED)}
    result = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + log[-4000:]
    rows = table_rows((tmp_path / "table.md").read_text())
    for pattern in ROWS:
        assert any(re.match(pattern, name) for name in rows), f"no row {pattern!r} in {list(rows)}"
    weights = SHARED / "models" / "weights-inception-2015-12-05-6726825d-fp16.pth"
    for name, (value, detail, verdict) in rows.items():
        assert verdict in ("ok", "skipped"), (name, value, detail, verdict)
        if name == "environment":
            assert value.startswith("torch "), value
        elif verdict == "skipped":  # only the FID rows may skip: no CUDA here, or no weights on this machine
            assert name.startswith("FID of the same") or (name.startswith("FID") and not weights.is_file()), name
        else:
            assert math.isfinite(float(value)), (name, value)
    assert (tmp_path / "grid_fp32.png").stat().st_size > 0 and (tmp_path / "grid_amp.png").stat().st_size > 0
