"""safetensors -> GGUF, end to end: resolve, validate everything, write, quantize."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import ConversionError
from ..leftovers import temp_path
from ..paths import models_dir
from .output import atomic_output, check_free_space, output_name
from .plan import build_plan, hparams_from_config, read_config
from .quantize import QUANT_TYPES, quantize_gguf
from .safetensors_reader import SafetensorsCheckpoint
from .source import read_license, resolve_source
from .tokenizer import read_vocabulary, special_vocab
from .writer import FLOAT_TYPES, ModelMetadata, expected_file_size, file_bytes, write_float_gguf

SUPPORTED_TYPES = (*FLOAT_TYPES, *QUANT_TYPES)
DEFAULT_QUANTS = ("Q4_K_M",)

log = logging.getLogger("toolgrad_edge.convert")

# The float type that holds a checkpoint of this dtype without loss: the
# quantizer's input when no float output is requested.
LOSSLESS_TYPE = {"BF16": "BF16", "F16": "F16", "F32": "F32"}


def normalize_quants(quants: Iterable[str]) -> list[str]:
    out: list[str] = []
    for q in quants:
        name = q.upper()
        if name not in SUPPORTED_TYPES:
            raise ConversionError(f"unknown output type {q!r}; choose from {', '.join(SUPPORTED_TYPES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConversionError("no output type given; pass at least one (e.g. Q4_K_M)")
    return out


def convert_checkpoint(
    source: str | os.PathLike,
    outfile: str | os.PathLike | None = None,
    outdir: str | os.PathLike | None = None,
    quants: Iterable[str] = DEFAULT_QUANTS,
    revision: str | None = None,
    keep_intermediate: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Convert a Gemma 3 / ToolGrad checkpoint (folder or hub id) to one GGUF per type in ``quants``.

    Returns the written files in the order of ``quants`` (plus the kept
    intermediate, last, when ``keep_intermediate`` made one). Everything is
    validated before the first byte is written; nothing half-written survives.
    """
    targets = normalize_quants(quants)
    if outfile is not None and outdir is not None:
        raise ConversionError("pass either outfile or outdir, not both")
    if outfile is not None and len(targets) > 1:
        raise ConversionError(f"outfile names one file but {len(targets)} types were asked for; use outdir")
    say = _reporter(progress)

    src = resolve_source(str(source), revision=revision, progress=progress)
    hp = hparams_from_config(read_config(src.folder), where=str(src.folder / "config.json"))
    vocab = read_vocabulary(src.folder, hp.n_vocab)
    special = special_vocab(src.folder, vocab)
    meta = ModelMetadata(name=src.name, source_repo=src.repo_id, license=read_license(src.folder))

    if outfile is not None:
        outfile = Path(outfile)
        folder = outfile.parent
        finals = {targets[0]: outfile}
    else:
        folder = Path(outdir) if outdir is not None else models_dir()
        finals = {q: folder / output_name(src.name, q) for q in targets}

    quant_targets = [q for q in targets if q in QUANT_TYPES]
    float_targets = [q for q in targets if q in FLOAT_TYPES]
    scratch: Path | None = None
    written: dict[str, Path] = {}
    try:
        with SafetensorsCheckpoint(src.folder) as checkpoint:
            plan = build_plan(checkpoint, hp)
            if plan.skipped_summary():
                say(plan.skipped_summary())
            dtypes = plan.source_dtypes
            intermediate = LOSSLESS_TYPE[dtypes.pop()] if len(dtypes) == 1 else "F32"
            if quant_targets and intermediate not in float_targets:
                if keep_intermediate:
                    finals[intermediate] = folder / output_name(src.name, intermediate)
                    float_targets.append(intermediate)
                else:
                    scratch = temp_path(folder / output_name(src.name, intermediate), "intermediate")

            needed = sum(expected_file_size(plan, vocab, FLOAT_TYPES[q][0]) for q in float_targets)
            if scratch is not None:
                needed += expected_file_size(plan, vocab, FLOAT_TYPES[intermediate][0])
            n_params = sum(t.n_elements for t in plan.tensors)
            needed += sum(int(n_params * QUANT_TYPES[q].bits_per_weight / 8) for q in quant_targets)
            check_free_space(folder, needed)

            warned = False

            def write(path: Path, kind: str, label: str) -> None:
                nonlocal warned
                with _progress_bar(label, file_bytes(plan, FLOAT_TYPES[kind][0]), progress) as bar:
                    nonfinite = write_float_gguf(path, checkpoint, plan, hp, vocab, special, meta, kind, bar.update)
                if nonfinite and not warned:
                    warned = True
                    log.warning(_nonfinite_warning(src.folder, nonfinite))

            for kind in float_targets:
                with atomic_output(finals[kind]) as tmp:
                    write(tmp, kind, finals[kind].name)
                written[kind] = finals[kind]
            if scratch is not None:
                write(scratch, intermediate, f"{output_name(src.name, intermediate)} (intermediate)")

        for q in quant_targets:
            say(f"quantizing to {q} with llama.cpp's quantizer -> {finals[q]}")
            written[q] = quantize_gguf(scratch or written[intermediate], finals[q], q)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)

    return [written[q] for q in targets] + [p for q, p in written.items() if q not in targets]


def _nonfinite_warning(folder: Path, nonfinite: dict[str, int]) -> str:
    worst = sorted(nonfinite.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{name} ({count:,})" for name, count in worst[:5])
    more = f" and {len(worst) - 5} more tensors" if len(worst) > 5 else ""
    return (f"warning: {folder}: {sum(nonfinite.values()):,} NaN/Inf weights in {shown}{more}; "
            "they were converted as they are, and the model will likely produce garbage. "
            "Check the checkpoint (a failed fine-tune or a damaged download).")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(label: str, total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # comes with huggingface_hub

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _reporter(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)
