"""Output files: names, free-space checks, and writes that are never left half-done."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConversionError

PARTIAL_SUFFIX = ".partial"


def output_name(source_name: str, quant: str) -> str:
    """``toolgrad-4b`` + ``Q4_K_M`` -> ``toolgrad-4b-Q4_K_M.gguf`` (the usual llama.cpp convention)."""
    return f"{source_name}-{quant}.gguf"


def check_free_space(folder: Path, needed: int) -> None:
    folder = Path(folder)
    probe = folder
    while not probe.exists():  # the folder may not exist yet: ask its nearest existing parent
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConversionError(
            f"{folder}: needs about {needed / 1e9:.2f} GB free, has {free / 1e9:.2f} GB; "
            "free some space or choose another --outdir"
        )


@contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename on success, delete on any failure.

    Covers KeyboardInterrupt too: an interrupted run leaves nothing that looks finished.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        if not tmp.is_file():
            raise ConversionError(f"{final}: nothing was written")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
