"""The AMX guard on every path that loads a model, checked on any CPU from llama.cpp's own log.

On an Intel Xeon with AMX the kernel plan takes AMX out of the CPU device's list of extra buffer
types before any model loads (the other repacking stays), or, where that list cannot be edited,
keeps the weights out of every extra buffer type (``use_extra_bufts = False``), because llama.cpp's
AMX kernels crash on the first prompt there. llama.cpp's log says which buffers each load made:
``CPU_Mapped`` (the file, in place), ``CPU_REPACK`` (repacked copies), ``AMX``. Here the list edit
is shown on the type this CPU has (CPU_REPACK stands in for AMX), the fallback plan is forced on
every load path, and the doctor's self-test runs on both of an AMX CPU's plans.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from toolgrad_edge import hardware
from toolgrad_edge.engines import kernel_guard
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


XEON_PLAN = kernel_plan(XEON_INFO, ["AMX", "CPU_REPACK"], "")  # AMX dropped from the list, repacking kept
FALLBACK_PLAN = hardware.plain_plan("AMX could not be taken out of llama.cpp's list (forced by the test)")


@pytest.fixture
def fallback_plan(monkeypatch):
    """This process plans as an AMX Xeon does where the list cannot be edited: no extra buffer types."""
    assert XEON_PLAN.dropped == ("AMX",) and XEON_PLAN.use_extra_bufts
    assert not FALLBACK_PLAN.use_extra_bufts and FALLBACK_PLAN.avoided == ("AMX",)
    monkeypatch.setattr(kernel_guard, "detect_kernel_plan", lambda: FALLBACK_PLAN)
    return FALLBACK_PLAN


def _load_and_decode(path) -> None:
    """One LlamaSession on the model: loaded (llama.cpp logs its buffers), one token decoded, closed."""
    from toolgrad_edge.engines.llama_session import LlamaSession

    s = LlamaSession(path, n_ctx=256, n_threads=2)
    try:
        assert s.decode(s.tokenize("Hello"), 1)[0].size == s.n_vocab
    finally:
        s.close()


def _repacks_here() -> bool:
    return "CPU_REPACK" in (kernel_guard.detect_extra_buffer_types() or [])


def test_the_log_shows_repacking_without_the_guard(buffers, gemma_270m_gguf):
    # The witness for the tests below: on this machine's own plan the same load does repack.
    plan = kernel_guard.detect_kernel_plan()
    if not (plan.use_extra_bufts and _repacks_here()):
        pytest.skip(f"this llama.cpp build repacks nothing here ({plan.reason})")
    _load_and_decode(gemma_270m_gguf)
    assert "CPU_REPACK" in buffers, buffers


def test_a_type_taken_out_of_the_list_is_not_used_and_comes_back(buffers, gemma_270m_gguf):
    # What the plan does to AMX on a Xeon, done here to the extra type this build lists.
    if not _repacks_here():
        pytest.skip("this llama.cpp build lists no extra buffer type here")
    try:
        assert kernel_guard.restrict_extra_buffer_types(["CPU_REPACK"]) == []
        _load_and_decode(gemma_270m_gguf)
        assert buffers and set(buffers) == {"CPU_Mapped"}, buffers
    finally:
        assert kernel_guard.restrict_extra_buffer_types(()) == ["CPU_REPACK"]
    buffers.clear()
    _load_and_decode(gemma_270m_gguf)
    assert "CPU_REPACK" in buffers, buffers


def test_every_load_path_applies_the_fallback_plan(fallback_plan, buffers, gemma_270m_gguf):
    from toolgrad_edge.bench.measure import _baseline_decode
    from toolgrad_edge.runtime import ToolRuntime

    # The runtime and its draft model (the in-process engine's two LlamaSessions) ...
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=1024, draft_model=gemma_270m_gguf) as rt:
        assert rt.describe().plan.kernels is fallback_plan
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


@pytest.mark.parametrize("plan, says", [
    (XEON_PLAN, "AMX is taken out of that list before any model loads and the weights are repacked with CPU_REPACK"),
    (FALLBACK_PLAN, "could not be taken out"),
])
def test_doctor_on_an_amx_cpus_plans(monkeypatch, plan, says, gemma_270m_gguf):
    # What `toolgrad-edge doctor` reports on an AMX CPU, and its self-test through every decode path
    # (narrow head against llama.cpp's logits, speculative = stepwise, prefix state round trip).
    from toolgrad_edge.doctor import format_report, run_doctor

    monkeypatch.setattr(kernel_guard, "detect_kernel_plan", lambda: plan)
    report = run_doctor(gemma_270m_gguf, n_threads=2, n_ctx=1024)
    assert report["ok"], format_report(report)
    text = format_report(report)
    assert "kernels           avoided AMX: " in text and says in text
    assert report["kernels"]["dropped"] == list(plan.dropped)
    names = {c["name"] for c in report["checks"] if c["ok"]}
    assert {"narrow head", "speculative = stepwise", "prefix state round trip", "cold = warm"} <= names


def test_repacking_turned_off_by_the_environment(monkeypatch, buffers, gemma_270m_gguf):
    monkeypatch.setenv(hardware.ENV_REPACK, "0")
    _load_and_decode(gemma_270m_gguf)
    assert buffers and set(buffers) == {"CPU_Mapped"}, buffers
