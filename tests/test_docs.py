"""The README and the docs pages: every relative link and image resolves, every committed image is small and
shown somewhere, and the README stays a front door (at most about 200 lines)."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md",
         ROOT / "bench" / "RESULTS.md", ROOT / "experiments" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]*\bsrc=\"([^\"]+)\"")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def links(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    for match in LINK.finditer(text):
        yield match.group(1) or match.group(2), match.group(0).startswith(("!", "<img"))


def anchors(page):
    code = False
    for line in page.read_text().splitlines():
        code ^= line.startswith("```")
        if not code and line.startswith("#"):
            yield slug(line.lstrip("#"))


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    for target, is_image in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = unquote(target).partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if is_image:
            assert dest.is_relative_to(ROOT / "docs" / "images"), f"{page.name}: image {target} outside docs/images"
        if anchor and dest.suffix == ".md":
            assert anchor in set(anchors(dest)), f"{page.name}: no heading for #{anchor} in {dest.name}"


def test_images_are_small_shown_and_few():
    images = [p for p in (ROOT / "docs" / "images").glob("*") if p.is_file()]
    shown = {(page.parent / unquote(t)).resolve() for page in PAGES if page.exists() for t, img in links(page) if img}
    for image in images:
        assert image.stat().st_size <= 400_000, f"{image.name}: {image.stat().st_size} bytes"
        assert image.resolve() in shown, f"{image.name} is committed but no page shows it"
    assert sum(p.stat().st_size for p in images) <= 5_000_000


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210


def test_the_checks_can_fail(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A `code` Heading, here\n")
    page.write_text("[a](there.md#a-code-heading-here) ![b](missing.png) [c](there.md#nope)\n```\n[d](x.md)\n```\n")
    found = list(links(page))
    assert [t for t, _ in found] == ["there.md#a-code-heading-here", "missing.png", "there.md#nope"]
    assert list(anchors(tmp_path / "there.md")) == ["a-code-heading-here"]


def test_gitignore_lets_docs_images_through_and_keeps_run_outputs_out():
    import subprocess
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "docs/images/x.png", "runs/a/samples/x.png",
                              "x.png"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == ["runs/a/samples/x.png", "x.png"]


def cpu_line(readme_text):
    """The quick start's `wgan_gp_64.py --data fish/ --image-size 64 ...` command, its continuations joined."""
    block = re.search(r"## Quick start\n+```bash\n(.*?)```", readme_text, re.S)[1].replace("\\\n", " ")
    line = next(x for x in block.splitlines() if "wgan_gp_64.py" in x and "--image-size 64" in x)
    return " ".join(line.split()[line.split().index("fish/") + 1:])


def test_readme_cpu_line_is_the_scripts_cpu_recipe():
    """The script's CPU hint names CPU_RECIPE (plus --amp on a CPU with bf16 units): the README must run the same."""
    import ast
    tree = ast.parse((ROOT / "wgan_gp_64.py").read_text())
    recipe = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "CPU_RECIPE")
    assert cpu_line((ROOT / "README.md").read_text()) == recipe + " --amp"
    assert cpu_line("## Quick start\n\n```bash\nx wgan_gp_64.py --data fish/ --image-size 64 \\\n  --lr 1\n```\n") \
        == "--image-size 64 --lr 1"  # the parser itself reads continuations
