"""`ask` and `chat`: the assistant, whose tool calls run (MCP servers, Python functions).

Thin wrappers over toolgrad_edge.assistant: options in, events printed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import click

from .options import PROMPT_TEXT, json_option, model_option, tool_choice_option
from .runtime_cmds import _apply, _open_runtime, generation_options, runtime_options
from .stopping import rearm

RESULT_PREVIEW_CHARS = 200

tool_source_options = [
    click.option("--mcp", "mcp_commands", multiple=True, metavar="CMD",
                 help='An MCP server to start, as a command line (repeatable): --mcp "python -m mcp_server_time".'),
    click.option("--mcp-config", type=click.Path(dir_okay=False), default=None,
                 help='A {"mcpServers": {...}} config file, as desktop MCP clients use.'),
    click.option("--functions", "function_refs", multiple=True, metavar="MODULE:ATTR",
                 help="Python functions as tools (repeatable): a function, a list of them, or MODULE alone "
                      "for every @tool function in it."),
    click.option("--tools", "-t", "tool_files", multiple=True, type=click.Path(dir_okay=False),
                 help="A JSON tools file (repeatable); its calls are shown, not run."),
    tool_choice_option,
    click.option("--yes", "-y", is_flag=True, help="Run every call without asking."),
    click.option("--allow", multiple=True, metavar="NAME", help="Run this tool without asking (repeatable)."),
    click.option("--deny", multiple=True, metavar="NAME", help="Never run this tool (repeatable)."),
    click.option("--max-rounds", type=click.IntRange(1), default=4, show_default=True,
                 help="Model turns per question, the final answer included."),
    click.option("--no-followup", is_flag=True,
                 help="Run the calls and print their results, without a second model turn."),
    click.option("--timeout", "call_timeout", type=click.FloatRange(0, min_open=True), default=30.0,
                 show_default=True, help="Seconds one tool call may take."),
]


def load_functions(refs) -> list:
    """Functions from MODULE:ATTR references (a callable or a list), or every @tool function of MODULE."""
    from ..assistant.functions import _MARK
    from ..errors import ToolSourceError

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module next to the user, as `python -m` would find it
    functions = []
    for ref in refs:
        module_name, _, attr = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's
            raise ToolSourceError(f"--functions {ref}: cannot import {module_name!r} "
                                  f"({type(exc).__name__}: {exc}).") from None
        if not attr:
            found = [v for v in vars(module).values() if callable(v) and hasattr(v, _MARK)]
            if not found:
                raise ToolSourceError(f"--functions {ref}: {module_name} has no function marked with @tool; "
                                      "name one as MODULE:FUNCTION.")
            functions += found
            continue
        try:
            value = getattr(module, attr)
        except AttributeError:
            raise ToolSourceError(f"--functions {ref}: {module_name} has no attribute {attr!r}.") from None
        functions += list(value) if isinstance(value, (list, tuple)) else [value]
    return functions


def _short(text: str | None, limit: int = RESULT_PREVIEW_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _call_text(name: str, arguments: dict) -> str:
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    return f"{click.style(name, bold=True)}({args})"


def stdin_is_terminal() -> bool:
    """Whether someone can answer a question (stdin is a terminal)."""
    return sys.stdin.isatty()


def _confirm(entry, call) -> str:
    click.echo(f"Run {_call_text(call.name, call.arguments)} ({entry.source})?", err=True)
    try:
        return click.prompt("[y]es / [n]o / [a]lways for this tool", type=click.Choice(["y", "n", "a"]),
                            default="n", show_choices=False, err=True)
    except click.Abort:
        # Ctrl-C or Ctrl-D at the question: the turn is abandoned (chat goes on, ask stops).
        raise KeyboardInterrupt from None


class Printer:
    """Prints the assistant's events as they happen: calls, results, the model's stats."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, kind: str, payload) -> None:
        if self.quiet:
            return
        if kind == "calls":
            for call in payload:
                click.echo(_call_text(call.name, call.arguments))
        elif kind == "result":
            record = payload
            if record.result is None:
                click.echo(click.style(f"  {record.name}: not run (a JSON tool file has nothing to run it)", dim=True))
            elif not record.approved:
                click.echo(click.style(f"  {record.name}: refused: {_short(record.result)}", fg="yellow"))
            elif record.is_error:
                click.echo(click.style(f"  {record.name}: error: {_short(record.result)}", fg="red"))
            else:
                click.echo(f"  {record.name} -> {_short(record.result)}")


def _build_assistant(mcp_commands, mcp_config, function_refs, tool_files, tool_choice, yes, allow, deny,
                     max_rounds, no_followup, call_timeout, generation, strict, quiet):
    from ..assistant import Assistant, Permissions

    confirm = _confirm if stdin_is_terminal() else None
    permissions = Permissions.of(allow=allow, deny=deny, yes=yes, confirm=confirm)
    assistant = Assistant(
        None, tools=load_functions(function_refs), mcp=list(mcp_commands), mcp_config=mcp_config,
        tool_files=list(tool_files), permissions=permissions, tool_choice=tool_choice, max_rounds=max_rounds,
        followup=not no_followup, timeout=call_timeout, strict=strict, on_event=Printer(quiet), **generation)
    for note in assistant.notes:
        click.echo(f"note: {note}", err=True)
    for warning in assistant.warnings:
        click.echo(f"warning: {warning}", err=True)
    return assistant


