"""``toolgrad-edge bench``: speed of one GGUF, or several side by side with quality."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from .options import ENGINE_AND_MODEL, check_engine_url


@click.command("bench")
@click.option("--model", "-m", "models", multiple=True, type=click.Path(dir_okay=False),
              help="GGUF file; repeat to compare several. Default: the runtime's default model.")
@click.option("--quant", "quants", multiple=True, metavar="TYPE",
              help="With --from: make this quant type (repeatable, e.g. --quant Q8_0 --quant Q4_K_M).")
@click.option("--from", "source", default=None, metavar="SOURCE",
              help="Float GGUF, checkpoint folder or hub id the --quant files are made from.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs (medians).")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("--max-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Tokens decoded per timed run.")
@click.option("--draft-model", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also measure with this GGUF drafting (same vocabulary, e.g. the 270M for a 4B).")
@click.option("--grammar-engine", type=click.Choice(["llguidance", "llama"]), default=None,
              help="Grammar engine of the constrained runs (default: llguidance when installed).")
@click.option("--engine", metavar="URL", default=None, callback=check_engine_url,
              help="Measure toolgrad-edge over the llama-server at URL (its own model) instead of local files: "
                   "decode t/s of constrained calls, TTFT, p50 latency, valid calls. $TOOLGRAD_EDGE_ENGINE does the "
                   "same when no file is named.")
@click.option("--batch-agreement", "batch_agreement", type=click.IntRange(min=2), default=None, metavar="N",
              help="Instead of the speed figures: decode the bench's first N requests greedily, each alone and then "
                   "N at once on the batched engine, and report per request whether the token ids are identical "
                   "(and where they first differ).")
@click.option("--no-quality", is_flag=True, help="Skip the top-1 / KL comparison with the reference file.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also save a bar chart (needs the 'bench' extra: matplotlib).")
def bench(models, quants, source, runs, n_threads, max_tokens, draft_model, grammar_engine, engine, batch_agreement,
          no_quality, as_json, markdown, plot_file):
    """Measure prefill/decode speed, TTFT, memory and quality of GGUF files.

    Each file: size, peak RSS, prefill tokens/s, decode tokens/s free (one
    token per pass), constrained (the default engine: jump-forward and
    drafts), stepwise (constrained, one token per pass) in both call
    syntaxes, tokens per forward pass, draft acceptance, greedy agreement
    between constrained and stepwise, llama-cpp-python's own grammar path on
    the same file (the baseline), time to first token cold and warm; with several files,
    top-1 agreement and mean KL of next-token distributions against the
    highest-precision one. Medians after a warm-up.

    With --engine URL (or $TOOLGRAD_EDGE_ENGINE when no file is named): the
    same tool-call queries through a llama-server, as this client sees them
    (see docs/engines.md).

    With --batch-agreement N: whether batching changes answers. The bench's
    first N requests are decoded greedily alone (one-request engine), then N
    at once through the batched engine (serve --parallel N); per request,
    whether the generated token ids are identical and the first position
    where they differ ("batch_agreement: k of N identical").

    \b
    Examples:
      toolgrad-edge bench
      toolgrad-edge bench -m toolgrad-4b-BF16.gguf -m toolgrad-4b-Q8_0.gguf -m toolgrad-4b-Q4_K_M.gguf
      toolgrad-edge bench --from toolgrad-4b-BF16.gguf --quant Q8_0 --quant Q4_K_M --markdown
      toolgrad-edge bench -m a.gguf -m b.gguf --runs 3 --json --plot speed.png
      toolgrad-edge bench -m toolgrad-4b-Q4_K_M.gguf --draft-model gemma-3-270m-Q4_K_M.gguf --json
      toolgrad-edge bench --engine http://gpu-box:8080 --runs 10 --json
      toolgrad-edge bench --batch-agreement 4 --json
    """
    if engine is None and not models and not source:
        # No file named: $TOOLGRAD_EDGE_ENGINE decides, as for call and serve.
        from ..engines.llama_server import ENV_ENGINE, is_engine_url

        engine = os.environ.get(ENV_ENGINE) or None
        if engine is not None and not is_engine_url(engine):
            raise click.UsageError(f"${ENV_ENGINE} is {engine!r}; expected http://HOST:PORT of a llama-server.")
    if batch_agreement is not None:
        local = [name for name, value in (("--engine", engine), ("--quant", quants), ("--from", source),
                                          ("--draft-model", draft_model), ("--plot", plot_file)) if value]
        if local:
            names = " and ".join(local)
            raise click.UsageError(f"--batch-agreement measures the in-process batched engine on model files "
                                   f"(-m); drop {names} or --batch-agreement.")
        _bench_batch_agreement(models, batch_agreement, n_threads, max_tokens, grammar_engine, as_json, markdown)
        return
    if engine is not None:
        if models:
            raise click.UsageError(ENGINE_AND_MODEL)
        local = [name for name, value in (("--quant", quants), ("--from", source), ("--threads", n_threads),
                                          ("--draft-model", draft_model), ("--grammar-engine", grammar_engine),
                                          ("--plot", plot_file)) if value]
        if local:
            names = " and ".join(local)
            raise click.UsageError(f"{names} {'applies' if len(local) == 1 else 'apply'} to local model files, "
                                   f"but --engine measures a llama-server, which uses its own model; drop {names} "
                                   "or --engine.")
        _bench_engine(engine, runs, max_tokens, as_json, markdown)
        return

    from ..bench import compare, measure
    from ..errors import EvaluationError

    if quants and not source:
        raise click.UsageError("--quant needs --from SOURCE (the file or checkpoint to quantize).")
    if source and not quants:
        raise click.UsageError("--from needs at least one --quant TYPE.")

    with tempfile.TemporaryDirectory(prefix="toolgrad-bench-quants-") as tmp:
        paths = [Path(m) for m in models]
        if source:
            click.echo(f"Making {', '.join(quants)} from {source} ...", err=True)
            paths += compare.files_from_source(source, list(quants), Path(tmp), progress=not as_json)
        if not paths:
            from ..model_resolution import resolve_model

            paths = [resolve_model(None)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise EvaluationError(f"model file(s) not found: {', '.join(missing)}; pass existing GGUF paths.")

        quality = not no_quality and len(paths) > 1
        total = len(paths) * measure.steps_per_file(runs, draft_model is not None)
        if quality:
            total += len(paths) * len(compare.quality_prompts())
        with _progress_bar(total) as progress:
            measure_file = measure.measure_in_subprocess(draft_model, grammar_engine)
            report = compare.compare_models(paths, runs=runs, n_threads=n_threads, max_tokens=max_tokens,
                                            quality=quality, progress=progress, measure=measure_file)

    if plot_file:
        compare.plot(report, plot_file)
    _echo_report(report, as_json, markdown, compare)
    if plot_file and not as_json:
        click.echo(f"plot: {plot_file}", err=True)


def _bench_engine(url: str, runs: int, max_tokens: int, as_json: bool, markdown: bool) -> None:
    from ..bench import remote

    with _progress_bar(remote.steps(runs)) as progress:
        report = remote.measure_engine(url, runs=runs, max_tokens=max_tokens,
                                       progress=lambda label: progress(label, 1))
    _echo_report(report, as_json, markdown, remote)


def _bench_batch_agreement(models, parallel: int, n_threads, max_tokens: int, grammar_engine, as_json: bool,
                           markdown: bool) -> None:
    from ..bench import agreement
    from ..errors import EvaluationError
    from ..model_resolution import resolve_model

    paths = [Path(m) for m in models] or [resolve_model(None)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvaluationError(f"model file(s) not found: {', '.join(missing)}; pass existing GGUF paths.")
    with _progress_bar(len(paths) * agreement.steps(parallel)) as progress:
        report = agreement.measure_files(paths, parallel, max_tokens=max_tokens, n_threads=n_threads,
                                         grammar_engine=grammar_engine, progress=progress)
    _echo_report(report, as_json, markdown, agreement)


@contextlib.contextmanager
def _progress_bar(total: int):
    """A progress bar on stderr; yields progress(label, advance)."""
    with click.progressbar(length=total, label="bench", file=sys.stderr, show_pos=True, show_eta=True) as bar:
        def progress(label: str, advance: int) -> None:
            bar.label = label[:48].ljust(48)
            bar.update(advance)

        yield progress


def _echo_report(report: dict, as_json: bool, markdown: bool, formats) -> None:
    """The report as JSON, Markdown or a table (``formats``: a module with format_markdown and format_table)."""
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif markdown:
        click.echo(formats.format_markdown(report))
    else:
        click.echo(formats.format_table(report))
