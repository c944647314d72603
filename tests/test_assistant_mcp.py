"""MCP servers as tool sources: real servers over stdio (the tests' own and mcp-server-time)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

pytest.importorskip("mcp")

from mcp_fixtures.scripted import BROKEN, RECORDER, ScriptedModel  # noqa: E402

from toolgrad_edge.assistant import (  # noqa: E402
    Assistant, Permissions, ServerSpec, server_from_command, servers_from_config)
from toolgrad_edge.assistant.mcp_servers import unique_names  # noqa: E402
from toolgrad_edge.assistant.toolbox import MAX_RESULT_CHARS  # noqa: E402
from toolgrad_edge.errors import ToolSourceError  # noqa: E402
from toolgrad_edge.grammars import ToolCall  # noqa: E402

pytestmark = pytest.mark.server  # most tests start MCP servers (tests/conftest.py: the tiers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# -- server specs --------------------------------------------------------------------------
def test_command_lines_split_like_a_shell_and_name_the_server():
    spec = server_from_command("python -m mcp_server_time --local-timezone 'Europe/Paris'")
    assert (spec.name, spec.command, spec.args) == ("mcp_server_time", "python", ("-m", "mcp_server_time",
                                                                                  "--local-timezone", "Europe/Paris"))
    assert spec.command_line == "python -m mcp_server_time --local-timezone Europe/Paris"
    assert server_from_command("uvx mcp-server-git --repository .").name == "mcp-server-git"
    assert server_from_command("/usr/bin/python3.11 tests/srv.py").name == "srv"
    assert server_from_command("/opt/bin/my-server -v").name == "my-server"
    specs = unique_names([server_from_command("python a.py"), server_from_command("python a.py")])
    assert [s.name for s in specs] == ["a", "a-2"]
    with pytest.raises(ToolSourceError, match="cannot split"):
        server_from_command("python 'unclosed")
    with pytest.raises(ToolSourceError, match="empty"):
        server_from_command("  ")


def test_config_file_in_the_mcp_servers_form(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "time": {"command": "python", "args": ["-m", "mcp_server_time"], "env": {"TZ": "UTC"}},
        "remote": {"url": "http://127.0.0.1:9/mcp"},
    }}))
    time_spec, remote = servers_from_config(path)
    assert time_spec == ServerSpec("time", "python", ("-m", "mcp_server_time"), {"TZ": "UTC"})
    assert remote.url == "http://127.0.0.1:9/mcp" and remote.command_line == "http://127.0.0.1:9/mcp"


@pytest.mark.parametrize("content, message", [
    ("{", "malformed JSON at line 1"),
    ("[]", "without an mcpServers object"),
    ('{"mcpServers": {"a": {"args": []}}}', 'mcpServers.a: expected "command"'),
    ('{"mcpServers": {"a": {"command": "x", "args": "y"}}}', "mcpServers.a.args: expected a list of strings"),
    ('{"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}', "mcpServers.a.env: expected an object of strings"),
    ('{"mcpServers": {"a": {"url": "ftp://x"}}}', "mcpServers.a.url: expected an http(s) URL"),
])
def test_bad_config_files_name_the_entry(tmp_path, content, message):
    path = tmp_path / "mcp.json"
    path.write_text(content)
    with pytest.raises(ToolSourceError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        servers_from_config(path)
    assert str(path) in str(info.value)
    with pytest.raises(ToolSourceError, match="cannot read"):
        servers_from_config(tmp_path / "missing.json")


# -- the tests' own server -----------------------------------------------------------------
@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    record_file = tmp_path_factory.mktemp("record") / "calls.jsonl"
    config = tmp_path_factory.mktemp("config") / "mcp.json"
    argv = RECORDER.split(" ")
    config.write_text(json.dumps({"mcpServers": {"rec": {"command": argv[0], "args": argv[1:],
                                                         "env": {"RECORD_FILE": str(record_file)}}}}))
    os.environ["TOOLGRAD_TEST_INHERITED"] = "from-the-caller"
    model = ScriptedModel()
    with Assistant(model, mcp_config=str(config), timeout=2.0, permissions=Permissions.of(yes=True)) as assistant:
        yield assistant, model, record_file
    os.environ.pop("TOOLGRAD_TEST_INHERITED", None)


def _run(assistant, model, *calls):
    model.answers.append(list(calls))
    records, interrupted = assistant.run_calls([ToolCall(n, a) for n, a in calls])
    assert not interrupted
    return records


def test_tools_come_from_list_tools_with_annotations(recorder):
    assistant, _, _ = recorder
    by_name = {e.name: e for e in assistant.entries}
    assert set(by_name) == {"record", "lookup", "fail", "slow", "meet", "huge", "freeze", "die"}
    assert by_name["lookup"].read_only and not by_name["record"].read_only
    assert by_name["record"].source == "rec" and by_name["record"].kind == "mcp"
    unit = by_name["record"].spec["parameters"]["properties"]["unit"]
    assert unit["enum"] == ["celsius", "fahrenheit"]
    assert "Record a forecast request." in by_name["record"].spec["description"]


def test_calls_run_and_the_server_gets_the_environment(recorder):
    assistant, model, record_file = recorder
    (rec, inherited, configured) = _run(assistant, model, ("record", {"city": "Paris", "unit": "fahrenheit"}),
                                        ("lookup", {"key": "env:TOOLGRAD_TEST_INHERITED"}),
                                        ("lookup", {"key": "env:RECORD_FILE"}))
    assert (rec.result, rec.is_error, rec.approved) == ("recorded Paris", False, True)
    assert json.loads(record_file.read_text().splitlines()[-1]) == {"city": "Paris", "unit": "fahrenheit", "days": 1}
    # The caller's whole environment, plus the config's env.
    assert inherited.result == "from-the-caller"
    assert configured.result == str(record_file)


def test_errors_timeouts_and_huge_results_come_back_as_results(recorder):
    assistant, model, _ = recorder
    fail, slow, huge, quick = _run(assistant, model, ("fail", {"reason": "disk full"}), ("slow", {"seconds": 30}),
                                   ("huge", {"size": 50_000}), ("lookup", {"key": "k"}))
    assert fail.is_error and "failed on purpose: disk full" in fail.result
    assert slow.is_error and slow.result == "slow timed out after 2 s (MCP server 'rec')."  # not "slept" at 30 s
    assert not huge.is_error and huge.result.startswith("x" * MAX_RESULT_CHARS)
    assert huge.result.endswith(f"[result cut: 50,000 characters in all, the first {MAX_RESULT_CHARS:,} shown]")
    assert quick.result == "value of k"
    # The server is still there after a timeout.
    (again,) = _run(assistant, model, ("lookup", {"key": "k2"}))
    assert again.result == "value of k2"


def test_calls_of_one_round_run_concurrently(recorder):
    assistant, model, _ = recorder
    records = _run(assistant, model, ("meet", {"parties": 3}), ("meet", {"parties": 3}), ("meet", {"parties": 3}))
    assert [r.result for r in records] == ["met"] * 3  # one after another, the first would wait alone


def test_a_server_that_dies_during_a_call(tmp_path):
    model = ScriptedModel()
    with Assistant(model, mcp=[RECORDER]) as assistant:
        (pid,) = _run(assistant, model, ("lookup", {"key": "pid"}))
        (died,) = _run(assistant, model, ("die", {}))
        assert died.is_error and "MCP server 'recorder_server' died during the call to die" in died.result
        assert "dying on request" in died.result  # the last line of its stderr
        (later,) = _run(assistant, model, ("lookup", {"key": "k"}))
        assert later.is_error and later.result.startswith("MCP server 'recorder_server' is gone")
        server = assistant.servers[0]
    assert server.state == "gone"
    assert not _alive(int(pid.result))


def test_server_processes_are_reaped_on_close():
    model = ScriptedModel()
    assistant = Assistant(model, mcp=[RECORDER])
    (pid,) = _run(assistant, model, ("lookup", {"key": "pid"}))
    assert _alive(int(pid.result))
    assistant.close()
    assistant.close()  # twice is fine
    assert not _alive(int(pid.result))


def test_a_server_that_fails_to_start_quotes_its_command_line_and_stderr():
    with pytest.raises(ToolSourceError) as info:
        Assistant(ScriptedModel(), mcp=[BROKEN])
    message = str(info.value)
    assert message.startswith("MCP server 'broken_server' failed to start: ")
    assert BROKEN in message
    assert "Last lines of its stderr: broken: starting up | broken: cannot open database /nonexistent/db.sqlite" \
        in message
    assert "\n" not in message
    with pytest.raises(ToolSourceError, match="No such file or directory"):
        Assistant(ScriptedModel(), mcp=["no-such-mcp-server-binary --flag"])


def test_not_strict_leaves_a_failing_server_out(tmp_path):
    with Assistant(ScriptedModel(), mcp=[BROKEN, RECORDER], strict=False) as assistant:
        assert [s.name for s in assistant.servers] == ["recorder_server"]
        assert len(assistant.warnings) == 1 and "broken_server" in assistant.warnings[0]
        assert assistant.warnings[0].endswith("Going on without it.")


def test_colliding_names_become_server_dot_tool(tmp_path):
    argv = RECORDER.split(" ")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"alpha": {"command": argv[0], "args": argv[1:]},
                                                 "beta": {"command": argv[0], "args": argv[1:]}}}))

    def lookup(key: str) -> str:
        """A Python tool with the same name."""
        return "python"

    with Assistant(ScriptedModel(), tools=[lookup], mcp_config=str(config),
                   permissions=Permissions.of(allow=["python.lookup"])) as assistant:
        names = {e.name for e in assistant.entries}
        assert {"alpha.record", "beta.record", "alpha.lookup", "beta.lookup", "python.lookup"} <= names
        assert not names & {"record", "lookup"}
        assert "tool 'record' is offered by alpha, beta: renamed to alpha.record, beta.record." in assistant.notes
        entry = next(e for e in assistant.entries if e.name == "beta.lookup")
        assert entry.original_name == "lookup" and entry.spec["name"] == "beta.lookup"
        records, _ = assistant.run_calls([ToolCall("beta.lookup", {"key": "z"}),
                                          ToolCall("python.lookup", {"key": "z"})])
        assert [r.result for r in records] == ["value of z", "python"]


# -- a real server from the package index -------------------------------------------------------
def test_mcp_server_time():
    pytest.importorskip("mcp_server_time")
    model = ScriptedModel([("get_current_time", {"timezone": "Asia/Tokyo"})], "It is late in Tokyo.")
    with Assistant(model, mcp=[f"{sys.executable} -m mcp_server_time --local-timezone UTC"]) as assistant:
        by_name = {e.name: e for e in assistant.entries}
        assert {"get_current_time", "convert_time"} <= set(by_name)
        assert by_name["get_current_time"].read_only  # runs without asking
        transcript = assistant.ask("What time is it in Tokyo?")
    (call,) = transcript.rounds[0].tool_calls
    assert call.approved and not call.is_error
    assert json.loads(call.result)["timezone"] == "Asia/Tokyo"
    assert transcript.answer == "It is late in Tokyo."
    # The result went back to the model as a tool turn.
    assert "Result of get_current_time: {" in model.requests[1]["prompt"]


def test_a_streamable_http_server_from_a_url_entry(tmp_path):
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, RECORDER.split(" ")[1], "--http", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        config = tmp_path / "mcp.json"
        config.write_text(json.dumps({"mcpServers": {"web": {"url": f"http://127.0.0.1:{port}/mcp"}}}))
        with Assistant(ScriptedModel(), mcp_config=str(config)) as assistant:
            assert assistant.servers[0].name == "web"
            records, _ = assistant.run_calls([ToolCall("lookup", {"key": "over-http"})])
        assert records[0].result == "value of over-http"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_server_that_hangs_during_a_call_is_ended(monkeypatch):
    monkeypatch.setattr("toolgrad_edge.assistant.mcp_servers.PING_TIMEOUT_S", 1.0)
    model = ScriptedModel()
    with Assistant(model, mcp=[RECORDER], timeout=1.0) as assistant:
        (pid,) = _run(assistant, model, ("lookup", {"key": "pid"}))
        t0 = time.perf_counter()
        (frozen,) = _run(assistant, model, ("freeze", {}))
        assert time.perf_counter() - t0 < 30  # about 2 s: the 1 s timeout, then a 1 s ping
        assert frozen.is_error and frozen.result == (
            "freeze timed out after 1 s (MCP server 'recorder_server'); the server stopped answering and was ended.")
        (later,) = _run(assistant, model, ("lookup", {"key": "k"}))
        assert later.result.startswith("MCP server 'recorder_server' is gone (it stopped answering")
        assert not _alive(int(pid.result))
