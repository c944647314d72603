"""``toolgrad-edge grammar``: print the GBNF grammar for a tools file."""

from __future__ import annotations

import json

import click

from .options import json_option, parallel_option, syntax_option, tool_choice_option, tools_option


@click.command()
@tools_option
@syntax_option
@tool_choice_option
@parallel_option
@json_option
def grammar(tools_file: str, syntax: str, tool_choice: str, parallel: bool, as_json: bool) -> None:
    """Print the GBNF grammar that constrains answers to calls of these tools.

    The grammar's root rule is `root`; llama.cpp (and llama-cpp-python's
    `grammar=`) accept it as is.

    \b
    Examples:
      toolgrad-edge grammar --tools tools.json
      toolgrad-edge grammar --tools tools.json --syntax json --tool-choice required
      toolgrad-edge grammar --tools tools.json --tool-choice get_weather --no-parallel
    """
    from ..grammars import build_grammar, load_tools

    tools = load_tools(tools_file)
    text = build_grammar(tools, syntax=syntax, tool_choice=tool_choice, parallel=parallel)
    if as_json:
        click.echo(json.dumps({
            "syntax": syntax, "tool_choice": tool_choice, "parallel": parallel,
            "tools": [t.name for t in tools], "rules": text.count("\n"),
            "bytes": len(text.encode("utf-8")), "grammar": text,
        }, indent=2))
    else:
        click.echo(text, nl=False)
