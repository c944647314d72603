"""The assistant on the real Gemma 3 270M GGUF: mixed tool sources, and round 2 starting from round 1's KV cache."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mcp")
pytest.importorskip("pydantic")

from mcp_fixtures.scripted import RECORDER  # noqa: E402

from toolgrad_edge.assistant import Assistant, Permissions, tool  # noqa: E402


@tool(read_only=True)
def get_weather(city: str) -> str:
    """Current weather of a city.

    Args:
        city: The city name.
    """
    return f"Sunny, 21 C in {city}."


@pytest.mark.slow
def test_two_rounds_reuse_the_kv_cache_with_mixed_sources(gemma_270m_gguf, tmp_path, monkeypatch):
    from toolgrad_edge.runtime import ToolRuntime

    record_file = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RECORD_FILE", str(record_file))
    with ToolRuntime(gemma_270m_gguf, n_threads=2) as rt, \
            Assistant(rt, tools=[get_weather], mcp=[RECORDER], tool_choice="record", max_rounds=2,
                      permissions=Permissions.of(allow=["record"]), max_tokens=40) as assistant:
        assert {"get_weather", "record", "lookup"} <= {e.name for e in assistant.entries}
        transcript = assistant.ask("Record the forecast for Paris in celsius for 3 days.")
    first, second = transcript.turns
    (call,) = transcript.rounds[0].tool_calls[:1]
    assert call.name == "record" and call.approved and not call.is_error
    received = json.loads(record_file.read_text().splitlines()[0])
    assert set(received) == {"city", "unit", "days"} and received["unit"] in ("celsius", "fahrenheit")
    # Round 2 starts from the tool prefix round 1 left in the KV cache and evaluates the rest of its
    # prompt (round 1's query and answer, the tool results) after it, as a fresh runtime would, so that
    # its tokens do not depend on what the KV cache held (docs/runtime.md, "One answer per request").
    assert 0 < second.cached_tokens < first.prompt_tokens
