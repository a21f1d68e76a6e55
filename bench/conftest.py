"""Settings shared by the benchmark suite (SPEC section 6): device, sizes, rounds, and the ratio tables.

    pytest bench/                    # CUDA when present (the scripts' default sizes), else CPU (small sizes)
    pytest bench/ --bench-quick      # CPU smoke test, tiny sizes, few rounds: CI runs this after the tests
    WGAN_FID_N=1000 pytest bench/test_fid.py                 # FID/KID at a chosen n

Timings on CUDA are synchronised inside the timed function and follow warm-up rounds. The ratio tables
(penalty/no-penalty, project/reference, FID with its n) are printed at the end of the session and written
to .benchmarks/ (git-ignored); nothing here is committed output.
"""
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WGAN_SHARED", ROOT.parent / "shared"))
OUT_DIR = ROOT / ".benchmarks"
STEP_RESULTS = pytest.StashKey[list]()
FID_RESULTS = pytest.StashKey[list]()

# script -> device mode -> (extra argv, default batch, large batch). "cuda" uses the scripts' default models;
# "cpu" shrinks what is big (wgan_gp_64 at 32x32, width 32) so a full CPU run takes minutes, not hours.
SIZES = {
    "wgan_gp_64": {
        "cuda": ([], 32, 256),  # 64x64, 128 channels, batch 32 (the script's defaults)
        "cpu": (["--image-size", "32", "--g-channels", "32", "--d-channels", "32"], 32, 128),
        "quick": (["--image-size", "32", "--g-channels", "8", "--d-channels", "8"], 8, 32),
    },
    "wgan_mnist": {  # no width flag: its default dcgan critic everywhere
        "cuda": ([], 64, 512),
        "cpu": ([], 64, 256),
        "quick": ([], 8, 32),
    },
    "noise_morph": {  # the mnist conv pair (the FID setting), at its mnist default width 16 (base channels)
        "cuda": (["--dataset", "mnist"], 64, 512),
        "cpu": (["--dataset", "mnist"], 64, 256),
        "quick": (["--dataset", "mnist", "--width", "16"], 8, 32),
    },
    "noise_morph_toy": {  # its default dataset: 4-layer 512-wide MLPs on 2-D points
        "cuda": (["--dataset", "8gaussians"], 256, 4096),
        "cpu": (["--dataset", "8gaussians"], 256, 1024),
        "quick": (["--dataset", "8gaussians", "--width", "64"], 64, 256),
    },
}


@dataclass
class Plan:
    device: torch.device
    quick: bool
    rounds: int
    warmup_rounds: int
    iterations: int
    fid_n: int
    threads: int = field(default_factory=torch.get_num_threads)

    @property
    def mode(self):
        return "quick" if self.quick else self.device.type

    def sizes(self, config):
        return SIZES[config][self.mode]

    def extra_info(self):
        info = {"device": str(self.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "quick": self.quick}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="smoke test: CPU only, one thread, tiny sizes, few rounds, FID at n=20")


def pytest_configure(config):
    config.stash[STEP_RESULTS] = []
    config.stash[FID_RESULTS] = []
    if config.getoption("--bench-quick", default=False):
        torch.set_num_threads(1)  # CI's cores are shared; tiny models run fastest on one thread anyway


@pytest.fixture(scope="session")
def plan(pytestconfig):
    quick = pytestconfig.getoption("--bench-quick")
    cuda = torch.cuda.is_available() and not quick
    device = torch.device("cuda" if cuda else "cpu")
    n_default = 20 if quick else (5000 if cuda else 200)  # quick: Inception takes ~0.15-0.5 s per image on CPU
    fid_n = int(os.environ.get("WGAN_FID_N", n_default))
    if quick:
        return Plan(device, True, rounds=3, warmup_rounds=1, iterations=1, fid_n=fid_n)
    if cuda:
        return Plan(device, False, rounds=30, warmup_rounds=10, iterations=5, fid_n=fid_n)
    return Plan(device, False, rounds=10, warmup_rounds=2, iterations=1, fid_n=fid_n)


@pytest.fixture(scope="session")
def device(plan):
    return plan.device


@pytest.fixture(scope="session")
def shared_dir():
    return SHARED


@pytest.fixture(scope="session")
def fid_weights():
    path = Path(os.environ.get("WGAN_FID_WEIGHTS", SHARED / "models" / "weights-inception-2015-12-05-6726825d.pth"))
    if not path.is_file():
        pytest.skip(f"Inception weights not found at {path}; set WGAN_FID_WEIGHTS (nothing is downloaded)")
    return path


