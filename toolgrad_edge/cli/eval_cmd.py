"""``toolgrad-edge eval``: accuracy evaluations (BFCL)."""

from __future__ import annotations

import sys

import click

from .options import engine_option, json_option, model_option, n_ctx_option, syntax_option


@click.group("eval")
def eval_group() -> None:
    """Accuracy evaluations, scored by the benchmark's own checker.

    \b
    Examples:
      toolgrad-edge eval bfcl --model toolgrad-4b-Q4_K_M.gguf
      toolgrad-edge eval bfcl --limit 10 --no-grammar --json
    """


@eval_group.command("bfcl")
@model_option
@engine_option
@click.option(
    "--categories", default="all", show_default=True, metavar="LIST",
    help="Comma-separated BFCL categories: simple_python, multiple, parallel, parallel_multiple, "
    "irrelevance, live_simple, live_multiple, live_parallel, live_parallel_multiple, "
    "live_irrelevance, live_relevance.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N entries of each category.")
@click.option("--grammar/--no-grammar", default=True, show_default=True,
              help="Constrain decoding with the tools' grammar, or decode freely.")
@syntax_option
@click.option(
    "--tool-choice", type=click.Choice(["auto", "required"]), default="auto", show_default=True,
    help="auto: the model may answer with text (BFCL's setting); required: the grammar forces a call list "
    "in every category except irrelevance, live_irrelevance and live_relevance, which keep auto. "
    "required makes a model that never starts a call under auto comparable. Needs --grammar.",
)
@click.option("--no-speculative", is_flag=True,
              help="One token per forward pass (no jump-forward or drafts), to check that speculation "
              "changes no answer. Results go to their own folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for BFCL_v4_{category}_result.json files (a rerun resumes from them). "
              "Default: ./bfcl-results/<model>-<grammar|free>-<syntax>[-required][-stepwise].")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="BFCL question data (default: bfcl_eval/data in the checker environment).")
@click.option("--checker-env", type=click.Path(file_okay=False), default=None,
              help="Virtual environment holding bfcl-eval (created on first use). "
              "Default: $TOOLGRAD_EDGE_BFCL_ENV, ./benchmarks/bfcl/env, else <cache>/bfcl-env.")
@click.option("--no-create-env", is_flag=True, help="Fail instead of creating a missing checker environment.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Entries run at once: N threads, decoded together by one batched in-process engine (on a "
              "llama-server: in its slots). Result files are the serial run's, in the same order; a batched pass "
              "can flip a greedy near-tie, so a few answers may differ from --parallel 1.")
@n_ctx_option
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None)
@json_option
def bfcl(model, categories, limit, grammar, syntax, tool_choice, no_speculative, out_dir, data_dir, checker_env,
         no_create_env, max_tokens, parallel, n_ctx, n_threads, as_json, engine=None):
    """BFCL v1+v2 single-turn accuracy, scored by BFCL's official AST checker.

    Entries run through the runtime in the ToolGrad prompt format; raw outputs
    are written as BFCL result files and scored by bfcl-eval's ast_checker in a
    separate environment. Prints the seed's table (or one JSON object).

    \b
    Examples:
      toolgrad-edge eval bfcl --model toolgrad-4b-Q4_K_M.gguf
      toolgrad-edge eval bfcl --categories simple_python,irrelevance --limit 20
      toolgrad-edge eval bfcl --limit 10 --no-grammar --out runs/free --json
      toolgrad-edge eval bfcl --categories simple_python,multiple --limit 20 --tool-choice required
      toolgrad-edge eval bfcl --categories simple_python --limit 20 --tool-choice required --no-speculative
      toolgrad-edge eval bfcl --categories simple_python --limit 40 --parallel 4
    """
    from ..evaluate import report
    from ..evaluate.bfcl import evaluate_bfcl

    def log(message: str) -> None:
        click.echo(message, err=True)

    bar = None

    def progress(done: int, total: int, entry) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="BFCL", file=sys.stderr,
                                    show_pos=True, show_eta=True)
            bar.__enter__()
        bar.label = f"BFCL {entry.category:24}"
        bar.update(1)

    try:
        result = evaluate_bfcl(
            model, categories=categories, limit=limit, grammar=grammar, syntax=syntax,
            tool_choice=tool_choice, speculative=not no_speculative, out_dir=out_dir,
            data_dir=data_dir, checker_env_dir=checker_env, create_env=not no_create_env,
            max_tokens=max_tokens, n_ctx=n_ctx, n_threads=n_threads, engine=engine, parallel=parallel,
            progress=progress, log=log,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)

    if as_json:
        click.echo(report.to_json(result))
    else:
        click.echo(report.format_table(result))
        click.echo()
        click.echo(report.format_category_table(result))


@eval_group.command("checker-env")
@click.option("--path", "root", type=click.Path(file_okay=False), default=None,
              help="Where the environment lives (default: $TOOLGRAD_EDGE_BFCL_ENV, else the project's cache).")
def checker_env_cmd(root):
    """Build BFCL's official checker environment once (from PyPI), and print its path.

    `eval bfcl` builds it on first use too; this builds it ahead, e.g. before
    going offline, or for the checker's tests
    (`export TOOLGRAD_EDGE_BFCL_ENV="$(toolgrad-edge eval checker-env)"`).
    A ready environment is only found and printed.
    """
    from ..evaluate.checker_env import ENV_CHECKER, ensure_checker_env

    env = ensure_checker_env(root, log=lambda message: click.echo(message, err=True))
    click.echo(str(env.root))
    click.echo(f"bfcl-eval {env.version}; export {ENV_CHECKER}={env.root}", err=True)
