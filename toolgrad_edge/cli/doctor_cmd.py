"""``toolgrad-edge doctor``: check this install and the model on this machine."""

from __future__ import annotations

import json
import sys

import click

from .options import json_option, kv_type_option, model_option, n_ctx_option, swa_full_option, threads_help


@click.command()
@model_option
@click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help=threads_help)
@n_ctx_option
@kv_type_option
@swa_full_option
@json_option
def doctor(model, n_threads, n_ctx, kv_type, swa_full, as_json):
    """Check the install and self-test the model on this machine; exit 1 on any failure.

    Reports the versions, back-end and devices, CPU features, the llama.cpp
    kernels avoided here and why, RAM, the threads, context and KV cache type
    chosen (with reasons), the grammar engine and the extras installed. Then
    one fixed tool prompt runs through every decode path: the output head
    against llama.cpp's logits, speculative against stepwise decoding, the
    calls against their schema, a save/restore of the tool prefix, and a cold
    call against the same call with its prefix restored.

    \b
    Examples:
      toolgrad-edge doctor
      toolgrad-edge doctor --model toolgrad-4b-Q4_K_M.gguf --json
    """
    from ..doctor import format_report, run_doctor

    report = run_doctor(model, n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full)
    click.echo(json.dumps(report) if as_json else format_report(report))
    sys.exit(0 if report["ok"] else 1)
