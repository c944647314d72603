"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

model_option = click.option(
    "--model", "-m", "model", type=click.Path(dir_okay=False), default=None,
    help="GGUF file. Default: $TOOLGRAD_EDGE_MODEL, a ToolGrad GGUF in the cache, else Gemma 3 270M.",
)
tools_option = click.option(
    "--tools", "-t", "tools_file", type=click.Path(dir_okay=False), required=True,
    help="JSON file with a list of tools (OpenAI or BFCL function format).",
)
tool_choice_option = click.option(
    "--tool-choice", default="auto", show_default=True, metavar="auto|required|none|NAME",
    help="auto: calls or text; required: at least one call; none: text only; NAME: only that tool.",
)
parallel_option = click.option(
    "--parallel/--no-parallel", default=True, show_default=True,
    help="Allow several calls in one answer.",
)
syntax_option = click.option(
    "--syntax", type=click.Choice(["python", "json"]), default="python", show_default=True,
    help="Call syntax the model writes: ToolGrad's python call list, or JSON.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
