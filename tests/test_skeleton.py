"""The three scripts share one skeleton: the same sections in the same order, the same names in the same
sections, and a main that fits on a screen or two (issue 15)."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("wgan_mnist.py", "wgan_gp_64.py", "noise_morph.py")
SECTIONS = {
    "flags": {"fail", "Parser", "duration", "build_parser", "parse_args", "as_flags", "read_config", "check_args"},
    "data": set(),
    "models": {"Generator", "Critic"},
    "losses": {"gradient_penalty"},
    "one-step functions": {"critic_step", "generator_step", "build_nets", "train_step"},
    "images and FID": {"load_inception", "inception_features", "compute_fid"},
    "run folder and checkpoint": {"rng_state", "set_rng_state", "settings", "save_checkpoint", "checkpoint_file",
                                  "load_checkpoint", "restore", "open_run_folder", "RunLog", "StopSignals"},
    "main": {"setup", "main"},
}
START_UP = {"Interrupted", "interrupted", "quit_while_starting", "exit_code"}


def sections_of(text):
    """{section title: names defined at the top level under it}, in the file's order."""
    heads = [(text.count("\n", 0, m.start()) + 1, m[1]) for m in re.finditer(r"^# -+ (.+)$", text, re.M)]
    found = {title: set() for _, title in heads}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            owners = [title for line, title in heads if line < node.lineno]
            found.setdefault(owners[-1] if owners else "(before the sections)", set()).add(node.name)
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_sections_and_names(script):
    found = sections_of((ROOT / script).read_text())
    early = found.pop("(before the sections)", set())  # the signal handling that must exist before torch loads
    assert early <= START_UP, f"{script}: {sorted(early - START_UP)} defined before the first section"
    assert list(found) == list(SECTIONS), f"{script}: sections {list(found)}"
    for title, names in SECTIONS.items():
        assert names <= found[title], f"{script}, section {title!r}: missing {sorted(names - found[title])}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_short(script):
    main = next(n for n in ast.parse((ROOT / script).read_text()).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 100, f"{script}: main is {main.end_lineno - main.lineno + 1} lines"


def test_the_check_can_fail():
    moved = "# ---- flags\ndef fail():\n    pass\n# ---- main\ndef gradient_penalty():\n    pass\n"
    found = sections_of(moved)
    assert found == {"flags": {"fail"}, "main": {"gradient_penalty"}}
    assert sections_of("def build_parser():\n    pass\n# ---- flags\n") == {"(before the sections)": {"build_parser"}, "flags": set()}
    assert not SECTIONS["losses"] <= found.get("losses", set())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_defaults_but_never_none(script):
    """A flag whose default is None says in its own help what None means; argparse's '(default: None)' says
    nothing and, where the help already named the default, contradicted it."""
    text = " ".join(importlib.import_module(script.removesuffix(".py")).build_parser().format_help().split())
    assert "(default: None)" not in text
    assert "(default: 1)" in text  # --seed's: the other defaults are still printed
