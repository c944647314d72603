"""The conversation rendering the assistant relies on: the model's own text and tokens kept as they were."""

from __future__ import annotations

from toolgrad_edge.grammars import load_tools
from toolgrad_edge.prompt import Segment, render_prompt

TOOLS = load_tools([{"name": "get_weather", "description": "Weather.",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])


def _history(**assistant):
    return [{"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": None, **assistant},
            {"role": "tool", "name": "get_weather", "content": "Sunny"}]


def test_raw_text_is_rendered_unchanged_instead_of_the_canonical_calls():
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    canonical = render_prompt(_history(tool_calls=calls), TOOLS).text
    raw = render_prompt(_history(tool_calls=calls, raw_text='[ get_weather(city="Paris")]'), TOOLS).text
    assert "<start_of_turn>model\n[get_weather(city='Paris')]<end_of_turn>" in canonical
    assert '<start_of_turn>model\n[ get_weather(city="Paris")]<end_of_turn>' in raw


def test_raw_tokens_travel_with_the_raw_text():
    parts = render_prompt(_history(raw_text="[x()]", raw_tokens=[236840, 236781, 825]), TOOLS)
    (answer,) = [s for s in parts.rest if s.text == "[x()]"]
    assert answer == Segment("[x()]", tokens=(236840, 236781, 825))
    # Tokens without their text, or not token ids, are ignored.
    for bad in ({"raw_tokens": [1, 2]}, {"raw_text": "[x()]", "raw_tokens": ["a"]},
                {"raw_text": "[x()]", "raw_tokens": [True]}):
        parts = render_prompt(_history(content="[x()]", **bad), TOOLS)
        assert all(s.tokens is None for s in parts.rest)
