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
    paths = {w.fid_cache(args, 10, torch.device(d)) for d in ("cpu", "cuda")}
    assert len(paths) == 2
