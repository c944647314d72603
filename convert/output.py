"""Output files: names, free-space checks, and writes that are never left half-done."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConversionError
from ..leftovers import describe_removed, remove_leftovers, temp_path

log = logging.getLogger("toolgrad_edge.convert")


def output_name(source_name: str, quant: str) -> str:
    """``toolgrad-4b`` + ``Q4_K_M`` -> ``toolgrad-4b-Q4_K_M.gguf`` (the usual llama.cpp convention)."""
    return f"{source_name}-{quant}.gguf"


def make_output_folder(folder: Path) -> Path:
    """Create ``folder`` (and its parents) or say why it cannot be created."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConversionError(
            f"{folder}: cannot create the output folder: {blocker} is a file, not a folder; "
            "choose another output path"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(
            f"{folder}: cannot create the output folder ({exc.strerror or exc}); choose another output path"
        ) from None
    return folder


def check_free_space(folder: Path, needed: int) -> None:
    """Create the output folder, then check it has room for ``needed`` bytes (if not, remove what was created).

    What a killed run left there (leftovers.py) is removed first: it is exactly what eats the space.
    """
    folder = Path(folder)
    new_folders = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    make_output_folder(folder)
    removed = remove_leftovers(folder)
    if removed:
        log.warning(describe_removed(folder, removed))
    free = shutil.disk_usage(folder).free
    if free < needed:
        for p in new_folders:
            p.rmdir()
        raise ConversionError(
            f"{folder}: needs about {needed / 1e9:.2f} GB free, has {free / 1e9:.2f} GB; "
            "free some space or choose another --outdir"
        )


@contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename on success, delete on any failure.

    Covers KeyboardInterrupt and the CLI's SIGTERM too: an interrupted run leaves nothing that looks
    finished. The name carries this process's pid, so after a SIGKILL the next run removes it.
    """
    final = Path(final)
    make_output_folder(final.parent)
    tmp = temp_path(final, "partial")
    try:
        yield tmp
        if not tmp.is_file():
            raise ConversionError(f"{final}: nothing was written")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