def _generation(max_tokens, temperature, seed, no_grammar) -> dict:
    return dict(max_tokens=max_tokens, temperature=temperature, seed=seed, constrained=not no_grammar)


def _print_transcript(transcript) -> None:
    if transcript.answer is not None:
        click.echo(transcript.answer)
    elif transcript.stopped == "max-rounds":
        click.echo(f"warning: no answer after {len(transcript.turns)} model turns (--max-rounds).", err=True)
    elif transcript.stopped == "interrupted":
        click.echo("(tool call abandoned)", err=True)
    if transcript.stopped == "length":
        what = "answer" if transcript.answer is not None else "call list (no call was complete, none ran)"
        click.echo(f"warning: the {what} was cut at --max-tokens.", err=True)
    u = transcript.usage
    click.echo(click.style(
        f"[{u['model_turns']} model turns: {u['prompt_tokens']} prompt tokens ({u['cached_tokens']} cached), "
        f"{u['completion_tokens']} generated; model {u['model_seconds']:.2f}s, tools {u['tool_seconds']:.2f}s]",
        dim=True), err=True)


@click.command()
@click.argument("prompt", type=PROMPT_TEXT)
@model_option
@_apply(tool_source_options)
@json_option
@_apply(generation_options)
@_apply(runtime_options)
def ask(prompt, model, mcp_commands, mcp_config, function_refs, tool_files, tool_choice, yes, allow, deny,
        max_rounds, no_followup, call_timeout, as_json, max_tokens, temperature, seed, no_grammar, n_threads, n_ctx,
        kv_type, swa_full, verbose, engine=None):
    """Answer one question, running the tools the model calls.

    Read-only tools run without asking; other calls need a yes (or --yes, --allow NAME).
    With stdin not a terminal, unconfirmed calls are refused.

    \b
    Examples:
      toolgrad-edge ask "What time is it in Tokyo?" --mcp "python -m mcp_server_time"
      toolgrad-edge ask "Add milk to my list" --functions mytools:add_item --yes
      toolgrad-edge ask "Weather in Paris?" --mcp-config ~/.config/mcp.json --json
    """
    with _build_assistant(mcp_commands, mcp_config, function_refs, tool_files, tool_choice, yes, allow, deny,
                          max_rounds, no_followup, call_timeout,
                          _generation(max_tokens, temperature, seed, no_grammar), strict=True,
                          quiet=as_json) as assistant:
        if not assistant.entries:
            click.echo("warning: no tools: the model answers in text.", err=True)
        with _open_runtime(model, n_threads, n_ctx, verbose, kv_type, swa_full, engine) as rt:
            assistant.runtime = rt
            transcript = assistant.ask(prompt)
    if as_json:
        click.echo(json.dumps(transcript.to_dict(), ensure_ascii=False))
    else:
        _print_transcript(transcript)
    if transcript.stopped == "interrupted":
        sys.exit(130)  # as for any Ctrl-C


@click.command()
@model_option
@_apply(tool_source_options)
@_apply(generation_options)
@_apply(runtime_options)
def chat(model, mcp_commands, mcp_config, function_refs, tool_files, tool_choice, yes, allow, deny, max_rounds,
         no_followup, call_timeout, max_tokens, temperature, seed, no_grammar, n_threads, n_ctx, kv_type, swa_full,
         verbose, engine=None):
    """Interactive assistant: one request per line, with history; tool calls run.

    An MCP server that fails to start is left out with a warning. Ctrl-C while
    a tool runs abandons the call; Ctrl-C at the prompt or Ctrl-D quits.
    /reset clears the history.

    \b
    Examples:
      toolgrad-edge chat --mcp "python -m mcp_server_time"
      toolgrad-edge chat --tools examples/tools.json
    """
    from ..errors import ContextLengthError, GenerationError

    with _build_assistant(mcp_commands, mcp_config, function_refs, tool_files, tool_choice, yes, allow, deny,
                          max_rounds, no_followup, call_timeout,
                          _generation(max_tokens, temperature, seed, no_grammar), strict=False,
                          quiet=False) as assistant:
        with _open_runtime(model, n_threads, n_ctx, verbose, kv_type, swa_full, engine) as rt:
            assistant.runtime = rt
            click.echo(f"Model: {rt.model_path.name} on {rt.backend}. {len(assistant.entries)} tools. "
                       "Ctrl-D to quit.", err=True)
            while True:
                rearm()  # back at the prompt: Ctrl-C quits from here, SIGTERM unwinds (cli/stopping.py)
                try:
                    line = input("> " if sys.stdin.isatty() else "")
                except (EOFError, KeyboardInterrupt):
                    click.echo("", err=True)
                    return
                if not line.strip():
                    continue
                if line.strip() == "/reset":
                    assistant.reset()
                    click.echo("(history cleared)", err=True)
                    continue
                try:
                    transcript = assistant.ask(line)
                except ContextLengthError as exc:
                    click.echo(f"error: {exc} Type /reset to clear the history.", err=True)
                    continue
                except GenerationError as exc:
                    click.echo(f"error: {exc}", err=True)
                    continue
                except KeyboardInterrupt:
                    click.echo("\n(interrupted)", err=True)
                    continue
                _print_transcript(transcript)
