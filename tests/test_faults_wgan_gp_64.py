"""wgan_gp_64.py under faults (issues 25 and 26): the CUDA path's device-independent logic with torch.cuda faked,
signals at every moment (workers on, the whole process group), full and read-only disks, changed flags on resume,
copied checkpoints, a second process on one run folder. CPU, tiny models; in-process main() where it proves it."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import wgan_gp_64 as w
from test_wgan_gp_64 import TINY, expect_exit, make_folder, run

ROOT = Path(w.__file__).resolve().parent
CODE = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 143}


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images", 12)


def one_line(capsys):
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------- issue 25, CUDA path
class FakeCuda:
    """torch.cuda's RNG and device calls, recorded: what the checkpoint stores and restores on a CUDA rank."""

    def __init__(self, monkeypatch, current=1, count=2):
        self.set, self.current = [], current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7, self.current]))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set.append(
            (state.tolist(), device)))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set.append((s.tolist(), i))
                                                                             for i, s in enumerate(states)])
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: setattr(self, "current", device.index))


@pytest.mark.parametrize("saved", [1, 2, 8])
def test_cuda_rng_of_the_device_in_use_is_stored_and_restored_whatever_the_saved_list(monkeypatch, saved):
    cuda = FakeCuda(monkeypatch, current=1, count=2)
    device = torch.device("cuda", 1)
    state = w.rng_state(device)
    assert [s.tolist() for s in state["cuda"]] == [[7, 1]]  # the device in use only
    state["cuda"] = [torch.tensor([9, i]) for i in range(saved)]  # a checkpoint of another machine
    w.set_rng_state(state, device)
    assert len(cuda.set) == 1 and cuda.set[0][0] == ([9, 1] if saved > 1 else [9, 0])


def test_augmentation_never_reseeds_cuda_nor_moves_the_global_stream(tmp_path, folder, monkeypatch):
    def reseeded(*a):
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    args = w.parse_args(TINY + ["--data", str(folder)])
    data = w.ImageFolder(w.scan_folder(folder), args, cache=True)
    torch.default_generator.manual_seed(5)
    expected = torch.rand(8)
    torch.default_generator.manual_seed(5)
    a, b = data[(0, 11)], data[(0, 11)]
    assert torch.equal(a, b) and not torch.equal(a, data[(0, 12)])  # a pure function of (index, seed)
    assert torch.equal(torch.rand(8), expected)


