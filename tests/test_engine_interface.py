"""A back-end is one class behind EngineRequest -> text pieces, Generation; ToolRuntime never asks which.

The engine here answers from a script instead of a model: everything the
runtime does around it (rendering, the grammar in the engine's format, stop
strings, parsing, closing) is the same as for the real engines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toolgrad_edge.engines import EngineDescription, EngineRequest, Generation
from toolgrad_edge.engines.base import compile_calls
from toolgrad_edge.errors import GenerationError
from toolgrad_edge.results import Usage
from toolgrad_edge.runtime import CallDone, Decoded, Final, TextDelta, ToolRuntime

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

    def describe(self) -> EngineDescription:
        return EngineDescription(model_name=self.model_name, model_path=self.model_path, backend=self.backend,
                                 n_ctx=self.n_ctx, grammar_engine=self.grammar_engine,
                                 grammar_format=self.grammar_format, max_tools=None, concurrency=1, speculative=False)

    def compile_calls(self, tools, **options):
        return compile_calls(self.grammar_format, tools, **options)  # no tool limit: no GBNF sampler here

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
    assert request.grammar.startswith("root ::= calls")
    assert all(name in request.grammar for name in ("get_weather", "get_time", "send_message"))
    assert "get_weather" in "".join(seg.text for seg in request.prompt.prefix)
    assert engine.closed  # the runtime closes its engine


def test_stop_strings_and_closing_work_the_same_over_any_engine():
    engine = ScriptedEngine("Hello there. General Kenobi.")
    rt = ToolRuntime(engine=engine)
    items = list(rt.stream("Say hello", None, stop=["General"]))
    assert isinstance(items[-1], Final) and items[-1].result.content == "Hello there. "
    assert "".join(e.text for e in items if isinstance(e, TextDelta)) == "Hello there. "
    rt.close()
    with pytest.raises(GenerationError, match="is closed"):
        rt.call("Say hello")
    with pytest.raises(GenerationError, match="no model session"):
        rt.session


class PiecewiseEngine(ScriptedEngine):
    """The scripted engine, giving its answer out two characters at a time, as a decoder does."""

    def execute(self, request: EngineRequest):
        self.requests.append(request)
        for i in range(0, len(self.answer), 2):
            yield self.answer[i:i + 2]
        yield Generation(self.answer, "stop")


def test_stream_events_are_parsed_once_and_the_final_result_is_the_calls_result():
    answer = '[get_weather(city="Paris"), get_time(timezone="Europe/Paris")]'
    with ToolRuntime(engine=PiecewiseEngine(answer)) as rt:
        whole = rt.call("Weather and time in Paris?", TOOLS, tool_choice="required")
        events = list(rt.stream("Weather and time in Paris?", TOOLS, tool_choice="required"))
    decoded = [e.text for e in events if isinstance(e, Decoded)]
    calls = [e for e in events if isinstance(e, CallDone)]
    assert "".join(decoded) == answer == whole.raw_text and len(decoded) > 1  # the model's text, as decoded
    assert [(c.index, c.call) for c in calls] == list(enumerate(whole.tool_calls))
    # Each call goes out as soon as its closing bracket is decoded, before the answer ends.
    first_call = events.index(calls[0])
    assert any(isinstance(e, Decoded) for e in events[first_call:])
    assert not any(isinstance(e, TextDelta) for e in events)
    assert isinstance(events[-1], Final) and events[-1].result.tool_calls == whole.tool_calls


def test_the_engine_says_what_it_is_and_compiles_the_tools_once():
    engine = ScriptedEngine("Hi")
    with ToolRuntime(engine=engine) as rt:
        assert rt.describe().grammar_format == "gbnf" and rt.describe().concurrency == 1
        compiled = rt.compile_tools(TOOLS, "required")
        rt.call("Weather?", compiled, tool_choice="required")
        assert engine.requests[-1].grammar is compiled.grammar  # the request decodes with that very grammar
        with pytest.raises(Exception, match="compiled for"):
            rt.call("Weather?", compiled, tool_choice="auto")