@pytest.fixture
def record_step(pytestconfig):
    """Call after benchmark.pedantic: keeps (config, batch, variant, min, median) for the ratio table."""
    def record(benchmark, config, batch, variant):
        assert config in SIZES, config
        stats = benchmark.stats.stats if benchmark.stats else None  # None under --benchmark-disable
        if stats:
            pytestconfig.stash[STEP_RESULTS].append(
                {"config": config, "batch": batch, "variant": variant, "min": stats.min, "median": stats.median,
                 "device": benchmark.extra_info.get("device", "?"), "note": benchmark.extra_info.get("note")})
    return record


@pytest.fixture
def record_fid(pytestconfig):
    def record(row):
        pytestconfig.stash[FID_RESULTS].append(row)
    return record


# ----------------------------------------------------------------------------------------- ratio tables
def step_table(rows):
    """Ratios per (config, batch): penalty/no-penalty (overhead) and project/reference (below 1: we are faster)."""
    cells = {}
    for r in rows:
        cells.setdefault((r["config"], r["batch"]), {})[r["variant"]] = r
    lines = ["critic step, median ms (ratios of medians; p/ref(min) uses the fastest round, robust to noise)",
             f"{'config':<16}{'batch':>6}{'penalty':>10}{'no-pen':>10}{'ref':>10}{'pen/nopen':>11}"
             f"{'p/ref':>8}{'p/ref(min)':>12}{'speed-up':>10}"]
    extras, notes = [], {}
    for (config, batch), v in cells.items():
        if v.get("nogp", {}).get("note"):
            notes[config] = v["nogp"]["note"]
        gp, nogp, ref = (v.get(k) for k in ("gp", "nogp", "ref"))
        ms = [f"{x['median'] * 1e3:10.2f}" if x else f"{'-':>10}" for x in (gp, nogp, ref)]
        over = f"{gp['median'] / nogp['median']:11.2f}" if gp and nogp else f"{'-':>11}"
        pr = f"{gp['median'] / ref['median']:8.2f}" if gp and ref else f"{'-':>8}"
        pr_min = f"{gp['min'] / ref['min']:12.2f}" if gp and ref else f"{'-':>12}"
        up = f"{ref['median'] / gp['median']:9.2f}x" if gp and ref else f"{'-':>10}"
        lines.append(f"{config:<16}{batch:>6}{''.join(ms)}{over}{pr}{pr_min}{up}")
        for name, x in v.items():
            if name not in ("gp", "nogp", "ref"):
                extras.append(f"{config:<16}{batch:>6}  {name:<28}{x['median'] * 1e3:10.2f} ms"
                              + (f"   vs project {x['median'] / gp['median']:.2f}" if gp else ""))
    lines += [f"  no-pen of {config}: {note}" for config, note in notes.items()]
    if extras:
        lines += ["", "other variants (median ms; ratio to the project step):"] + extras
    return lines


def fid_table(rows):
    lines = ["FID / KID (torch-fidelity, Inception 2015-12-05; compare only at the same n)",
             f"{'script':<14}{'n':>6}{'FID':>10}{'KID':>10}{'floor FID':>11}  generator"]
    for r in rows:
        if "fid" in r:
            floor = f"{r['floor_fid']:11.2f}" if r.get("floor_fid") is not None else f"{'-':>11}"
            lines.append(f"{r['script']:<14}{r['n']:>6}{r['fid']:10.2f}{r['kid']:10.4f}{floor}  {r['source']}")
        else:
            lines.append(f"Inception throughput: {r['images_per_s']:.1f} images/s on {r['device']} "
                         f"(n = {r['n']}, batch {r['batch']})")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    steps, fids = config.stash.get(STEP_RESULTS, []), config.stash.get(FID_RESULTS, [])
    if not (steps or fids):
        return
    device = steps[0]["device"] if steps else fids[0].get("device", "?")
    head = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
            f"device {device}, {torch.get_num_threads()} thread(s)"
            + (", --bench-quick (tiny sizes: a smoke test, not a measurement)" if
               config.getoption("--bench-quick") else "")]
    lines = head + [""] + (step_table(steps) if steps else []) + ([""] + fid_table(fids) if fids else [])
    terminalreporter.write_sep("=", "wgan bench ratios")
    for line in lines:
        terminalreporter.write_line(line)
    try:
        OUT_DIR.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = OUT_DIR / f"ratios_{stamp}{'_quick' if config.getoption('--bench-quick') else ''}.txt"
        path.write_text("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(written to {path.relative_to(ROOT)})")
    except OSError as e:
        terminalreporter.write_line(f"(could not write the table under {OUT_DIR}: {e})")
