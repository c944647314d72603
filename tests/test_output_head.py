"""Passes without the output layer: a few tokens' logits from the final hidden state.

The narrow logits must match llama.cpp's own logits for the same pass (the
head rounds the hidden state as llama.cpp's CPU kernels do, so only float
summation order differs), for every output-weight type the converter writes;
and a pass stopped after the final norm must leave the KV cache exactly as a
whole pass does.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolgrad_edge.convert.gguf_header import read_gguf_header
from toolgrad_edge.engines.llama_session import LlamaSession
from toolgrad_edge.engines.output_head import OutputHead, _bf16, _q8_blocks, _q8_k

pytest.importorskip("llama_cpp")

# Measured: at most 1e-5 on the 270M (logits up to about 25); float summation order only.
TOLERANCE = 1e-3


def _session(path, head=True) -> LlamaSession:
    h = OutputHead.from_gguf(path, read_gguf_header(path).tensors) if head else None
    return LlamaSession(path, n_ctx=256, n_threads=2, output_head=h)


def _ids(full: np.ndarray, seed: int = 0) -> np.ndarray:
    """The 40 best tokens and 40 random others."""
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([np.argsort(-full)[:40], rng.integers(0, full.size, 40)]))


def _narrow_matches_full(path, text: str) -> float:
    """Largest |narrow - full| over several positions; also checks the cache after each narrow pass."""
    with_head, plain = _session(path), _session(path, head=False)
    try:
        assert with_head.narrow
        tokens = with_head.tokenize(text)
        assert len(tokens) > 6
        worst = 0.0
        for s in (with_head, plain):
            s.decode(tokens[:4], 1)
        for k in range(4, len(tokens) - 1):
            full = plain.decode(tokens[k:k + 1], 1)[0]
            ids = _ids(full, k)
            narrow = with_head.decode_narrow(tokens[k:k + 1], ids)
            worst = max(worst, float(np.abs(narrow - full[ids]).max()))
            assert int(ids[np.argmax(narrow)]) == int(ids[np.argmax(full[ids])])
        # The first narrow pass checked the head against the whole pass and kept it.
        assert with_head.narrow and with_head.head_check["ok"], with_head.head_check
        # The cache a narrow pass leaves is the one a whole pass leaves: the next logits are bit-identical.
        assert with_head.tokens == plain.tokens
        np.testing.assert_array_equal(with_head.decode(tokens[-1:], 1), plain.decode(tokens[-1:], 1))
        return worst
    finally:
        with_head.close()
        plain.close()


def test_narrow_logits_match_llama_cpp_on_the_270m(gemma_270m_gguf):
    worst = _narrow_matches_full(gemma_270m_gguf, '[get_weather(city="Paris", unit="celsius")] and the rest')
    assert worst < TOLERANCE, worst


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0", "Q4_K_M"])
def test_narrow_logits_match_llama_cpp_for_each_output_type(tiny_ggufs, qtype):
    _, ggufs = tiny_ggufs("causal")
    head = OutputHead.from_gguf(ggufs[qtype], read_gguf_header(ggufs[qtype]).tensors)
    assert head is not None, f"{qtype}: the output weight's type is not handled"
    worst = _narrow_matches_full(ggufs[qtype], "The capital of France is Paris, and the capital of Italy is Rome.")
    assert worst < TOLERANCE, (qtype, head.qtype.name, worst)


def test_a_pass_that_could_not_stop_early_still_gives_the_right_logits(gemma_270m_gguf):
    """If the final norm is not where the callback looks, the pass runs whole and llama.cpp's logits are used."""
    s, plain = _session(gemma_270m_gguf), _session(gemma_270m_gguf, head=False)
    try:
        tokens = s.tokenize("The quick brown fox jumps")
        s.decode(tokens[:-1], 1)
        plain.decode(tokens[:-1], 1)
        s._scan_names = False  # as if llama.cpp had renamed the node
        s._norm_nodes.clear()
        full = plain.decode(tokens[-1:], 1)[0]
        ids = _ids(full)
        np.testing.assert_array_equal(s.decode_narrow(tokens[-1:], ids), full[ids])
        assert s._scan_names  # it looks the node up by name on the next narrow pass
    finally:
        s.close()
        plain.close()


