"""`toolgrad-edge cache` on a cache folder laid out by the test: list, --dry-run, --clean, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolgrad_edge.cli import main
from toolgrad_edge.leftovers import temp_path
from toolgrad_edge.paths import cache_root


@pytest.fixture
def laid_out(monkeypatch, tmp_path):
    """Every section with known sizes, a dead writer's leftover and a running writer's file."""
    monkeypatch.delenv("TOOLGRAD_EDGE_BFCL_ENV", raising=False)
    monkeypatch.chdir(tmp_path)  # no benchmarks/bfcl/env here
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    root = cache_root()
    files = {
        "models/toolgrad-4b-Q4_K_M.gguf": 3000,
        "models/.toolgrad-4b-Q4_K_M.gguf.sha256": 10,  # its check record: not an item, removed with it
        f"models/.toolgrad-4b-BF16.gguf.{proc.pid}.intermediate": 7000,  # SIGKILLed convert
        "prefix/aaa.state": 100,
        "prefix/bbb.state": 200,
        "llguidance/0123-0.3.16.tokens": 400,
        "llama-server/0.3.16/build/bin/llama-server": 500,
        "bfcl-env/bin/python": 60,
        "bfcl-env/.toolgrad-edge-ready": 0,
    }
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    running = temp_path(root / "prefix" / "ccc.state", "partial")  # this process writes it: in use
    running.write_bytes(b"x" * 50)
    return root, proc.pid, running


def _json(*args):
    result = CliRunner().invoke(main, ["cache", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_lists_every_section_with_sizes(laid_out):
    root, dead, running = laid_out
    result = CliRunner().invoke(main, ["cache"])
    assert result.exit_code == 0, result.output
    for line in ("models:", "prefix:", "llguidance:", "llama-server:", "bfcl-env:", "leftovers:",
                 "3.0 kB  " + str(root / "models" / "toolgrad-4b-Q4_K_M.gguf"),
                 f"left by pid {dead}, not running", f"being written by pid {os.getpid()}", "2 entries"):
        assert line in result.output, line
    data = _json()
    sections = {(i["section"], os.path.basename(i["path"])): i for i in data["items"]}
    assert sections["prefix", "prefix"]["bytes"] == 300 and sections["prefix", "prefix"]["files"] == 2
    assert sections["llama-server", "0.3.16"]["bytes"] == 500
    assert sections["bfcl-env", "bfcl-env"]["bytes"] == 60
    assert sections["leftovers", f".toolgrad-4b-BF16.gguf.{dead}.intermediate"]["kept"] is None
    assert sections["leftovers", running.name]["kept"] == f"being written by pid {os.getpid()}"
    assert data["bytes"] == 3000 + 7000 + 300 + 400 + 500 + 60 + 50


def test_dry_run_removes_nothing_and_clean_removes_what_it_named(laid_out):
    root, dead, running = laid_out
    leftover = root / "models" / f".toolgrad-4b-BF16.gguf.{dead}.intermediate"
    before = sorted(p for p in root.rglob("*"))
    dry = _json("leftovers", "prefix", "--clean", "--dry-run")
    assert dry["dry_run"] is True and dry["freed_bytes"] == 7000 + 300
    assert sorted(p for p in root.rglob("*")) == before

    result = CliRunner().invoke(main, ["cache", "leftovers", "prefix", "--clean"])
    assert result.exit_code == 0, result.output
    assert "[removed]" in result.output and f"[kept: being written by pid {os.getpid()}]" in result.output
    assert "removed 2 of 3 items, 7.3 kB." in result.output
    assert not leftover.exists() and not list((root / "prefix").glob("*.state"))
    assert running.exists() and (root / "models" / "toolgrad-4b-Q4_K_M.gguf").exists()

    one = _json("toolgrad-4b-Q4_K_M.gguf", "--clean")
    assert one["removed"] == [str(root / "models" / "toolgrad-4b-Q4_K_M.gguf")]
    assert not (root / "models" / ".toolgrad-4b-Q4_K_M.gguf.sha256").exists()
    everything = _json("all", "--clean")
    assert everything["freed_bytes"] == 400 + 500 + 60
    assert [i["path"] for i in _json()["items"]] == [str(running)]


def test_bad_uses_say_what_to_do(laid_out):
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "--clean"])
    assert result.exit_code == 2 and "`all`" in result.output
    result = runner.invoke(main, ["cache", "nonsense", "--clean"])
    assert result.exit_code == 2 and "'nonsense' is neither a section" in result.output
    result = runner.invoke(main, ["cache", "--dry-run"])
    assert result.exit_code == 2 and "--dry-run goes with --clean" in result.output


def test_an_empty_cache(monkeypatch):
    # CI points these at its built llama-server and BFCL checker env, which `cache` lists too.
    monkeypatch.delenv("TOOLGRAD_EDGE_BFCL_ENV", raising=False)
    monkeypatch.delenv("TOOLGRAD_EDGE_LLAMA_SERVER", raising=False)
    result = CliRunner().invoke(main, ["cache", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["items"] == []
    result = CliRunner().invoke(main, ["cache"])
    assert result.exit_code == 0 and "Nothing cached" in result.output