def fake_world(monkeypatch, world=2):
    """main() as rank 0 of `world`, the collectives left out: counts the agree() calls."""
    calls, agree, save, setup = [], w.agree, w.save_checkpoint, w.setup
    monkeypatch.setattr(w, "setup", lambda args: (setup(args)[0], 0, world))
    monkeypatch.setattr(w.dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(w, "agree", lambda value, device, n, op: calls.append(value) or agree(value, device, 1, op))
    monkeypatch.setattr(w, "save_checkpoint", lambda path, nets, args, it, seen, n: save(path, nets, args, it, seen, 1))
    return calls


def test_torchrun_ranks_agree_every_few_steps_and_stop_at_one_step(tmp_path, folder, monkeypatch, capsys):
    calls = fake_world(monkeypatch)
    out = run(tmp_path, folder, "--iters", "20", "--log-every", "100", "--ckpt-every", "0", "--sample-every", "0")
    assert len(calls) <= 20 // w.AGREE_EVERY + 1, len(calls)  # not once per step: the host would wait on the GPU
    step, seen = w.generator_step, [0]

    def signalled(*a):
        seen[0] += 1
        if seen[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*a)

    monkeypatch.setattr(w, "generator_step", signalled)
    with pytest.raises(SystemExit) as e:
        w.main(["--resume", str(out), "--iters", "100"])
    assert e.value.code == 143
    assert torch.load(out / "ckpt" / "last.pt", weights_only=True)["iteration"] == 20 + w.AGREE_EVERY


@pytest.mark.parametrize("saved, device, fused", [(True, "cpu", False), (False, "cuda", True)])
def test_fused_adam_follows_the_device_in_use_after_loading(tmp_path, folder, saved, device, fused):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    for key in ("opt_generator", "opt_critic"):
        for group in ckpt[key]["param_groups"]:
            group["fused"] = saved
    args = w.parse_args(["--resume", str(out)])
    nets = w.build_nets(args, torch.device("cpu"))
    w.restore(ckpt, nets, args, 0, 1, torch.device(device))
    assert {g["fused"] for o in (nets.opt_g, nets.opt_d) for g in o.param_groups} == {fused}
    assert {g["foreach"] for o in (nets.opt_g, nets.opt_d) for g in o.param_groups} == {None}


def test_adam_moments_of_a_cpu_checkpoint_take_the_layout_of_channels_last_weights(tmp_path, folder):
    """On CUDA the nets are channels_last and fused Adam needs its moments in the weights' layout; a CPU
    checkpoint's moments are contiguous (channels_last works on a CPU too, so this is tested here)."""
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    args = w.parse_args(["--resume", str(out)])
    nets = w.build_nets(args, torch.device("cpu"))
    nets.generator.to(memory_format=torch.channels_last), nets.critic.to(memory_format=torch.channels_last)
    w.restore(ckpt, nets, args, 0, 1, torch.device("cpu"))
    convs = 0
    for opt in (nets.opt_g, nets.opt_d):
        for param, state in opt.state.items():
            assert state["exp_avg"].stride() == param.stride() == state["exp_avg_sq"].stride()
            convs += param.dim() == 4 and not param.is_contiguous()
    assert convs  # channels_last conv weights were there to differ
    saved = ckpt["opt_critic"]["state"]
    assert any(torch.equal(nets.opt_d.state[p]["exp_avg"], saved[i]["exp_avg"])
               for i, p in enumerate(nets.critic.parameters()) if p.dim() == 4)  # values kept, layout changed


@pytest.mark.parametrize("local_rank, count, index", [("3", 1, 0), ("3", 2, 1), ("1", 4, 1)])
def test_local_rank_maps_onto_the_visible_gpus(monkeypatch, local_rank, count, index):
    cuda = FakeCuda(monkeypatch, current=0, count=count)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    switches = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        device, rank, world = w.setup(w.parse_args(["--device", "cuda"]))
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = switches
    assert device == torch.device("cuda", index) and cuda.current == index and (rank, world) == (0, 1)


def test_fid_cache_is_keyed_by_the_device(tmp_path):
    args = w.parse_args(["--data", str(tmp_path), "--out", str(tmp_path)])
    paths = {w.fid_cache(args, 10, torch.device(d), 64) for d in ("cpu", "cuda")}
    assert len(paths) == 2 and w.fid_cache(args, 10, torch.device("cpu"), 32) not in paths  # and by a grown stage


# ------------------------------------------------------------------------ issue 26: signals at every moment
def said(capsys):
    """The script's own stderr lines (tqdm's bar left out)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [x.strip() for x in err.replace("\r", "\n").splitlines() if x.strip().startswith(w.SCRIPT)]


def signalling(monkeypatch, name, sig, on_call=1, then=None):
    """Replace w.<name> by one that sends `sig` to this process at its on_call-th call (and `then` after it)."""
    original, calls = getattr(w, name), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == on_call:
            os.kill(os.getpid(), sig)
            if then:
                os.kill(os.getpid(), then)
        return original(*a, **k)

    monkeypatch.setattr(w, name, wrapped)


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("moment", ["start-up", "training", "figures", "sample"])
def test_every_signal_at_every_moment_gives_one_line_and_its_code(tmp_path, folder, monkeypatch, capsys, sig,
                                                                  moment):
    out = tmp_path / "runs" / "r"
    if moment == "sample":
        run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
        capsys.readouterr()
    where = {"start-up": ("scan_folder", 1), "training": ("critic_step", 3), "figures": ("write_interpolation", 1),
             "sample": ("save_image", 2)}[moment]
    signalling(monkeypatch, where[0], sig, on_call=where[1])
    with pytest.raises(SystemExit) as e:
        if moment == "sample":
            w.main(["--resume", str(out), "--sample", "5"])
        else:
            run(tmp_path, folder, "--iters", "3", "--sample-every", "1")
    assert e.value.code == CODE[sig]
    lines = said(capsys)
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0], lines
    if moment == "training":
        assert torch.load(out / "ckpt" / "last.pt", weights_only=True)["iteration"] == 2
    assert not list(out.rglob("*.tmp")) if out.exists() else True


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGINT), (signal.SIGHUP, signal.SIGINT)])
def test_a_second_signal_stops_at_once_with_the_first_ones_code(tmp_path, folder, monkeypatch, capsys, first,
                                                                second):
    signalling(monkeypatch, "critic_step", first, on_call=3, then=second)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, folder, "--iters", "5", "--sample-every", "0", "--ckpt-every", "1")
    assert e.value.code == CODE[first]
    lines = said(capsys)
    assert len(lines) == 1 and "at once" in lines[0], lines


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_mid_write_leaves_no_partial_figure(tmp_path, folder, monkeypatch, capsys, sig):
    save = Image.Image.save

    def cut(self, fp, *a, **k):  # the GIF's file is opened (truncated), then the signal lands
        if "progress.gif" in str(fp):
            open(fp, "wb").close()
            os.kill(os.getpid(), sig)
        return save(self, fp, *a, **k)

    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "1")
    (out / "samples" / "iter_000001.png").write_bytes(b"\x89PNG cut")  # a grid truncated by a kill
    (out / "progress.gif").unlink()
    monkeypatch.setattr(Image.Image, "save", cut)
    with pytest.raises(SystemExit) as e:
        w.main(["--resume", str(out), "--iters", "3"])
    assert e.value.code == CODE[sig] and not (out / "progress.gif").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(Image.Image, "save", save)
    w.write_gif(out / "samples", out / "progress.gif")  # skips the frame that does not load
    assert Image.open(out / "progress.gif").n_frames == 2


GROUP = """
import sys
import wgan_gp_64 as w
w.main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_to_the_process_group_with_workers_saves_a_checkpoint(tmp_path, folder, sig):
    """As a terminal or a scheduler signals: the whole group, DataLoader workers included. Four critic steps per
    generator step need more batches than the worker holds ready (2), so a worker that died would be needed."""
    out = tmp_path / "runs" / "g"
    cmd = [sys.executable, "-c", GROUP, *TINY, "--data", str(folder), "--iters", "100000", "--critic-its", "4",
           "--num-workers", "1", "--no-cache-images", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "0",
           "--out", str(out.parent), "--run-name", "g"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    logged_two = lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2  # noqa: E731
    while time.time() < deadline and not logged_two():
        time.sleep(0.05)
    if not logged_two():
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no two logged steps in 120 s: {proc.communicate()[1][-3000:]}")
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == CODE[sig], err[-3000:]
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith(w.SCRIPT)]
    assert "Traceback" not in err and len(lines) == 1 and "stopped by" in lines[0], err[-3000:]
    assert torch.load(out / "ckpt" / "last.pt", weights_only=True)["iteration"] >= 2


# ------------------------------------------------------------------------------- issue 26: work that is lost
def test_a_truncated_fid_cache_is_recomputed(tmp_path, folder):
    args = w.parse_args(TINY + ["--data", str(folder), "--out", str(tmp_path), "--fid-samples", "6"])
    data = w.ImageFolder(w.scan_folder(folder), args, augment=False, cache=True)
    generator = w.Generator(args)

    def inception(x):  # 8 features per image stand in for Inception's 2048
        return [x.float().flatten(1)[:, ::x[0].numel() // 8][:, :8]]

    first = w.compute_fid(inception, generator, data, args, torch.device("cpu"))
    (cache,) = (tmp_path / ".fid_cache").glob("*.pt")
    for broken in (cache.read_bytes()[:100], b"", b"not a zip"):
        cache.write_bytes(broken)
        assert w.compute_fid(inception, generator, data, args, torch.device("cpu")) == first
        torch.load(cache)  # rewritten whole


@pytest.mark.parametrize("where", ["backups/step3.pt", "r/other/last.pt", "r/ckpt/../last.pt"])
def test_a_checkpoint_outside_a_run_folder_is_refused(tmp_path, folder, capsys, where):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    copy = tmp_path / "runs" / where
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes((out / "ckpt" / "last.pt").read_bytes())
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(copy), "--iters", "3"])
    assert "not a run folder's checkpoint" in line and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("second", ["", "ckpt/last.pt"])
def test_a_run_folder_in_use_is_refused(tmp_path, folder, capsys, second):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert "in use by another process" in expect_exit(capsys, ["--resume", str(out / second), "--iters", "2"])
    w.main(["--resume", str(out), "--iters", "2"])  # free again, and main() let go of its own lock
    w.main(["--resume", str(out), "--iters", "3"])


def test_metrics_are_cut_back_to_the_checkpoint_on_resume(tmp_path, folder):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0", "--log-every", "1")
    early = (out / "ckpt" / "last.pt").read_bytes()
    w.main(["--resume", str(out), "--iters", "4"])
    (out / "ckpt" / "last.pt").write_bytes(early)  # killed after step 4, before its checkpoint
    w.main(["--resume", str(out), "--iters", "5"])
    assert [json.loads(x)["iter"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------ issue 26: silently wrong, lines
@pytest.mark.parametrize("flag", [["--equalized-lr"], ["--image-size", "64"], ["--g-channels", "16"],
                                  ["--d-channels", "16"], ["--channels", "1"], ["--latent-dim", "8"]])
def test_network_flags_changed_on_resume_are_refused(tmp_path, folder, capsys, flag):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(out), *flag, "--iters", "2"])
    assert flag[0] in line and "checkpoint" in line


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), str(2 ** 40)])
def test_seed_out_of_range_is_refused(tmp_path, capsys, seed):
    assert "--seed" in expect_exit(capsys, ["--data", str(tmp_path), "--seed", seed])


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")])
def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, folder, monkeypatch, capsys, error):
    out = run(tmp_path, folder, "--iters", "2", "--sample-every", "0")
    good = (out / "ckpt" / "last.pt").read_bytes()
    save = torch.save

    def full(obj, f, *a, **k):
        save(obj, f, *a, **k)  # most of it written, then the disk is full
        raise error

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        w.main(["--resume", str(out), "--iters", "4"])
    assert e.value.code == 1
    lines = said(capsys)
    assert len(lines) == 1 and "no space left" in lines[0], lines
    assert (out / "ckpt" / "last.pt").read_bytes() == good and not list(out.rglob("*.tmp"))


