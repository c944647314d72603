"""The AMX guard on every path that loads a model, checked on any CPU from llama.cpp's own log.

On an Intel Xeon with AMX the kernel plan keeps the weights out of llama.cpp's extra buffer types
(``use_extra_bufts = False``), because its AMX kernels crash on the first prompt there. Here the
plan an AMX CPU gets is forced, and llama.cpp's log says which buffers each load made: with the
guard only the plain ``CPU_Mapped`` buffer, without it (this machine's own plan) the repacked
``CPU_REPACK`` one too where the build has it. The guarded path then has to decode exactly what a
user on such a CPU would get: the doctor's self-test passes through every decode path.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from toolgrad_edge import hardware
from toolgrad_edge.hardware import kernel_plan

llama_cpp = pytest.importorskip("llama_cpp")
import llama_cpp._logger  # noqa: E402  (llama-cpp-python's own callback, put back after each test)

TOOLS = Path(__file__).resolve().parents[1] / "examples" / "tools.json"
XEON_INFO = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
EXTRA_BUFFER = re.compile(r"(\S+) model buffer size")


@pytest.fixture
def buffers():
    """The names of the model buffers llama.cpp allocates while the test runs (from its log)."""
    seen: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        m = EXTRA_BUFFER.search(text.decode(errors="replace"))
        if m:
            seen.append(m.group(1))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield seen
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


@pytest.fixture
def amx_cpu(monkeypatch):
    """This process plans as it would on a Sapphire Rapids Xeon whose llama.cpp lists an AMX buffer type."""
    plan = kernel_plan(XEON_INFO, ["AMX", "CPU_REPACK"], "")
    assert not plan.use_extra_bufts and plan.avoided == ("AMX",)
    monkeypatch.setattr(hardware, "detect_kernel_plan", lambda: plan)
    return plan


def _repacks_here() -> bool:
    return "CPU_REPACK" in (hardware.detect_extra_buffer_types() or [])


def test_the_log_shows_repacking_without_the_guard(buffers, gemma_270m_gguf):
    # The witness for the tests below: on this machine's own plan the same load does repack.
    from toolgrad_edge.engines.inprocess import LlamaSession

    plan = hardware.detect_kernel_plan()
    if not (plan.use_extra_bufts and _repacks_here()):
        pytest.skip(f"this llama.cpp build repacks nothing here ({plan.reason})")
    s = LlamaSession(gemma_270m_gguf, n_ctx=256, n_threads=2)
    s.close()
    assert "CPU_REPACK" in buffers, buffers


def test_every_load_path_keeps_the_weights_unpacked(amx_cpu, buffers, gemma_270m_gguf):
    from toolgrad_edge.bench.measure import _baseline_decode
    from toolgrad_edge.runtime import ToolRuntime

    # The runtime and its draft model (the in-process engine's two LlamaSessions) ...
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=1024, draft_model=gemma_270m_gguf) as rt:
        assert rt.hardware.kernels is amx_cpu
        result = rt.call("Get the weather in Paris, in celsius.", str(TOOLS), tool_choice="required",
                         max_tokens=32)
    assert result.parse_error is None and [c.name for c in result.tool_calls] == ["get_weather"]
    after_runtime = list(buffers)
    assert len(after_runtime) >= 2 and set(after_runtime) == {"CPU_Mapped"}, after_runtime
    # ... and llama-cpp-python's Llama, which bench's baseline and the converter's checks load.
    ids = [2, 105, 2364, 107]
    speed, _ = _baseline_decode(gemma_270m_gguf, 2, 0, 256, ids, 'root ::= "a" [a-z]*', max_tokens=4, runs=1)
    assert speed > 0
    assert len(buffers) > len(after_runtime) and set(buffers) == {"CPU_Mapped"}, buffers


def test_doctor_on_the_guarded_path(amx_cpu, gemma_270m_gguf):
    # What `toolgrad-edge doctor` reports on an AMX CPU, and its self-test through every decode path
    # (narrow head against llama.cpp's logits, speculative = stepwise, prefix state round trip) on
    # weights left where llama.cpp mapped them.
    from toolgrad_edge.doctor import format_report, run_doctor

    report = run_doctor(gemma_270m_gguf, n_threads=2, n_ctx=1024)
    assert report["ok"], format_report(report)
    text = format_report(report)
    assert "avoided AMX: llama.cpp's CPU device lists the extra buffer types AMX, CPU_REPACK" in text
    assert "#20824" in text and hardware.ENV_AMX in text
    names = {c["name"] for c in report["checks"] if c["ok"]}
    assert {"narrow head", "speculative = stepwise", "prefix state round trip", "cold = warm"} <= names


def test_repacking_turned_off_by_the_environment(monkeypatch, buffers, gemma_270m_gguf):
    from toolgrad_edge.engines.inprocess import LlamaSession

    monkeypatch.setenv(hardware.ENV_REPACK, "0")
    s = LlamaSession(gemma_270m_gguf, n_ctx=256, n_threads=2)
    try:
        assert s.decode(s.tokenize("Hello"), 1)[0].size == s.n_vocab
    finally:
        s.close()
    assert buffers and set(buffers) == {"CPU_Mapped"}, buffers
