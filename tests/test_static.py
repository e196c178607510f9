"""Static checks as part of the test command: ruff (lint + format) and mypy on the package.

Why in pytest: CI runs exactly README's test command, so a lint or type error fails CI the same way a
wrong token does, and a contributor runs all three with one command. The configuration lives in
pyproject.toml ([tool.ruff], [tool.mypy]); mypy reads the package from src/, which is also what an IDE
resolves (top-level runtime/, export/ and kernels/ are symlinks into it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["src", "bench", "tests", "tools"]


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: it is in the [dev] extra (pip install -e '.[dev]')")
    return exe


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint_is_clean():
    r = _run(_tool("ruff"), "check", "--no-cache", *CHECKED)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_ruff_format_is_applied():
    r = _run(_tool("ruff"), "format", "--check", "--no-cache", *CHECKED)
    assert r.returncode == 0, "run `ruff format src bench tests tools`:\n" + r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_is_clean_on_the_package():
    r = _run(_tool("mypy"), "--no-incremental")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Success: no issues found" in r.stdout, r.stdout[-2000:]


def test_the_package_tree_resolves_without_the_install():
    """Tools that read the tree (not the installed package) must resolve `from ..runtime` in export/: the
    package's real files are under src/qwen_audio_edge/, and the top-level folders are links to them."""
    for sub in ("runtime", "export", "kernels"):
        top = ROOT / sub
        assert top.is_symlink(), f"{sub}/ should be a link into src/qwen_audio_edge/"
        assert top.resolve() == (ROOT / "src" / "qwen_audio_edge" / sub).resolve()
        assert (ROOT / "src" / "qwen_audio_edge" / sub / "__init__.py").is_file()
