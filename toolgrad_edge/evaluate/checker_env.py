"""The separate Python environment that holds BFCL's official checker.

``bfcl-eval`` pins an old numpy and, with its full dependency set, pulls every
API client it can benchmark (and sentence-transformers, hence torch). None of
that may reach the runtime. So the checker lives in a virtual environment of
its own: ``bfcl-eval`` installed without dependencies, plus exactly what the
modules the scoring imports need. The runtime talks to it only through a
subprocess (``checker_runner.py``) and never imports ``bfcl_eval``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvaluationError
from ..paths import cache_root

ENV_CHECKER = "TOOLGRAD_EDGE_BFCL_ENV"

# The BFCL release whose data and checker the tables in docs/evaluation.md use.
BFCL_EVAL_REQUIREMENT = "bfcl-eval==2026.3.23"

# What the checker's import chain needs (eval_runner -> ast_checker,
# model_handler.utils, bfcl_eval.utils, eval_runner_helper), pinned where
# bfcl-eval pins them. The model registry (constants/model_config.py), which
# imports every API client, is replaced by checker_runner.py; see there.
CHECKER_REQUIREMENTS = (
    "numpy==1.26.4",
    "pandas",
    "tenacity>=8.5.0",
    "tree_sitter==0.21.3",
    "tree-sitter-java==0.21.0",
    "tree-sitter-javascript==0.21.4",
    "filelock==3.20.0",
    "overrides",
    "python-dotenv>=1.0.1",
    "tqdm",
)

# Written last by create_checker_env: an environment without it is a partial
# install (interrupted or failed) and is rebuilt.
READY_MARKER = ".toolgrad-edge-ready"


@dataclass(frozen=True)
class CheckerEnv:
    """A ready evaluation environment: its interpreter and bfcl_eval's data folder."""

    root: Path
    python: Path
    bfcl_eval_dir: Path
    version: str

    @property
    def data_dir(self) -> Path:
        return self.bfcl_eval_dir / "data"


def default_env_dir() -> Path:
    """Where the checker environment is looked for (and created) by default.

    ``$TOOLGRAD_EDGE_BFCL_ENV`` if set; else ``benchmarks/bfcl/env`` when run
    from a checkout that already has one; else ``<cache>/bfcl-env``.
    """
    explicit = os.environ.get(ENV_CHECKER)
    if explicit:
        return Path(explicit).expanduser()
    in_checkout = Path.cwd() / "benchmarks" / "bfcl" / "env"
    if (in_checkout / READY_MARKER).is_file():
        return in_checkout
    return cache_root() / "bfcl-env"


def env_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def find_checker_env(root: Path | None = None) -> CheckerEnv | None:
    """The ready environment at ``root`` (default: default_env_dir()), or None."""
    root = (Path(root) if root is not None else default_env_dir()).expanduser().absolute()
    python = env_python(root)
    if not (root / READY_MARKER).is_file() or not python.is_file():
        return None
    return _describe(root, python)


def ensure_checker_env(
    root: Path | None = None,
    *,
    requirement: str = BFCL_EVAL_REQUIREMENT,
    create: bool = True,
    log=None,
) -> CheckerEnv:
    """Find the checker environment, creating it on first use.

    ``requirement`` is what pip installs for bfcl-eval: a pinned name or a
    local wheel path. Raises EvaluationError when it is missing and may not
    be created, or when creating it fails.
    """
    root = (Path(root) if root is not None else default_env_dir()).expanduser().absolute()
    found = find_checker_env(root)
    if found is not None:
        return found
    if not create:
        raise EvaluationError(
            f"No BFCL checker environment at {root} (expected {env_python(root)} and "
            f"{root / READY_MARKER}). Run without --no-create-env to build it, or point "
            f"--checker-env / ${ENV_CHECKER} at an existing one."
        )
    return create_checker_env(root, requirement=requirement, log=log)


def create_checker_env(root: Path, *, requirement: str = BFCL_EVAL_REQUIREMENT, log=None) -> CheckerEnv:
    """Build the environment at ``root`` from scratch (replacing a partial one)."""
    root = Path(root).expanduser().absolute()
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    say = log or (lambda message: None)
    say(f"Creating the BFCL checker environment in {root} (first use only)...")
    _run([sys.executable, "-m", "venv", str(root)], what="create the virtual environment")
    python = env_python(root)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    say(f"Installing {requirement} without its API-client dependencies...")
    _run([*pip, "--no-deps", requirement], what=f"install {requirement}")
    say("Installing what the checker imports: " + ", ".join(CHECKER_REQUIREMENTS))
    _run([*pip, *CHECKER_REQUIREMENTS], what="install the checker's dependencies")
    env = _describe(root, python)
    (root / READY_MARKER).write_text(json.dumps({"bfcl_eval": env.version}) + "\n")
    return env


def _describe(root: Path, python: Path) -> CheckerEnv:
    # find_spec locates the package without running bfcl_eval/__init__.py.
    probe = (
        "import importlib.metadata as m, importlib.util as u, json;"
        "s = u.find_spec('bfcl_eval');"
        "print(json.dumps({'dir': s.submodule_search_locations[0] if s else None,"
        " 'version': m.version('bfcl-eval') if s else None}))"
    )
    out = _run([str(python), "-c", probe], what="inspect the BFCL checker environment")
    info = json.loads(out.strip().splitlines()[-1])
    if not info["dir"]:
        raise EvaluationError(
            f"The environment at {root} has no bfcl_eval package. Delete the folder so it is "
            f"rebuilt, or install it there: {python} -m pip install --no-deps {BFCL_EVAL_REQUIREMENT}"
        )
    return CheckerEnv(root=root, python=python, bfcl_eval_dir=Path(info["dir"]), version=info["version"])


def _run(cmd: list[str], *, what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise EvaluationError(f"Could not {what}: {cmd[0]} cannot be run ({exc}).") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise EvaluationError(
            f"Could not {what} (exit {proc.returncode}): {' '.join(cmd)}\n{tail}\n"
            "The checker environment needs PyPI (or a pip cache holding bfcl-eval and its "
            "checker dependencies); pass --checker-env to use an existing one."
        )
    return proc.stdout
