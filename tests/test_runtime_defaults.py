"""The defaults chosen from the machine, on the real model: threads, n_ctx auto, KV type, swa_full, output rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from toolgrad_edge import ToolRuntime, hardware
from toolgrad_edge.engines import kernel_guard
from toolgrad_edge.engines.llama_session import LlamaSession
from toolgrad_edge.errors import GenerationError, ModelLoadError

TOOLS = str(Path(__file__).resolve().parent.parent / "examples" / "tools.json")
QUERY = "Weather in Paris in celsius?"


def test_auto_defaults_come_from_the_machine(gemma_270m_gguf):
    with ToolRuntime(gemma_270m_gguf, prefix_cache=False) as rt:
        threads, reason = hardware.default_threads()
        assert (rt.describe().n_threads, rt.describe().plan.threads_reason) == (threads, reason)
        plan = rt.describe().plan.context
        assert rt.n_ctx == plan.n_ctx == rt.session.n_ctx and rt.describe().kv_type == plan.kv_type
        assert f"{plan.n_ctx} tokens, {plan.kv_type} KV cache" in plan.reason
        assert rt.describe().plan.kernels == kernel_guard.detect_kernel_plan()
        assert rt.session.n_outputs == 16  # not llama.cpp's n_batch (512 rows of 262k logits)


def test_a_decode_asking_more_rows_than_reserved_is_refused(gemma_270m_gguf):
    s = LlamaSession(gemma_270m_gguf, n_ctx=256, n_threads=2, n_outputs_max=4)
    try:
        tokens = s.tokenize("one two three four five six")
        with pytest.raises(GenerationError, match="at most 4 logits rows"):
            s.decode(tokens, 5)
        with pytest.raises(GenerationError, match="at most 4 logits rows"):
            s.decode_at(tokens, [0, 1, 2, 3])  # and the last token's row
        assert s.tokens == []  # nothing reached llama.cpp, which would have aborted the process
        assert s.decode(tokens, 4).shape == (4, s.n_vocab)
    finally:
        s.close()


@pytest.mark.slow
def test_window_only_sliding_cache_rewinds_only_where_the_window_is_held(gemma_270m_gguf):
    s = LlamaSession(gemma_270m_gguf, n_ctx=2048, n_threads=2, swa_full=False)
    try:
        assert s.n_swa == 512
        tokens = s.tokenize(" ".join(f"item{i}" for i in range(700)))[:1400]
        s.decode(tokens, 1)
        assert s.n_tokens == 1400
        s.rewind(1390)  # a rejected draft: the window before it is still held
        assert s.n_tokens == 1390
        s.rewind(300)  # its window was dropped (the cache keeps about 1,024 positions): start over
        assert s.n_tokens == 0
        s.decode(tokens, 1)
        assert s.sync(tokens[:300] + tokens[:5]) == 0  # sync starts over too, and evaluates every token
        assert s.tokens == tokens[:300] + tokens[:5]
        s.clear()
        # From empty, the same tokens give the logits a never-rewound session gives.
        again = s.decode(tokens[:300], 1)
        fresh = LlamaSession(gemma_270m_gguf, n_ctx=2048, n_threads=2, swa_full=False)
        try:
            assert (again == fresh.decode(tokens[:300], 1)).all()
        finally:
            fresh.close()
    finally:
        s.close()


@pytest.mark.slow
def test_q8_0_kv_cache_without_the_full_size_window(gemma_270m_gguf, tmp_path):
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048, kv_type="q8_0", swa_full=False,
                     cache_dir=tmp_path) as rt:
        assert (rt.n_ctx, rt.describe().kv_type, rt.describe().swa_full) == (2048, "q8_0", False)
        cold = rt.call(QUERY, TOOLS, tool_choice="required", max_tokens=32)
        rt.clear_kv_cache()
        warm = rt.call(QUERY, TOOLS, tool_choice="required", max_tokens=32)
    assert cold.tool_calls and cold.parse_error is None
    assert warm.tool_calls and warm.usage.cached_tokens > 0  # the prefix came from the prefix cache


def test_a_model_that_does_not_fit_is_refused_with_the_figures(gemma_270m_gguf, monkeypatch):
    monkeypatch.setattr(hardware, "detect_ram", lambda: (512 * hardware.MiB, 300 * hardware.MiB))
    with pytest.raises(ModelLoadError, match=r"does not fit in the available RAM: .* 300 MiB available"):
        ToolRuntime(gemma_270m_gguf, prefix_cache=False)
    from toolgrad_edge.cli import main

    result = CliRunner().invoke(main, ["call", QUERY, "-t", TOOLS, "-m", str(gemma_270m_gguf)],
                                catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "does not fit in the available RAM" in result.output and "--n-ctx" in result.output
    # An explicit context is tried anyway, as the message says.
    with ToolRuntime(gemma_270m_gguf, n_ctx=512, n_threads=2, prefix_cache=False) as rt:
        assert rt.n_ctx == 512 and "as asked" in rt.describe().plan.context.reason


def test_cli_context_options(gemma_270m_gguf):
    from toolgrad_edge.cli import main

    bad = CliRunner().invoke(main, ["call", QUERY, "-t", TOOLS, "-m", str(gemma_270m_gguf), "--n-ctx", "lots"])
    assert bad.exit_code == 2 and "neither 'auto' nor a number" in bad.output
    small = CliRunner().invoke(main, ["call", QUERY, "-t", TOOLS, "-m", str(gemma_270m_gguf), "--n-ctx", "100"])
    assert small.exit_code == 2 and "below the smallest context" in small.output
    kv = CliRunner().invoke(main, ["call", QUERY, "-t", TOOLS, "-m", str(gemma_270m_gguf), "--kv-type", "q4_0"])
    assert kv.exit_code == 2
