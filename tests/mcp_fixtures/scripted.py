"""A scripted model stand-in: the same call() surface as ToolRuntime, answers given in advance."""

from __future__ import annotations

import sys
from pathlib import Path

from toolgrad_edge.grammars import ToolCall, render_calls
from toolgrad_edge.prompt import render_prompt
from toolgrad_edge.runtime import CallResult, Usage

FIXTURES = Path(__file__).parent
RECORDER = f"{sys.executable} {FIXTURES / 'recorder_server.py'}"
BROKEN = f"{sys.executable} {FIXTURES / 'broken_server.py'}"


class ScriptedModel:
    """Answers each call() with the next scripted answer: a list of (name, arguments) calls, or text.

    Records what it was asked (messages, tool names, tool_choice, the rendered prompt) in `requests`.
    """

    model_path = Path("scripted.gguf")
    backend = "scripted"

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[dict] = []

    def call(self, messages, tools=None, tool_choice="auto", **kwargs) -> CallResult:
        tools = list(tools or [])
        self.requests.append({"messages": [dict(m) for m in messages], "tools": [t.name for t in tools],
                              "tool_choice": tool_choice, "kwargs": kwargs,
                              "prompt": render_prompt(messages, tools).text})
        if not self.answers:
            raise AssertionError("the scripted model ran out of answers")
        answer = self.answers.pop(0)
        if isinstance(answer, CallResult):
            return answer
        if isinstance(answer, str):
            return CallResult([], answer, answer, "stop", Usage(100, 5, 0))
        calls = [ToolCall(name, dict(arguments)) for name, arguments in answer]
        text = render_calls(calls)
        return CallResult(calls, None, text, "tool_calls", Usage(100, 5, 0))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
