"""`call`, `chat` and `info`: thin wrappers over ToolRuntime and gguf_info."""

from __future__ import annotations

import json

import click

from .options import (
    PROMPT_TEXT, engine_option, json_option, kv_type_option, model_option, n_ctx_option, parallel_option, seed_option,
    swa_full_option, syntax_option, threads_help, tool_choice_option, tools_option,
)


def _load_tools_file(path: str):
    from ..grammars import load_tools

    return load_tools(path)


def _format_value(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        report = result.to_dict()
        if result.parse_error:
            report.setdefault("parse_error", result.parse_error)
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    if result.tool_calls:
        for call in result.tool_calls:
            args = ", ".join(f"{k}={_format_value(v)}" for k, v in call.arguments.items())
            click.echo(f"{click.style(call.name, bold=True)}({args})")
    elif result.content:
        click.echo(result.content)
    if result.finish_reason == "length":
        kept = " (the complete calls before the cut are shown)" if result.tool_calls else ""
        click.echo(f"warning: the answer was cut at --max-tokens{kept}.", err=True)
    if result.parse_error and not result.tool_calls:
        # e.g. a call that broke a schema keyword checked only after generation (minimum, pattern):
        # the text is shown as it was written, and not run as a call.
        click.echo(f"warning: the answer is not a valid call list, so it is shown as text: {result.parse_error}",
                   err=True)
    u, t = result.usage, result.timings
    click.echo(
        click.style(
            f"[{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), {u.completion_tokens} generated; "
            f"first token {t.ttft_s:.2f}s, total {t.total_s:.2f}s]", dim=True),
        err=True,
    )


def _open_runtime(model, n_threads, n_ctx, verbose, kv_type="auto", swa_full=None, engine=None):
    from ..runtime import ToolRuntime

    return ToolRuntime(model=model, n_threads=n_threads, n_ctx=n_ctx, verbose=verbose, kv_type=kv_type,
                       swa_full=swa_full, engine=engine)


runtime_options = [
    engine_option,
    click.option("--threads", "n_threads", type=click.IntRange(1), default=None, help=threads_help),
    n_ctx_option,
    kv_type_option,
    swa_full_option,
    click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
]
generation_options = [
    click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True),
    click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True),
    seed_option,
    click.option("--no-grammar", is_flag=True, help="Decode freely (no grammar); output is parsed leniently."),
]


