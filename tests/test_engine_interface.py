"""A back-end is one class behind EngineRequest -> text pieces, Generation; ToolRuntime never asks which.

The engine here answers from a script instead of a model: everything the
runtime does around it (rendering, the grammar in the engine's format, stop
strings, parsing, closing) is the same as for the real engines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toolgrad_edge.engines import EngineRequest, Generation
from toolgrad_edge.errors import GenerationError
from toolgrad_edge.results import Usage
from toolgrad_edge.runtime import CallResult, ToolRuntime

TOOLS = str(Path(__file__).resolve().parents[1] / "examples" / "tools.json")


class ScriptedEngine:
    """An Engine in 30 lines: it 'decodes' a fixed answer, two characters at a time."""

    model_path = Path("scripted")
    model_name = backend = "scripted"
    n_ctx = 4096
    grammar_engine = "scripted"
    grammar_format = "gbnf"
    speculative = False
    concurrency = 1

    def __init__(self, answer: str):
        self.answer = answer
        self.requests: list[EngineRequest] = []
        self.closed = False

    @property
    def session(self):
        raise GenerationError("a scripted engine has no model session.")

    def clear_kv_cache(self) -> None:
        pass

    def tokenize_segments(self, segments) -> list[int]:
        return [len(seg.text) for seg in segments]  # one "token" per segment

    def execute(self, request: EngineRequest):
        if self.closed:
            raise GenerationError("this ToolRuntime is closed.")
        self.requests.append(request)
        text = ""
        for i in range(0, len(self.answer), 2):
            text += self.answer[i:i + 2]
            cut = request.stop.find(text, 0)
            if cut is not None:
                text = text[:cut]
                break
        yield text
        yield Generation(text, "stop", usage=Usage(prompt_tokens=7, completion_tokens=len(text)))

    def close(self) -> None:
        self.closed = True


def test_a_new_engine_is_one_class_the_runtime_takes_as_it_is():
    engine = ScriptedEngine('[get_weather(city="Paris")]')
    with ToolRuntime(engine=engine) as rt:
        assert rt.engine is engine and rt.backend == "scripted" and rt.concurrency == 1
        result = rt.call("Weather in Paris?", TOOLS, tool_choice="required")
        (request,) = engine.requests
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert result.finish_reason == "tool_calls" and result.usage.prompt_tokens == 7
    # The runtime built the call grammar in the engine's format, and the prompt with the tools.
    assert request.grammar.startswith("root ::= calls") and request.n_tools == 3
    assert "get_weather" in "".join(seg.text for seg in request.prompt.prefix)
    assert engine.closed  # the runtime closes its engine


def test_stop_strings_and_closing_work_the_same_over_any_engine():
    engine = ScriptedEngine("Hello there. General Kenobi.")
    rt = ToolRuntime(engine=engine)
    items = list(rt.stream("Say hello", None, stop=["General"]))
    assert isinstance(items[-1], CallResult) and items[-1].content == "Hello there. "
    rt.close()
    with pytest.raises(GenerationError, match="is closed"):
        rt.call("Say hello")
    with pytest.raises(GenerationError, match="no model session"):
        rt.session
