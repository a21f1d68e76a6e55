"""bench/grown_step_speed.py at toy sizes, so that it cannot rot: both arms time real steps and the ratio is theirs."""
import os
import re
import subprocess
import sys

from conftest import ROOT

TOY = "--image-size 32 --g-channels 8 --d-channels 8 --latent-dim 16 --batch-size 4 --grow 16:10,32"


def test_grown_step_speed_prints_both_rates_and_their_ratio():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "grown_step_speed.py"), "--a", TOY,
                          "--b", TOY + " --slim-above 16", "--rounds", "2", "--steps", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    a, b, ratio = (float(x) for x in re.findall(r"^(?:a|b|b / a): ([\d.]+)", out.stdout, re.M))
    assert a > 0 and b > 0 and abs(ratio - b / a) < 0.01 + 0.01 * ratio
