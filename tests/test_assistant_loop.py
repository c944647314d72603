"""The assistant's loop with a scripted model: rounds, permissions, faults, history rendering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("docstring_parser")

from mcp_fixtures.scripted import ScriptedModel  # noqa: E402

from toolgrad_edge.assistant import Assistant, Permissions, tool  # noqa: E402
from toolgrad_edge.errors import GenerationError, ToolSourceError  # noqa: E402
from toolgrad_edge.grammars import ToolCall  # noqa: E402

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "tools.json")
CALLS: list[tuple] = []


@tool(read_only=True)
def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather.

    Args:
        city: City name.
        unit: celsius or fahrenheit.
    """
    CALLS.append(("get_weather", city))
    return f"Sunny, 21 C in {city}."


@tool
def send_email(to: str, body: str) -> str:
    """Send an email (a side effect).

    Args:
        to: Recipient.
        body: Text.
    """
    CALLS.append(("send_email", to))
    return f"sent to {to}"


@tool(read_only=True)
def broken(x: int) -> int:
    """Always raises."""
    raise ZeroDivisionError("division by zero in broken")


@tool(read_only=True)
def sleepy(seconds: float) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "awake"


@tool(read_only=True)
async def async_sleepy(seconds: float) -> str:
    """Sleeps without blocking."""
    await asyncio.sleep(seconds)
    return "awake"


MEETING = threading.Barrier(3, timeout=30)


@tool(read_only=True)
def meet() -> str:
    """Returns once three calls are running at the same time."""
    MEETING.wait()
    return "met"


@tool(read_only=True)
async def async_meet() -> str:
    """meet, without blocking the event loop."""
    await asyncio.to_thread(MEETING.wait)
    return "met"


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def make(*answers, **kwargs):
    model = ScriptedModel(*answers)
    kwargs.setdefault("tools", [get_weather, send_email, broken, sleepy, async_sleepy])
    return model, Assistant(model, **kwargs)


def test_two_rounds_the_results_go_back_and_the_model_answers():
    model, assistant = make([("get_weather", {"city": "Paris"})], "It is sunny in Paris.")
    with assistant:
        transcript = assistant.ask("Weather in Paris?")
    assert transcript.answer == "It is sunny in Paris."
    assert transcript.to_dict()["rounds"] == [{"tool_calls": [{
        "name": "get_weather", "arguments": {"city": "Paris"}, "result": "Sunny, 21 C in Paris.",
        "is_error": False, "approved": True}]}]
    assert set(transcript.to_dict()) == {"answer", "rounds", "usage"}
    assert transcript.usage["model_turns"] == 2 and transcript.usage["prompt_tokens"] == 200
    first, second = model.requests
    assert first["tool_choice"] == "auto" and second["tool_choice"] == "auto"
    assert first["tools"] == ["get_weather", "send_email", "broken", "sleepy", "async_sleepy"]
    # Round 2's prompt is round 1's prompt, then the model's own text and the result.
    assert second["prompt"].startswith(first["prompt"] + "[get_weather(city='Paris')]<end_of_turn>\n"
                                       "<start_of_turn>user\nResult of get_weather: Sunny, 21 C in Paris.")
    roles = [m["role"] for m in assistant.history]
    assert roles == ["user", "assistant", "tool", "assistant"]


def test_the_models_own_text_and_tokens_are_kept_for_the_next_prompt():
    model, assistant = make([("get_weather", {"city": "Rome"})], "ok")
    with assistant:
        assistant.ask("Rome?")
    message = assistant.history[1]
    assert message["raw_text"] == "[get_weather(city='Rome')]"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}


def test_no_followup_runs_the_calls_without_a_second_turn():
    model, assistant = make([("get_weather", {"city": "Oslo"})], followup=False)
    with assistant:
        transcript = assistant.ask("Oslo?")
    assert transcript.answer is None and transcript.stopped == "no-followup"
    assert len(model.requests) == 1 and CALLS == [("get_weather", "Oslo")]


def test_max_rounds_and_the_last_turn_must_answer_in_text():
    model, assistant = make([("get_weather", {"city": "A"})], [("get_weather", {"city": "B"})], "done",
                            max_rounds=3, tool_choice="required")
    with assistant:
        transcript = assistant.ask("?")
    assert [r["tool_choice"] for r in model.requests] == ["required", "auto", "none"]
    assert transcript.answer == "done" and len(transcript.rounds) == 2
    model, assistant = make([("get_weather", {"city": "A"})], max_rounds=1)
    with assistant:
        transcript = assistant.ask("?")
    assert transcript.stopped == "max-rounds" and transcript.answer is None


