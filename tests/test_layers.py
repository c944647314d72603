"""The layering in pyproject.toml ([tool.importlinter]), checked by import-linter on every test run.

import-linter reads the package from disk, and the installed package maps
``toolgrad_edge.convert`` and ``toolgrad_edge.grammars`` from the repository's
top-level convert/ and grammars/ (pyproject's package-dir). So the check runs
on a copy laid out as installed: toolgrad_edge/ with convert/ and grammars/
inside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed_layout(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = target / "toolgrad_edge"
    shutil.copytree(ROOT / "toolgrad_edge", package, ignore=ignore)
    for room in ("convert", "grammars"):
        shutil.copytree(ROOT / room, package / room, ignore=ignore)
    return target


def test_imports_follow_the_layers(tmp_path):
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter.")
    source = _installed_layout(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=source, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
