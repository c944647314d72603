"""``toolgrad-edge convert`` and ``toolgrad-edge quantize``: thin wrappers over toolgrad_edge.convert."""

from __future__ import annotations

import json

import click

from ..convert.quantize import QUANT_TYPES
from ..convert.writer import FLOAT_TYPES
from .options import json_option

_QUANTS = tuple(QUANT_TYPES)
_TYPES = (*FLOAT_TYPES, *_QUANTS)


def _report(paths, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"files": [{"path": str(p), "bytes": p.stat().st_size} for p in paths]}, indent=2))
        return
    for p in paths:
        click.echo(f"{p}  ({p.stat().st_size / 1e9:.2f} GB)")


@click.command()
@click.argument("source")
@click.option("--outfile", "-o", type=click.Path(dir_okay=False), default=None,
              help="Output file (only with a single --quant).")
@click.option("--outdir", type=click.Path(file_okay=False), default=None,
              help="Output folder. Default: the model cache, where the runtime looks.")
@click.option("--quant", "-q", "quants", multiple=True, type=click.Choice(_TYPES, case_sensitive=False),
              help="Output type; repeat for several. Default: Q4_K_M.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (hub ids only).")
@click.option("--keep-intermediate", is_flag=True, help="Keep the high-precision GGUF the quantized files come from.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@json_option
def convert(source, outfile, outdir, quants, revision, keep_intermediate, quiet, as_json):
    """Convert Gemma 3 / ToolGrad safetensors (a folder or a hub id) to GGUF.

    One high-precision GGUF is written from the safetensors, streaming one
    tensor at a time, and every quantized type is made from it with
    llama.cpp's own quantizer. Files are named SOURCE-TYPE.gguf.

    \b
    Examples:
      toolgrad-edge convert zhongyi-zhou/toolgrad-4b
      toolgrad-edge convert zhongyi-zhou/toolgrad-4b --quant Q8_0 --quant Q4_K_M
      toolgrad-edge convert ./my-finetune --quant BF16 --outdir ./gguf
      toolgrad-edge convert ./my-finetune -q Q4_K_M -o model.gguf --json
    """
    from toolgrad_edge.convert import DEFAULT_QUANTS, convert_checkpoint

    paths = convert_checkpoint(
        source, outfile=outfile, outdir=outdir, quants=[q.upper() for q in quants] or DEFAULT_QUANTS,
        revision=revision, keep_intermediate=keep_intermediate, progress=not quiet,
    )
    _report(paths, as_json)


@click.command()
@click.argument("infile", type=click.Path(dir_okay=False))
@click.argument("outfile", type=click.Path(dir_okay=False))
@click.option("--quant", "-q", required=True, type=click.Choice(_QUANTS, case_sensitive=False),
              help="Target quantization.")
@click.option("--allow-requantize", is_flag=True, help="Accept an already-quantized input (loses accuracy).")
@json_option
def quantize(infile, outfile, quant, allow_requantize, as_json):
    """Quantize an F32/F16/BF16 GGUF with llama.cpp's quantizer.

    \b
    Examples:
      toolgrad-edge quantize toolgrad-4b-BF16.gguf toolgrad-4b-Q4_K_M.gguf --quant Q4_K_M
      toolgrad-edge quantize toolgrad-4b-BF16.gguf toolgrad-4b-Q8_0.gguf -q Q8_0 --json
    """
    from toolgrad_edge.convert import quantize_gguf

    path = quantize_gguf(infile, outfile, quant.upper(), allow_requantize=allow_requantize)
    _report([path], as_json)
