"""No silent fallbacks: a capability off because a library part could not be loaded is named by doctor and info.

Each failure is simulated at the loader the capability itself uses (llama-cpp-python's ``_ggml``
bindings, the CPU device's list of extra buffer types, llguidance's compiled part), and the report
is checked for the line that names what failed to load and what is off as a result.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
from click.testing import CliRunner

from toolgrad_edge import doctor, grammar_engines, hardware
from toolgrad_edge.cli import main
from toolgrad_edge.engines import kernel_guard, llama_session

pytest.importorskip("llama_cpp")

NO_GGML = OSError("libggml.so: cannot open shared object file: No such file or directory")


class _Unloadable(types.ModuleType):
    """llama_cpp._ggml as it fails where llama-cpp-python's lib/ folder lacks libggml: loading it raises."""

    def __getattr__(self, name):
        raise NO_GGML


@pytest.fixture
def no_ggml(monkeypatch):
    """llama-cpp-python's _ggml bindings fail to load, for both loaders (ggml's tensor calls, its device registry)."""
    monkeypatch.setitem(sys.modules, "llama_cpp._ggml", _Unloadable("llama_cpp._ggml"))
    monkeypatch.setattr(llama_session, "_GGML", None)  # nothing loaded before counts
    hardware.ggml_device_api.cache_clear()
    yield
    hardware.ggml_device_api.cache_clear()


@pytest.fixture
def broken_llguidance(monkeypatch, tmp_path):
    """An llguidance whose compiled part does not load (built for another machine, say)."""
    package = tmp_path / "llguidance"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('_lib.abi3.so: wrong ELF class: ELFCLASS32')\n")
    for name in [m for m in sys.modules if m == "llguidance" or m.startswith("llguidance.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))


def _doctor_text() -> tuple[dict, str]:
    report = doctor.environment()
    report["checks"] = []  # the environment's part of the report only: no model
    return report, doctor.format_report(report)


def _off_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("off ")]


def test_a_sound_install_turns_nothing_off():
    report, text = _doctor_text()
    assert report["missing_parts"] == [] and _off_lines(text) == []
    assert doctor.missing_parts_line([]) == "nothing: every library part loaded"


def test_ggml_bindings_missing(no_ggml):
    parts = doctor.missing_parts()
    assert [(p.part, p.capability) for p in parts] == [("llama_cpp._ggml", "narrow output head"),
                                                      ("llama_cpp._ggml", "ggml's device registry")]
    report, text = _doctor_text()
    off = _off_lines(text)
    assert len(off) == 2, text
    assert "narrow output head: llama_cpp._ggml could not be loaded (OSError: libggml.so: cannot open" in off[0]
    assert "every pass computes the whole output layer" in off[0]
    assert "ggml's device registry: llama_cpp._ggml could not be loaded" in off[1]
    assert "the kernel plan is made from llama.cpp's system info alone" in off[1]
    assert report["backend"]["devices"] == []  # what the missing registry turned off


def test_narrow_head_off_is_logged_where_a_session_loads(no_ggml, gemma_270m_gguf, caplog):
    s = llama_session.LlamaSession(gemma_270m_gguf, n_ctx=256, n_threads=2, output_head=object())
    try:
        assert s._head is None
    finally:
        s.close()
    assert "narrow output head off: llama_cpp._ggml could not be loaded (libggml.so" in caplog.text


def test_extra_buffer_type_list_missing(monkeypatch):
    monkeypatch.setattr(kernel_guard, "read_extra_buffer_types", lambda: None)
    [part] = doctor.missing_parts()
    assert part.line() == ("the kernel guard's list edit: llama.cpp's list of extra buffer types could not be "
                           "loaded (LookupError: this llama.cpp has no CPU device); " + doctor.DEVICES_OFF)
    assert _off_lines(_doctor_text()[1]) == [f"off               {part.line()}"]


def test_llguidance_that_does_not_load(broken_llguidance):
    notes: list[str] = []
    assert grammar_engines.resolve_engine(None, warn=notes.append) == "llama"
    assert notes == ["note: llguidance could not be loaded (ImportError: _lib.abi3.so: wrong ELF class: "
                     "ELFCLASS32); using llama.cpp's grammar engine (pip install --force-reinstall llguidance)."]
    report, text = _doctor_text()
    assert report["grammar_engine"]["default"] == "llama"
    [off] = _off_lines(text)
    assert off.endswith("llguidance grammar engine: llguidance could not be loaded (ImportError: _lib.abi3.so: "
                        "wrong ELF class: ELFCLASS32); calls decode with llama.cpp's slower GBNF sampler")


def test_info_says_it_in_one_line(no_ggml, broken_llguidance, gemma_270m_gguf):
    result = CliRunner().invoke(main, ["info", str(gemma_270m_gguf)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    off = [line for line in result.output.splitlines() if line.startswith("off ")]
    assert len(off) == 1, result.output
    assert off[0].split(None, 1)[1] == (
        f"narrow output head (llama_cpp._ggml: OSError: {NO_GGML}); ggml's device registry (llama_cpp._ggml: "
        f"OSError: {NO_GGML}); llguidance grammar engine (llguidance: ImportError: _lib.abi3.so: wrong ELF "
        f"class: ELFCLASS32)")
    report = json.loads(CliRunner().invoke(main, ["info", str(gemma_270m_gguf), "--json"]).stdout)
    assert [p["capability"] for p in report["missing_parts"]] == ["narrow output head", "ggml's device registry",
                                                                  "llguidance grammar engine"]


def test_info_on_a_sound_install(gemma_270m_gguf):
    result = CliRunner().invoke(main, ["info", str(gemma_270m_gguf)], catch_exceptions=False)
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in result.output.splitlines()}
    assert lines["off"] == "nothing: every library part loaded"
    assert lines["cpu"] == hardware.detect_cpu_description().summary()


@pytest.mark.slow
def test_doctor_self_test_without_the_bindings(no_ggml, gemma_270m_gguf):
    # Every other check still runs and passes; the narrow head's check says why it did not run.
    report = doctor.run_doctor(gemma_270m_gguf, n_threads=2, n_ctx=1024)
    assert report["ok"], doctor.format_report(report)
    head = next(c for c in report["checks"] if c["name"] == "narrow head")
    assert head["ok"] is None and head["detail"].startswith("skipped: narrow output head: llama_cpp._ggml could "
                                                            "not be loaded (OSError: libggml.so")