def read_only(monkeypatch, folder, code=errno.EROFS):
    """Writes under `folder` fail as on a read-only (or full) file system; running as root, chmod would not."""
    real_open, real_os_open = open, os.open

    def guarded(path, *a, **k):
        write = (a[0] if a else k.get("mode", "r")) if not isinstance(a[0] if a else 0, int) else a[0] & 3
        if str(Path(path).absolute()).startswith(str(folder)) and (write if isinstance(write, int)
                                                                    else set(write) & set("wax+")):
            raise OSError(code, os.strerror(code), str(path))
        return (real_os_open if isinstance(write, int) else real_open)(path, *a, **k)

    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(os, "open", guarded)


def test_resume_on_a_read_only_file_system_is_one_line(tmp_path, folder, monkeypatch, capsys):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    read_only(monkeypatch, out)
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(out), "--iters", "2"])
    assert str(out) in line and "read-only" in line.lower()


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_sample_into_a_read_only_or_full_folder_is_one_line(tmp_path, folder, monkeypatch, capsys, code):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    (tmp_path / "gen").mkdir()
    read_only(monkeypatch, tmp_path / "gen", code)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        w.main(["--resume", str(out), "--sample", "3", "--sample-out", str(tmp_path / "gen")])
    assert e.value.code in (1, 2)
    lines = said(capsys)
    assert len(lines) == 1 and os.strerror(code) in lines[0], lines


