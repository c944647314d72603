"""`ask` and `chat` through click's CliRunner (stdin is not a terminal there), with a scripted model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

pytest.importorskip("mcp")
pytest.importorskip("pydantic")

from mcp_fixtures.scripted import BROKEN, RECORDER, ScriptedModel  # noqa: E402

from toolgrad_edge.cli import main  # noqa: E402

pytestmark = pytest.mark.server  # most tests start MCP servers (tests/conftest.py: the tiers)

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "tools.json")


@pytest.fixture
def scripted(monkeypatch):
    """Replace the model the commands open with a scripted one; returns the answers list to fill."""
    model = ScriptedModel()
    opened = []

    def open_runtime(*args, **kwargs):
        opened.append(args)
        return model

    monkeypatch.setattr("toolgrad_edge.cli.assistant_cmds._open_runtime", open_runtime)
    model.opened = opened
    return model


@pytest.fixture
def record_file(tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RECORD_FILE", str(path))
    return path


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_ask_json_shape_with_yes(scripted, record_file):
    scripted.answers += [[("record", {"city": "Paris", "days": 2}), ("lookup", {"key": "k"})], "Recorded."]
    result = run("ask", "Record Paris", "--mcp", RECORDER, "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"answer", "rounds", "usage"}
    assert report["answer"] == "Recorded."
    assert report["rounds"] == [{"tool_calls": [
        {"name": "record", "arguments": {"city": "Paris", "days": 2}, "result": "recorded Paris",
         "is_error": False, "approved": True},
        {"name": "lookup", "arguments": {"key": "k"}, "result": "value of k", "is_error": False, "approved": True},
    ]}]
    assert report["usage"]["model_turns"] == 2
    assert json.loads(record_file.read_text()) == {"city": "Paris", "unit": "celsius", "days": 2}


def test_ask_refuses_unconfirmed_calls_without_a_terminal(scripted, record_file):
    scripted.answers += [[("record", {"city": "Paris"}), ("lookup", {"key": "k"})], "I could not record it."]
    result = run("ask", "Record Paris", "--mcp", RECORDER, "--json")
    assert result.exit_code == 0, result.output
    record, lookup = json.loads(result.stdout)["rounds"][0]["tool_calls"]
    assert not record["approved"] and record["result"].startswith("Not run: this call needs the user's confirmation")
    assert lookup["approved"]  # read-only: no need to ask
    assert not record_file.exists()


def test_allow_and_deny(scripted, record_file):
    scripted.answers += [[("record", {"city": "Rome"}), ("lookup", {"key": "k"})], "ok"]
    result = run("ask", "?", "--mcp", RECORDER, "--allow", "record", "--deny", "lookup", "--json")
    record, lookup = json.loads(result.stdout)["rounds"][0]["tool_calls"]
    assert record["approved"] and not lookup["approved"]
    assert lookup["result"] == "The user does not allow lookup (--deny); it was not run."


def test_ask_prints_calls_results_and_the_answer(scripted, record_file):
    scripted.answers += [[("lookup", {"key": "k"}), ("huge", {"size": 5000})], "The value is k."]
    result = run("ask", "?", "--mcp", RECORDER)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == 'lookup(key="k")' and lines[1] == "huge(size=5000)"
    assert lines[2] == "  lookup -> value of k"
    assert lines[3].startswith("  huge -> xxx") and len(lines[3]) < 220
    assert lines[-1] == "The value is k."
    assert "2 model turns" in result.stderr


def test_a_failing_server_stops_ask_before_the_model_loads(scripted):
    result = run("ask", "?", "--mcp", BROKEN)
    assert result.exit_code == 1
    assert f"MCP server 'broken_server' failed to start: {BROKEN}" in result.stderr
    assert "cannot open database /nonexistent/db.sqlite" in result.stderr
    assert "Traceback" not in result.output and scripted.opened == []


def test_no_followup_and_max_rounds(scripted, record_file):
    scripted.answers += [[("lookup", {"key": "k"})]]
    result = run("ask", "?", "--mcp", RECORDER, "--no-followup", "--json")
    report = json.loads(result.stdout)
    assert report["answer"] is None and report["rounds"][0]["tool_calls"][0]["result"] == "value of k"
    assert len(scripted.requests) == 1
    scripted.answers += [[("lookup", {"key": "a"})], "final"]
    result = run("ask", "?", "--mcp", RECORDER, "--max-rounds", "2", "--tool-choice", "required", "--json")
    assert json.loads(result.stdout)["answer"] == "final"
    assert [r["tool_choice"] for r in scripted.requests[1:]] == ["required", "none"]


def test_functions_option(scripted, tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(
        "from toolgrad_edge.assistant import tool\n\n"
        "@tool(read_only=True)\n"
        "def add(a: int, b: int) -> int:\n"
        "    '''Add.\n\n    Args:\n        a: First.\n        b: Second.\n    '''\n"
        "    return a + b\n\n"
        "def shout(text: str) -> str:\n    '''Upper-case.'''\n    return text.upper()\n\n"
        "ALL = [add, shout]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    scripted.answers += [[("add", {"a": 2, "b": 3}), ("shout", {"text": "hi"})], "5"]
    result = run("ask", "?", "--functions", "my_tools:ALL", "--json")
    add, shout = json.loads(result.stdout)["rounds"][0]["tool_calls"]
    assert (add["result"], add["approved"]) == ("5", True)
    assert not shout["approved"]  # not read-only and nobody to ask
    scripted.answers += ["no calls"]
    result = run("ask", "?", "--functions", "my_tools", "--json")
    assert scripted.requests[-1]["tools"] == ["add"]  # MODULE alone: its @tool functions
    for ref, message in [("no_such_module_xyz", "cannot import 'no_such_module_xyz'"),
                         ("my_tools:missing", "my_tools has no attribute 'missing'")]:
        result = run("ask", "?", "--functions", ref)
        assert result.exit_code == 1 and message in result.stderr


def test_json_tool_files_are_shown_not_run(scripted):
    scripted.answers += [[("get_weather", {"city": "Paris"})]]
    result = run("ask", "?", "--tools", EXAMPLES)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ['get_weather(city="Paris")',
                                              "  get_weather: not run (a JSON tool file has nothing to run it)"]


def test_chat_warns_about_a_failing_server_and_goes_on(scripted, record_file):
    scripted.answers += [[("lookup", {"key": "k"})], "It is k.", "Bye."]
    result = run("chat", "--mcp", BROKEN, "--mcp", RECORDER, input="What is k?\n/reset\nThanks\n")
    assert result.exit_code == 0, result.output
    assert "warning: MCP server 'broken_server' failed to start" in result.stderr
    assert "Going on without it." in result.stderr
    assert result.stdout.splitlines() == ['lookup(key="k")', "  lookup -> value of k", "It is k.", "Bye."]
    assert "(history cleared)" in result.stderr
    # After /reset the last request holds only the new question.
    assert [m["role"] for m in scripted.requests[-1]["messages"]] == ["user"]


@pytest.mark.slow
def test_ask_end_to_end_on_the_demo_model(gemma_270m_gguf, record_file, tmp_path, monkeypatch):
    """The real 270M model under --tool-choice required calls a real MCP server with schema-valid arguments."""
    call_log = tmp_path / "call_log.jsonl"
    monkeypatch.setenv("CALL_LOG", str(call_log))
    result = run("ask", "Record the forecast for Paris in celsius for 3 days.", "--mcp", RECORDER,
                 "--tool-choice", "required", "--yes", "--no-followup", "--json", "--timeout", "5",
                 "-m", str(gemma_270m_gguf), "--max-tokens", "48", "--threads", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    calls = report["rounds"][0]["tool_calls"]
    assert calls and all(c["approved"] for c in calls)
    # What the model sent is valid for each tool's input schema, as the server lists it ...
    from toolgrad_edge.assistant import Assistant

    with Assistant(ScriptedModel(), mcp=[RECORDER]) as lister:
        schemas = {e.name: e.spec["parameters"] for e in lister.entries}
    for call in calls:
        jsonschema.validate(call["arguments"], schemas[call["name"]])
    # ... and the server received those calls.
    received = [json.loads(line) for line in call_log.read_text().splitlines()]
    assert [r["tool"] for r in received] == [c["name"] for c in calls]
    for got, sent in zip(received, calls):
        assert {k: got["arguments"][k] for k in sent["arguments"]} == sent["arguments"]
    assert report["usage"]["model_turns"] == 1


def test_the_question_on_a_terminal(scripted, record_file, monkeypatch):
    """With stdin a terminal, a call with side effects is shown and needs a yes."""
    monkeypatch.setattr("toolgrad_edge.cli.assistant_cmds.stdin_is_terminal", lambda: True)
    scripted.answers += [[("record", {"city": "Oslo"})], "Done.", [("record", {"city": "Rome"})], "No."]
    result = CliRunner().invoke(main, ["ask", "?", "--mcp", RECORDER, "--json"], input="y\n")
    assert result.exit_code == 0, result.output
    assert 'Run record(city="Oslo") (recorder_server)?' in result.stderr
    assert "[y]es / [n]o / [a]lways for this tool" in result.stderr
    assert json.loads(result.stdout)["rounds"][0]["tool_calls"][0]["approved"] is True
    result = CliRunner().invoke(main, ["ask", "?", "--mcp", RECORDER, "--json"], input="n\n")
    assert json.loads(result.stdout)["rounds"][0]["tool_calls"][0]["result"] == "The user refused to run this call."
    assert [json.loads(line)["city"] for line in record_file.read_text().splitlines()] == ["Oslo"]


def test_ctrl_c_while_a_tool_runs(scripted, tmp_path, monkeypatch):
    (tmp_path / "hang_tools.py").write_text(
        "import os, signal, time\nfrom toolgrad_edge.assistant import tool\n\n"
        "@tool(read_only=True)\ndef hang() -> str:\n    '''Hangs after pressing Ctrl-C.'''\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n    return 'never'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scripted.answers += [[("hang", {})]]
    t0 = time.perf_counter()
    result = run("ask", "?", "--functions", "hang_tools:hang", "--json")
    assert time.perf_counter() - t0 < 15
    assert result.exit_code == 130
    (call,) = json.loads(result.stdout)["rounds"][0]["tool_calls"]
    assert call["result"] == "Abandoned: the user interrupted the call (Ctrl-C)." and call["is_error"]


def test_a_prompt_that_is_not_utf8_is_refused(scripted):
    result = run("ask", "caf\udce9")
    assert result.exit_code == 2 and "is not valid UTF-8 text" in result.output