def test_permissions_read_only_runs_others_refused_without_a_terminal():
    model, assistant = make([("get_weather", {"city": "Paris"}), ("send_email", {"to": "a@b", "body": "hi"})], "ok")
    with assistant:
        transcript = assistant.ask("?")
    weather, email = transcript.rounds[0].tool_calls
    assert weather.approved and not email.approved
    assert email.result.startswith("Not run: this call needs the user's confirmation and there is no terminal")
    assert "--allow send_email" in email.result
    assert CALLS == [("get_weather", "Paris")]
    # The refusal reached the model as a tool result.
    assert "Result of send_email: Not run" in model.requests[1]["prompt"]


@pytest.mark.parametrize("permissions, ran, reason", [
    (Permissions.of(yes=True), True, None),
    (Permissions.of(allow=["send_email"]), True, None),
    (Permissions.of(yes=True, deny=["send_email"]), False,
     "The user does not allow send_email (--deny); it was not run."),
    (Permissions.of(confirm=lambda entry, call: "y"), True, None),
    (Permissions.of(confirm=lambda entry, call: "n"), False, "The user refused to run this call."),
])
def test_permission_rules(permissions, ran, reason):
    model, assistant = make([("send_email", {"to": "x@y", "body": "b"})], "ok", permissions=permissions)
    with assistant:
        (record,) = assistant.ask("?").rounds[0].tool_calls
    assert record.approved is ran
    assert (CALLS == [("send_email", "x@y")]) is ran
    if reason:
        assert record.result == reason and not record.is_error


def test_always_asks_once_per_tool_and_deny_beats_read_only():
    asked = []

    def confirm(entry, call):
        asked.append(call.arguments["to"])
        return "a"

    calls = [("send_email", {"to": "1", "body": ""}), ("send_email", {"to": "2", "body": ""})]
    model, assistant = make(calls, "ok", calls, "ok", permissions=Permissions.of(confirm=confirm))
    with assistant:
        assistant.ask("?")
        assistant.ask("again")
    assert asked == ["1"] and [c[1] for c in CALLS] == ["1", "2", "1", "2"]
    CALLS.clear()
    model, assistant = make([("get_weather", {"city": "X"})], "ok", permissions=Permissions.of(deny=["get_weather"]))
    with assistant:
        (record,) = assistant.ask("?").rounds[0].tool_calls
    assert not record.approved and CALLS == []


def test_a_raising_tool_gives_its_exception_as_the_result():
    model, assistant = make([("broken", {"x": 1}), ("get_weather", {"city": "Paris"})], "ok")
    with assistant:
        broken_call, weather = assistant.ask("?").rounds[0].tool_calls
    assert broken_call.is_error and broken_call.approved
    assert broken_call.result == "broken raised ZeroDivisionError: division by zero in broken"
    assert weather.result == "Sunny, 21 C in Paris."


def test_invalid_arguments_are_an_error_result():
    model, assistant = make([("get_weather", {"city": 3})], "ok")
    with assistant:
        (record,) = assistant.ask("?").rounds[0].tool_calls
    assert record.is_error and record.result.startswith("invalid arguments for get_weather: city:")
    assert CALLS == []


def test_calls_run_concurrently_with_a_timeout():
    model, assistant = make([("meet", {}), ("async_meet", {}), ("meet", {})], "ok", tools=[meet, async_meet])
    with assistant:
        records = assistant.ask("?").rounds[0].tool_calls
    assert [r.result for r in records] == ["met"] * 3  # run one after another, the first would wait alone
    model, assistant = make([("sleepy", {"seconds": 60}), ("async_sleepy", {"seconds": 60})], "ok", timeout=0.3)
    with assistant:
        t0 = time.perf_counter()
        records = assistant.ask("?").rounds[0].tool_calls
        assert time.perf_counter() - t0 < 10  # about 0.3 s; the abandoned calls run on for a minute
    assert [r.result for r in records] == ["sleepy timed out after 0.3 s.", "async_sleepy timed out after 0.3 s."]
    assert all(r.is_error for r in records)


def test_json_tool_file_calls_are_shown_not_run():
    model, assistant = make([("get_weather", {"city": "Paris"})], tools=[], tool_files=[EXAMPLES])
    with assistant:
        transcript = assistant.ask("?")
    (record,) = transcript.rounds[0].tool_calls
    assert record.result is None and not record.approved and not record.is_error
    assert transcript.stopped == "not-run" and len(model.requests) == 1
    assert CALLS == []


def test_unknown_tool_in_an_unconstrained_answer():
    model, assistant = make([("fly", {})], "ok")
    with assistant:
        (record,) = assistant.ask("?").rounds[0].tool_calls
    assert record.is_error and record.result == "unknown tool 'fly'; it was not run."


class Node(__import__("pydantic").BaseModel):
    label: str
    next: "Node | None" = None


def test_a_tool_whose_schema_does_not_compile_is_skipped_with_a_warning():
    def walk(start: Node) -> str:
        """A recursive type: no finite grammar describes it."""
        return start.label

    model, assistant = make("fine", tools=[walk, get_weather])
    with assistant:
        assert [e.name for e in assistant.entries] == ["get_weather"]
        (warning,) = assistant.warnings
        assert warning.startswith("tool 'walk' (python) skipped: ") and "recursive $ref" in warning
        assert assistant.ask("?").answer == "fine"


