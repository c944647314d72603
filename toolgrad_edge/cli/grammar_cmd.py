"""``toolgrad-edge grammar``: print the GBNF grammar for a tools file, or a ready request body for a server."""

from __future__ import annotations

import json

import click

from .options import json_option, parallel_option, syntax_option, tool_choice_option, tools_option

# Gemma 3's end-of-turn ids: <eos>=1, <end_of_turn>=106.
GEMMA3_STOP_TOKEN_IDS = [1, 106]
# Markers a text prompt must not carry inside user text: servers parse them as control tokens.
TURN_MARKERS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")


def request_body(engine: str, prompt_text: str, grammar: str, max_tokens: int, served_model: str) -> dict:
    """A completion request carrying ToolGrad's prompt and the tool grammar, for llama-server or vLLM.

    The prompt goes as text without its leading ``<bos>``: both servers add
    the BOS themselves (llama-server for a text prompt, vLLM's tokenizer by
    default), and a second one would change the answer.
    """
    from ..engines.llama_server import NEUTRAL_SAMPLING

    prompt = prompt_text[len("<bos>"):] if prompt_text.startswith("<bos>") else prompt_text
    if engine == "llama-server":  # POST /completion
        return {"prompt": prompt, "grammar": grammar, "n_predict": max_tokens, "temperature": 0.0,
                "top_k": 1, "top_p": 1.0, **NEUTRAL_SAMPLING, "cache_prompt": True,
                "stop": ["<end_of_turn>"], "stream": False}
    # vLLM >= 0.12, POST /v1/completions (OpenAI-compatible; structured_outputs replaced guided_grammar)
    return {"model": served_model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "structured_outputs": {"grammar": grammar}, "stop": ["<end_of_turn>"],
            "stop_token_ids": GEMMA3_STOP_TOKEN_IDS}


@click.command()
@tools_option
@syntax_option
@tool_choice_option
@parallel_option
@click.option("--whitespace", type=click.Choice(["compact", "flexible"]), default="compact", show_default=True,
              help="compact: one space after each comma and each ':' of an object, none elsewhere "
                   "(what ToolGrad writes; fastest); flexible: an optional space at every separator and bracket.")
@click.option("--request", "engine", type=click.Choice(["llama-server", "vllm"]), default=None,
              help="Print a ready JSON request body for this server instead of the bare grammar.")
@click.option("--prompt", "query", default=None, metavar="TEXT", help="The user request (with --request).")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="With --request.")
@click.option("--served-model", default="toolgrad-4b", show_default=True,
              help="vLLM's model name (vllm serve ... --served-model-name), with --request vllm.")
@json_option
def grammar(tools_file: str, syntax: str, tool_choice: str, parallel: bool, whitespace: str, engine: str | None,
            query: str | None, max_tokens: int, served_model: str, as_json: bool) -> None:
    """Print the GBNF grammar that constrains answers to calls of these tools.

    The grammar's root rule is `root`; llama.cpp (and llama-cpp-python's
    `grammar=`) accept it as is. With --request, print a whole request body
    instead: ToolGrad's rendered prompt, the grammar in the field that server
    reads (`grammar` for llama-server's /completion, `structured_outputs.grammar`
    for vLLM's /v1/completions) and the stop tokens. The answer's text is a
    call list that `toolgrad_edge.parse_calls` turns into calls.

    The grammar fixes the layout by default (`[f(a=1, b='x'), g()]`,
    `{"a": 1}`); --whitespace flexible lets the model put one space around
    any separator and inside brackets.

    \b
    Examples:
      toolgrad-edge grammar --tools tools.json
      toolgrad-edge grammar --tools tools.json --syntax json --tool-choice required
      toolgrad-edge grammar --tools tools.json --tool-choice get_weather --no-parallel
      toolgrad-edge grammar --tools tools.json --whitespace flexible
      toolgrad-edge grammar -t tools.json --request llama-server --prompt "Weather in Paris?" \\
          | curl -s http://127.0.0.1:8080/completion -d @-
      toolgrad-edge grammar -t tools.json --request vllm --prompt "Weather in Paris?" \\
          | curl -s http://gpu-box:8000/v1/completions -H 'Content-Type: application/json' -d @-
    """
    from ..grammars import build_grammar, load_tools

    tools = load_tools(tools_file)
    text = build_grammar(tools, syntax=syntax, tool_choice=tool_choice, parallel=parallel, whitespace=whitespace)
    if engine is not None:
        from ..prompt import render_prompt

        if query is None:
            raise click.UsageError("--request needs the user request: --prompt TEXT.")
        parts = render_prompt(query, tools, syntax)
        for segment in parts.prefix + parts.rest:
            found = [m for m in TURN_MARKERS if not segment.control and m in segment.text]
            if found:
                raise click.UsageError(
                    f"the prompt text contains {found[0]}, which a server reading a text prompt would take as a "
                    "control token; send token ids instead (toolgrad-edge call --engine http://HOST:PORT does)."
                )
        click.echo(json.dumps(request_body(engine, parts.text, text, max_tokens, served_model),
                              indent=2, ensure_ascii=False))
        return
    if query is not None:
        raise click.UsageError("--prompt goes with --request llama-server|vllm.")
    if as_json:
        click.echo(json.dumps({
            "syntax": syntax, "tool_choice": tool_choice, "parallel": parallel, "whitespace": whitespace,
            "tools": [t.name for t in tools], "rules": text.count("\n"),
            "bytes": len(text.encode("utf-8")), "grammar": text,
        }, indent=2))
    else:
        click.echo(text, nl=False)
