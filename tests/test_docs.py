"""Every code block of the README and docs/ runs as written, offline.

Python blocks of a page run in one fresh interpreter (in order, so later blocks may use earlier
ones); shell blocks run with bash, with the installed ``clipguide`` command; ``text`` blocks are
synopses and outputs.  The README's two set-up commands install packages, so this file only checks
their shape: ``.ci/run`` runs them, the first in a fresh venv without extras."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LANGUAGES = ("python", "bash", "text")


def blocks(page: Path, language: str | None = None) -> list[str]:
    found = FENCE.findall(page.read_text(encoding="utf-8"))
    return [code for lang, code in found if language is None or lang == language]


def is_setup(code: str) -> bool:
    return "pip install" in code


def offline_env(tmp_path: Path) -> dict:
    """An empty weights cache (nothing downloaded can be used) and the interpreter's own scripts first on PATH."""
    env = dict(os.environ, CLIPGUIDE_CACHE=str(tmp_path / "empty-cache"), MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run(argv, tmp_path):
    p = subprocess.run(argv, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_block_names_its_language(page):
    found = FENCE.findall(page.read_text(encoding="utf-8"))
    assert found or page.name != "README.md"
    unnamed = [code.splitlines()[0] for lang, code in found if lang not in LANGUAGES]
    assert not unnamed, f"blocks without one of {LANGUAGES} (a synopsis is 'text'): {unnamed}"


def test_the_two_setup_commands_are_what_ci_runs():
    first, second = blocks(ROOT / "README.md", "bash")[:2]
    assert "pip install torch==" in first and "pip install -e . " in first, first
    assert re.search(r'&& clipguide generate "[^"]+"\s*$', first), "the first command must end in clipguide generate"
    assert 'pip install -e ".[test' in second and second.strip().endswith("python -m pytest -q"), second
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command 1" in ci and "readme_command 2" in ci  # CI runs both, as written
    # The test command names the pair too: alone in a fresh venv, pip would take the newest torch beside an
    # older torchvision (2.15.0 with 0.29.2 on 2026-12-06).
    pins = [re.findall(r"torch==\S+ torchvision==\S+", text) for text in (first, second, ci)]
    assert all(len(p) == 1 for p in pins) and len({p[0] for p in pins}) == 1, f"README and .ci/run pin torch pairs {pins}"


def shell_blocks(page: Path) -> list[str]:
    return [code for code in blocks(page, "bash") if not is_setup(code)]


PYTHON_PAGES = [p for p in PAGES if blocks(p, "python")]
SHELL_BLOCKS = [(p, i) for p in PAGES for i, _ in enumerate(shell_blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page, tmp_path):
    assert PYTHON_PAGES, "the README has no Python example"
    run([sys.executable, "-c", "\n\n".join(blocks(page, "python"))], tmp_path)


@pytest.mark.parametrize("page,index", SHELL_BLOCKS, ids=lambda x: x.name if isinstance(x, Path) else str(x))
def test_shell_blocks_run(page, index, tmp_path):
    code = shell_blocks(page)[index]
    run(["bash", "-euo", "pipefail", "-c", code], tmp_path)