def test_sample_draws_its_latents_in_chunks(tmp_path, folder, monkeypatch):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    randn, rows, save = torch.randn, [], w.save_image

    class Enough(Exception):
        pass

    def counted(*shape, **k):
        rows.append(shape[0] if shape and isinstance(shape[0], int) else shape[0][0])
        assert rows[-1] <= 4096, f"{rows[-1]} latents at once"  # before drawing: 10^9 of them would not fit
        return randn(*shape, **k)

    def few(img, path, *a, **k):
        if len(list(Path(path).parent.iterdir())) >= 3:
            raise Enough
        return save(img, path, *a, **k)

    monkeypatch.setattr(torch, "randn", counted)
    monkeypatch.setattr(w, "save_image", few)
    with pytest.raises(Enough):
        w.main(["--resume", str(out), "--sample", "1000000000"])
    assert max(rows) <= 4096, max(rows)
    first = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert first and len(list((out / "generated").iterdir())) == 3


def test_a_data_folder_name_that_is_not_utf8_trains(tmp_path):
    data = make_folder(tmp_path / os.fsdecode(b"caf\xe9"), 12)
    out = run(tmp_path, data, "--iters", "1", "--sample-every", "0")
    assert (out / "ckpt" / "last.pt").is_file()
    w.main(TINY + ["--data", str(data), "--out", str(tmp_path / "runs"), "--iters", "1", "--sample-every", "0"])


