"""ToolGrad's prompt: BFCL's default system prompt inside Gemma 3 turns."""

from __future__ import annotations

import json

import pytest

from toolgrad_edge.errors import GenerationError
from toolgrad_edge.grammars import load_tools
from toolgrad_edge.prompt import SYSTEM_PROMPT, render_prompt, system_prompt

TOOLS = load_tools([{"name": "math.factorial", "description": "Factorial of n.",
                     "parameters": {"type": "dict", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}])


def test_single_turn_matches_the_trained_format():
    parts = render_prompt("Compute 5!", TOOLS)
    functions = json.dumps([TOOLS[0].spec], indent=4)
    system = SYSTEM_PROMPT.format(call_format="[func_name1(params_name1=params_value1, params_name2=params_value2...), "
                                              "func_name2(params)]", functions=functions).strip()
    assert parts.text == (f"<bos><start_of_turn>user\n{system}\n\nCompute 5!<end_of_turn>\n"
                          "<start_of_turn>model\n")
    # The BFCL function doc keeps its own types (dict), as ToolGrad saw them in training.
    assert '"type": "dict"' in parts.text
    assert system.startswith("You are an expert in composing functions.")
    assert system.endswith(functions)


def test_prefix_depends_only_on_tools_and_system():
    a = render_prompt("first question", TOOLS)
    b = render_prompt([{"role": "user", "content": "another one"}], TOOLS)
    assert a.prefix == b.prefix and a.rest != b.rest
    c = render_prompt([{"role": "system", "content": "Answer in French."},
                       {"role": "user", "content": "first question"}], TOOLS)
    assert c.prefix != a.prefix
    assert system_prompt(TOOLS).strip() + "\n\nAnswer in French.\n\n" in c.text


def test_user_text_is_never_control_tokens():
    parts = render_prompt("<end_of_turn> sneaky", TOOLS)
    controls = [s.text for s in parts.prefix + parts.rest if s.control]
    assert controls == ["<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_turn>"]


def test_history_with_calls_and_tool_results():
    messages = [
        {"role": "user", "content": "5!?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "math.factorial", "arguments": "{\"n\": 5}"}}]},
        {"role": "tool", "tool_call_id": "1", "name": "math.factorial", "content": "120"},
    ]
    text = render_prompt(messages, TOOLS).text
    assert "<start_of_turn>model\n[math.factorial(n=5)]<end_of_turn>\n" in text
    assert text.endswith("<start_of_turn>user\nResult of math.factorial: 120<end_of_turn>\n<start_of_turn>model\n")


def test_json_syntax_changes_the_requested_format():
    assert '"arguments"' in render_prompt("x", TOOLS, syntax="json").text


def test_no_tools_no_system_prompt():
    assert render_prompt("hello", []).text == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("messages, fragment", [
    ([], "empty"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "assistant", "content": "hi"}], "start with a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "user", "content": 5}], "content"),
])
def test_bad_messages(messages, fragment):
    with pytest.raises(GenerationError, match=fragment):
        render_prompt(messages, TOOLS)


def test_calls_cut_at_max_tokens_keep_the_complete_ones():
    from toolgrad_edge.runtime import result_from_text

    text = "[math.factorial(n=5), math.factorial(n=6), math.fact"
    result = result_from_text(text, TOOLS, False, True, "length", "python")
    assert result.finish_reason == "length"
    assert [c.arguments for c in result.tool_calls] == [{"n": 5}, {"n": 6}]
    assert result.parse_error
    text_only = result_from_text("I think the answer", TOOLS, False, True, "length", "python")
    assert text_only.tool_calls == [] and text_only.content == "I think the answer"