def test_a_head_that_is_not_exact_on_this_kernel_path_is_dropped(gemma_270m_gguf):
    """As on a path whose kernels round otherwise: the first narrow pass finds it, and answers exactly."""
    s, plain = _session(gemma_270m_gguf), _session(gemma_270m_gguf, head=False)
    try:
        head = s._head
        real = head.logits
        head.logits = lambda hidden, ids: real(hidden, ids) + 0.01
        tokens = s.tokenize("The quick brown fox jumps over")
        s.decode(tokens[:-2], 1)
        plain.decode(tokens[:-2], 1)
        full = plain.decode(tokens[-2:-1], 1)[0]
        ids = _ids(full)
        np.testing.assert_array_equal(s.decode_narrow(tokens[-2:-1], ids), full[ids])
        assert not s.narrow
        assert s.head_check["ok"] is False and s.head_check["max_abs_difference"] == pytest.approx(0.01, abs=1e-4)
        full = plain.decode(tokens[-1:], 1)[0]  # later passes run whole: llama.cpp's logits
        np.testing.assert_array_equal(s.decode_narrow(tokens[-1:], ids), full[ids])
    finally:
        s.close()
        plain.close()


def test_gpu_offload_keeps_the_whole_output_layer(gemma_270m_gguf):
    head = OutputHead.from_gguf(gemma_270m_gguf, read_gguf_header(gemma_270m_gguf).tensors)
    s = LlamaSession(gemma_270m_gguf, n_ctx=64, n_threads=2, n_gpu_layers=-1, output_head=head)
    try:
        assert not s.narrow
        tokens = s.tokenize("Hello there")
        full = s.decode(tokens, 1)[0]
        s.rewind(0)
        np.testing.assert_array_equal(s.decode_narrow(tokens, np.arange(5)), full[:5])
    finally:
        s.close()


# -- the activation formats, without a model ------------------------------------------

def test_q8_0_rounding_is_per_block_of_32_with_an_f16_scale():
    x = np.linspace(-1, 1, 64, dtype=np.float32) ** 3
    y = _q8_blocks(x, 32, True)
    for block in (slice(0, 32), slice(32, 64)):
        d = np.float32(np.float16(np.abs(x[block]).max() / 127))
        q = y[block] / d
        np.testing.assert_allclose(q, np.rint(q), atol=1e-3)      # integers times the block's scale
        assert np.abs(q).max() <= 127.5
    assert np.abs(y - x).max() <= np.abs(x).max() / 127


def test_q8_k_maps_the_largest_magnitude_to_minus_127():
    x = np.zeros(256, dtype=np.float32)
    x[3], x[10] = 2.0, -0.5
    y = _q8_k(x)
    assert y[3] == pytest.approx(2.0) and y[10] == pytest.approx(-0.5, abs=2.0 / 127)
    assert not _q8_k(np.zeros(256, dtype=np.float32)).any()


def test_bf16_rounds_to_nearest_even():
    one = np.float32(1.0)
    step = np.float32(2.0 ** -7)  # bf16's spacing at 1.0
    x = np.array([one + step / 2, one + 3 * step / 2, one + step / 4], dtype=np.float32)
    np.testing.assert_array_equal(_bf16(x), np.array([one, one + 2 * step, one], dtype=np.float32))


def test_unhandled_weight_types_give_no_head(tmp_path):
    from toolgrad_edge.convert.gguf_header import GGUFTensor
    from gguf import GGMLQuantizationType as Q

    t = GGUFTensor("token_embd.weight", Q.IQ2_XXS, (256, 1000), 0)
    assert OutputHead.from_gguf(tmp_path / "x.gguf", [t]) is None
    assert OutputHead.from_gguf(tmp_path / "x.gguf", []) is None