def test_a_failed_model_turn_leaves_the_history_as_it_was():
    class Failing(ScriptedModel):
        def call(self, *args, **kwargs):
            raise GenerationError("the prompt is too long")

    assistant = Assistant(Failing(), tools=[get_weather])
    with assistant, pytest.raises(GenerationError):
        assistant.ask("?")
    assert assistant.history == []


def test_chat_history_carries_over_and_reset_clears_it():
    model, assistant = make("hello", [("get_weather", {"city": "Rome"})], "sunny")
    with assistant:
        assistant.ask("hi")
        assistant.ask("and Rome?")
        assert model.requests[1]["prompt"].count("<start_of_turn>user") == 2
        assistant.reset()
        assert assistant.history == []


@contextlib.contextmanager
def _restored_sigint(handler):
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def test_ctrl_c_while_a_tool_runs_abandons_the_call():
    quick_done = threading.Event()

    @tool(read_only=True)
    async def quick_weather(city: str) -> str:
        """Current weather, at once."""
        quick_done.set()
        return f"Sunny, 21 C in {city}."

    @tool(read_only=True)
    async def press_ctrl_c() -> str:
        """Interrupts the process once the other call has finished, then hangs."""
        while not quick_done.is_set():
            await asyncio.sleep(0.01)
        for _ in range(10):  # the other call's completion callbacks run on this loop first, however loaded
            await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)
        return "never"

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    # A process started in the background by a non-interactive shell (CI's `cmd &`) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: give it the one a terminal user has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    model, assistant = make([("press_ctrl_c", {}), ("quick_weather", {"city": "A"})],
                            tools=[press_ctrl_c, quick_weather])
    with assistant, _restored_sigint(previous):
        t0 = time.perf_counter()
        transcript = assistant.ask("?")
        assert time.perf_counter() - t0 < 25  # not the hung tool's 30 s
        assert transcript.stopped == "interrupted" and transcript.answer is None
        hung, quick = transcript.rounds[0].tool_calls
        assert hung.result == "Abandoned: the user interrupted the call (Ctrl-C)." and hung.is_error
        assert quick.result == "Sunny, 21 C in A."  # a call that had finished keeps its result
        # The session goes on.
        model.answers.append("still here")
        assert assistant.ask("next").answer == "still here"


def test_bad_settings_and_missing_sources():
    with pytest.raises(ToolSourceError, match="max_rounds must be at least 1"):
        Assistant(ScriptedModel(), max_rounds=0)
    with pytest.raises(ToolSourceError, match="cannot read the MCP config file"):
        Assistant(ScriptedModel(), mcp_config="/nonexistent/mcp.json")


def test_async_context_manager():
    async def main():
        async with Assistant(ScriptedModel("hi"), tools=[get_weather]) as assistant:
            return await asyncio.get_running_loop().run_in_executor(None, assistant.ask, "?")

    assert asyncio.run(main()).answer == "hi"


def test_transcript_json_round_trips():
    model, assistant = make([("get_weather", {"city": "Paris"})], "ok")
    with assistant:
        data = json.loads(json.dumps(assistant.ask("?").to_dict()))
    assert set(data["usage"]) >= {"prompt_tokens", "completion_tokens", "cached_tokens", "model_turns"}
    assert data["rounds"][0]["tool_calls"][0]["approved"] is True
    _ = ToolCall  # the public call type the scripted model answers with


def test_a_missing_extra_is_one_line_naming_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mcp", None)
    with pytest.raises(ToolSourceError, match=r"^MCP servers need the MCP SDK: pip install 'toolgrad-edge\[mcp\]'$"):
        Assistant(ScriptedModel(), mcp=["python -m mcp_server_time"])
    monkeypatch.setitem(sys.modules, "pydantic", None)
    with pytest.raises(ToolSourceError, match=r"pip install 'toolgrad-edge\[functions\]'$"):
        Assistant(ScriptedModel(), tools=[lambda x: x])


def test_importing_the_assistant_loads_no_optional_dependency():
    import subprocess
    import sys

    code = ("import sys, toolgrad_edge.assistant, toolgrad_edge.cli.assistant_cmds; "
            "print(sorted(m for m in ('mcp', 'pydantic', 'docstring_parser', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_call_list_cut_at_max_tokens_is_neither_answer_nor_call():
    from toolgrad_edge.runtime import CallResult, Usage

    cut = CallResult([], "[get_weather(city='Par", "[get_weather(city='Par", "length", Usage(100, 64, 0),
                     parse_error="unterminated string")
    model, assistant = make(cut, tool_choice="required")
    with assistant:
        transcript = assistant.ask("?")
    assert transcript.answer is None and transcript.stopped == "length" and transcript.rounds == []
    assert CALLS == []