def test_images_removed_mid_run_are_one_line(tmp_path, folder, monkeypatch, capsys):
    import shutil
    signalling_step = w.critic_step

    def gone(*a, **k):
        shutil.rmtree(folder, ignore_errors=True)
        return signalling_step(*a, **k)

    monkeypatch.setattr(w, "critic_step", gone)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, folder, "--iters", "3", "--no-cache-images", "--sample-every", "0")
    assert e.value.code == 1
    lines = said(capsys)
    assert len(lines) == 1 and "gone" in lines[0], lines


@pytest.mark.parametrize("other", [{"models": [], "args": {"dataset": "8gaussians"}, "iteration": 3},
                                   {"generator": {}, "critic": {}, "args": {"penalty": "gp"}, "iteration": 3}])
def test_another_scripts_checkpoint_is_named_as_such(tmp_path, folder, capsys, other):
    out = run(tmp_path, folder, "--iters", "1", "--sample-every", "0")
    torch.save(other, out / "ckpt" / "last.pt")
    capsys.readouterr()
    line = expect_exit(capsys, ["--resume", str(out)])
    assert "another script" in line and "truncated" not in line
    assert ("noise_morph.py" if "models" in other else "wgan_mnist.py") in line


def test_an_image_over_pils_pixel_limit_is_named(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / "images", 12)
    Image.new("RGB", (200, 200)).save(data / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 90x90 images pass; 200x200 is over twice the limit
    run(tmp_path, data, "--iters", "1", "--sample-every", "0")
    text = capsys.readouterr().out
    assert "MAX_IMAGE_PIXELS" in text and "10000" in text


def test_a_closed_stdout_does_not_end_the_run(tmp_path, folder, monkeypatch):
    read, write = os.pipe()
    os.close(read)  # piped to `head`, which has gone
    with open(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        out = run(tmp_path, folder, "--iters", "2", "--sample-every", "1")
        monkeypatch.undo()
    assert (out / "progress.gif").is_file() and (out / "ckpt" / "last.pt").is_file()


def test_the_bar_counts_the_time_budget(tmp_path, folder, monkeypatch):
    import tqdm
    made = []
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: made.append(k) or tqdm.std.tqdm(*a, **k))
    run(tmp_path, folder, "--iters", "100000", "--max-time", "1s", "--sample-every", "0")
    assert made and made[0]["total"] == 1