def _apply(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorator


@click.command()
@click.argument("query", type=PROMPT_TEXT)
@tools_option
@model_option
@tool_choice_option
@parallel_option
@syntax_option
@click.option("--stream", is_flag=True, help="Print text as it is decoded.")
@click.option("--no-speculative", is_flag=True,
              help="One token per forward pass (no jump-forward, prompt lookup or draft model), for comparison.")
@click.option("--grammar-engine", type=click.Choice(["llguidance", "llama"]), default=None,
              help="llguidance (default when installed) or llama.cpp's GBNF sampler.")
@click.option("--draft-model", type=click.Path(dir_okay=False), default=None,
              help="A smaller GGUF with the same vocabulary that drafts tokens for the model.")
@json_option
@_apply(generation_options)
@_apply(runtime_options)
def call(query, tools_file, model, tool_choice, parallel, syntax, stream, no_speculative, grammar_engine, draft_model,
         as_json, max_tokens, temperature, seed, no_grammar, n_threads, n_ctx, kv_type, swa_full, verbose,
         engine=None):
    """Turn one request into tool calls.

    With --json the result carries `stats`: forward passes, forced (jump-forward),
    drafted and accepted tokens, tokens per forward pass, full grammar masks.

    \b
    Examples:
      toolgrad-edge call "Weather in Paris in celsius?" --tools examples/tools.json
      toolgrad-edge call "What time is it in Tokyo?" -t examples/tools.json --tool-choice get_time --json
      toolgrad-edge call "Hi!" -t examples/tools.json --stream
      toolgrad-edge call "Weather in Paris?" -t examples/tools.json --no-speculative --json
    """
    from ..runtime import Decoded, Final, ToolRuntime

    tools = _load_tools_file(tools_file)
    with ToolRuntime(model=model, n_threads=n_threads, n_ctx=n_ctx, verbose=verbose, speculative=not no_speculative,
                     grammar_engine=grammar_engine, draft_model=draft_model, kv_type=kv_type,
                     swa_full=swa_full, engine=engine) as rt:
        kwargs = dict(tool_choice=tool_choice, parallel=parallel, syntax=syntax, max_tokens=max_tokens,
                      temperature=temperature, seed=seed, constrained=not no_grammar)
        if stream and not as_json:
            result = None
            # The model's text as it is decoded (calls included), dimmed; the result is printed below.
            for event in rt.stream(query, tools, **kwargs):
                if isinstance(event, Decoded):
                    click.echo(click.style(event.text, dim=True), nl=False, err=True)
                elif isinstance(event, Final):
                    result = event.result
            click.echo("", err=True)
        else:
            result = rt.call(query, tools, **kwargs)
    _print_result(result, as_json)


@click.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@json_option
def info(model_file, as_json):
    """Describe a GGUF model file and this machine: architecture, size, quantization, context, back-end, CPU.

    The ``off`` line names each capability turned off here because a library
    part could not be loaded (``none`` on a sound install); doctor says more.

    \b
    Examples:
      toolgrad-edge info ~/.cache/toolgrad-edge/models/toolgrad-4b-Q4_K_M.gguf
      toolgrad-edge info model.gguf --json
    """
    from dataclasses import asdict

    from ..doctor import missing_parts, missing_parts_line
    from ..errors import ModelLoadError
    from ..engines.inprocess import InProcessEngine
    from ..gguf_info import SUPPORTED_ARCHITECTURES, read_gguf_info
    from ..hardware import CpuDescription, detect_cpu_description, swa_label
    from ..model_resolution import backend_name, resolve_gpu_layers

    meta = read_gguf_info(model_file)
    report = {
        "path": str(meta.path),
        "name": meta.metadata.get("general.name"),
        "architecture": meta.architecture,
        "supported": meta.architecture in SUPPORTED_ARCHITECTURES,
        "parameters": meta.n_params,
        "quantization": meta.file_type,
        "file_size_bytes": meta.file_size,
        "context_length": meta.context_length,
        "vocab_size": meta.vocab_size,
        "chat_template": meta.has_chat_template,
        "gguf_version": meta.version,
        "backend": backend_name(),
        "cpu": detect_cpu_description().to_dict(),
        "missing_parts": [asdict(m) for m in missing_parts()],
    }
    if meta.architecture in SUPPORTED_ARCHITECTURES:
        # What the in-process engine plans for this file here, each choice with its reason.
        try:
            hw = InProcessEngine.plan(meta, n_gpu_layers=resolve_gpu_layers("auto"))
            context = f"{hw.context.reason}; {swa_label(hw.context.swa_full)}"
        except ModelLoadError as exc:  # e.g. the model does not fit in the RAM here
            hw, context = None, str(exc)
        if hw is not None:
            report.update({"threads": hw.threads, "threads_reason": hw.threads_reason, "kernels": hw.kernels.reason})
        report["context"] = context
        if hw is not None:  # serve's default --parallel, and why
            from ..engines.batched import default_parallel

            report["parallel"] = default_parallel(meta, hw)[1]
    if as_json:
        click.echo(json.dumps(report))
        return
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e9:.2f} B)"
        elif key == "file_size_bytes":
            key, value = "file_size", f"{value / 1e9:.2f} GB ({value:,} bytes)"
        elif key == "cpu":
            value = CpuDescription(**value).summary()
        elif key == "missing_parts":
            key, value = "off", missing_parts_line(value)
        click.echo(f"{key:<{width}}  {value}")
