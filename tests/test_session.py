"""The decode session and the runtime's decode loop on the real Gemma 3 270M GGUF.

Rewind after a rejected draft, a decode interrupted halfway, streams
abandoned or interleaved with other calls, stop strings that must not cut a
call, and the statistics a result carries.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from toolgrad_edge import ToolRuntime, load_tools
from toolgrad_edge.engines.llama_session import LlamaSession
from toolgrad_edge.errors import ContextLengthError, GenerationError, ModelLoadError
from toolgrad_edge.grammar_engines import llguidance_available
from toolgrad_edge.runtime import Decoded, Final, result_from_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tools.json"
# The base 270M model answers this phrasing with one short call in the grammars' compact
# layout; longer ones make it write send_message with a body that runs past max_tokens.
QUERY = "Weather in Paris, in celsius?"

# Same tokens, batched versus one at a time: the CPU back-end runs other
# kernels for larger batches (measured max |difference| 0.42 for 4 tokens).
BATCH_NOISE = 1.0


@pytest.fixture(scope="module")
def tools():
    return load_tools(EXAMPLES)


@pytest.fixture(scope="module")
def session(gemma_270m_gguf):
    s = LlamaSession(gemma_270m_gguf, n_ctx=512, n_threads=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def runtime(gemma_270m_gguf, tmp_path_factory):
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048,
                     cache_dir=tmp_path_factory.mktemp("prefix")) as rt:
        yield rt


# -- the session -------------------------------------------------------------------

@pytest.mark.slow
def test_rewind_after_a_rejected_draft_matches_a_fresh_evaluation(session):
    prompt = session.tokenize("The capital of France is Paris. The capital of Italy is")
    rejected = session.tokenize(" Berlin, and the")
    correction = session.tokenize(" Rome, and")
    session.clear()
    session.decode(prompt, 1)
    session.decode(rejected, len(rejected))        # a draft verified in one batch...
    session.rewind(len(prompt))                    # ...and refused as a whole
    assert session.tokens == prompt
    after_rewind = session.decode(correction, len(correction))

    session.clear()
    session.decode(prompt, 1)
    fresh = session.decode(correction, len(correction))  # same batch shape, never-touched cache
    assert np.array_equal(after_rewind, fresh)

    session.clear()
    session.decode(prompt, 1)
    one_by_one = np.stack([session.decode([t], 1)[0] for t in correction])
    assert np.abs(one_by_one - fresh).max() < BATCH_NOISE
    assert (one_by_one.argmax(axis=1) == fresh.argmax(axis=1)).all()


@pytest.mark.slow
def test_an_interrupted_decode_leaves_the_cache_consistent(session, monkeypatch):
    import llama_cpp

    prompt = session.tokenize("One, two, three, four")
    session.clear()
    session.decode(prompt, 1)
    real = llama_cpp.llama_decode

    def decode_then_interrupt(ctx, batch):
        real(ctx, batch)  # the batch reached the KV cache...
        raise KeyboardInterrupt  # ...and then Ctrl-C arrived

    monkeypatch.setattr(llama_cpp, "llama_decode", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        session.decode(session.tokenize(", five, six"), 3)
    monkeypatch.setattr(llama_cpp, "llama_decode", real)
    assert session.tokens == prompt
    tail = session.tokenize(", five")
    logits = session.decode(tail, 1)
    session.clear()
    session.decode(prompt, 1)
    assert np.array_equal(logits, session.decode(tail, 1))


@pytest.mark.slow
def test_logits_only_at_chosen_positions(session):
    """decode_at: rows where a draft leaves a choice, none where the grammar forces the token."""
    prompt = session.tokenize("The capital of France is Paris. The capital of Italy is")
    batch = session.tokenize(" Rome, and the capital")
    session.clear()
    session.decode(prompt, 1)
    every = session.decode(batch, len(batch))
    session.rewind(len(prompt))
    some = session.decode_at(batch, [1, 3, len(batch) - 1])
    assert session.tokens == prompt + batch
    # Fewer output rows is another batch shape: equal within the batch noise, same choices.
    assert np.abs(some - every[[1, 3, -1]]).max() < BATCH_NOISE
    assert (some.argmax(axis=1) == every[[1, 3, -1]].argmax(axis=1)).all()
    for bad in ([], [3, 1], [0, len(batch)]):
        with pytest.raises(GenerationError, match="increasing positions"):
            session.decode_at(batch, bad)
    assert session.tokens == prompt + batch  # refused before anything was decoded


@pytest.mark.slow
def test_sync_reuses_the_common_prefix(session):
    a = session.tokenize("Alpha beta gamma delta")
    b = a[:3] + session.tokenize(" epsilon")
    session.clear()
    assert session.sync(a) == 0
    passes = session.forward_passes
    assert session.sync(b) == 3
    assert session.tokens == b and session.forward_passes == passes + 1


# -- the runtime's loop -------------------------------------------------------------

@pytest.mark.slow
def test_abandoned_stream_then_another_call(runtime, tools):
    expected = runtime.call(QUERY, tools, tool_choice="required", max_tokens=40)
    stream = runtime.stream(QUERY, tools, tool_choice="required", max_tokens=40)
    assert isinstance(next(stream), Decoded)
    del stream  # abandoned halfway: no lock may stay held
    done = threading.Event()
    results = []

    def again():
        results.append(runtime.call(QUERY, tools, tool_choice="required", max_tokens=40))
        done.set()

    threading.Thread(target=again, daemon=True).start()
    assert done.wait(120), "the runtime deadlocked after an abandoned stream"
    # The cache held the abandoned stream's tokens: the call keeps only the tool prefix and
    # evaluates the rest after it, as `expected` did, so the tokens are the same (docs/runtime.md).
    again = results[0]
    assert again.finish_reason == "tool_calls"
    assert again.token_ids == expected.token_ids


@pytest.mark.slow
def test_a_call_between_two_deltas_of_a_stream(runtime, tools):
    expected = runtime.call(QUERY, tools, tool_choice="required", max_tokens=40)
    other = runtime.call("What time is it in Tokyo?", tools, tool_choice="get_time", max_tokens=20)
    stream = runtime.stream(QUERY, tools, tool_choice="required", max_tokens=40)
    first = next(stream)
    # The consumer calls back into the runtime while it holds a delta.
    assert runtime.call("What time is it in Tokyo?", tools, tool_choice="get_time",
                        max_tokens=20).raw_text == other.raw_text
    rest = list(stream)
    assert isinstance(first, Decoded) and isinstance(rest[-1], Final)
    final = rest[-1].result
    assert first.text + "".join(e.text for e in rest if isinstance(e, Decoded)) == final.raw_text
    # The stream's tokens were re-evaluated in one batch after the other call,
    # so its KV values carry the batch noise: a near-tie later on may go the
    # other way. The answer is still a complete, valid call of the same tool.
    assert final.tool_calls and final.finish_reason == "tool_calls"
    assert [c.name for c in final.tool_calls] == [c.name for c in expected.tool_calls]


@pytest.mark.slow
def test_cancel_mid_generation_then_the_same_call_again(runtime, tools):
    reference = runtime.call(QUERY, tools, tool_choice="required", max_tokens=40)
    polls = iter(range(100))
    cancelled = runtime.call(QUERY, tools, tool_choice="required", max_tokens=40,
                             should_stop=lambda: next(polls) >= 3)
    assert cancelled.finish_reason == "cancelled"
    assert reference.raw_text.startswith(cancelled.raw_text)
    assert runtime.call(QUERY, tools, tool_choice="required", max_tokens=40).raw_text == reference.raw_text


@pytest.mark.slow
def test_speculative_and_stepwise_agree_and_report_stats(runtime, tools):
    fast = runtime.call(QUERY, tools, tool_choice="required", max_tokens=48)
    slow = runtime.call(QUERY, tools, tool_choice="required", max_tokens=48, speculative=False)
    assert fast.tool_calls == slow.tool_calls
    assert slow.stats["forced_tokens"] == slow.stats["drafted_tokens"] == 0
    assert slow.stats["forward_passes"] >= slow.usage.completion_tokens - 1
    assert fast.stats["forward_passes"] < slow.stats["forward_passes"]
    assert fast.stats["speculative"] is True and "stats" in fast.to_dict()
    # The tool name's first token, ", " or ")" and the end: passes without the output layer.
    assert fast.stats["narrow_passes"] > 0 and slow.stats["narrow_passes"] == 0


@pytest.mark.slow
def test_few_allowed_lists_what_the_grammar_allows(runtime, tools):
    """The llguidance matcher's few_allowed: the tool names' first tokens after "[", None inside a string."""
    from toolgrad_edge.grammars import build_grammar

    gate = runtime.engine._matcher(build_grammar(tools, syntax="python", tool_choice="required"))
    session = runtime.session
    [bracket] = gate.forced_tokens()
    gate.accept(bracket)
    ids = gate.few_allowed(1024)
    assert ids is not None and 0 < len(ids) <= 1024
    assert all(gate.allows(int(t)) for t in ids)
    firsts = {session.tokenize(t.name)[0] for t in tools}
    assert firsts <= set(ids.tolist())
    assert gate.few_allowed(len(ids) - 1) is None  # more than the limit
    masks = gate.full_masks
    for token in session.tokenize('get_weather(city="Par'):
        gate.accept(token)
    assert gate.few_allowed(1024) is None and gate.full_masks == masks  # a probe letter answered: no mask


@pytest.mark.slow
@pytest.mark.parametrize("stop", [[")"], ["="], ["Paris"], ["("]])
def test_stop_strings_never_cut_a_call(runtime, tools, stop):
    result = runtime.call(QUERY, tools, tool_choice="required", max_tokens=48, stop=stop)
    assert result.tool_calls and result.parse_error is None, result.raw_text


@pytest.mark.slow
def test_stop_strings_still_end_text(runtime, tools):
    full = runtime.call(QUERY, tools, tool_choice="none", max_tokens=24)
    word = full.raw_text.split()[1]
    cut = runtime.call(QUERY, tools, tool_choice="none", max_tokens=24, stop=[word])
    assert cut.finish_reason == "stop" and word not in cut.raw_text
    assert full.raw_text.startswith(cut.raw_text)


@pytest.mark.slow
def test_negative_seed(runtime, tools):
    a = runtime.call(QUERY, tools, tool_choice="required", temperature=1.0, seed=-1, max_tokens=32)
    b = runtime.call(QUERY, tools, tool_choice="required", temperature=1.0, seed=2**64 - 1, max_tokens=32)
    assert a.raw_text == b.raw_text


@pytest.mark.slow
def test_llama_grammar_engine_gives_the_same_calls(gemma_270m_gguf, tools, tmp_path, runtime):
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048, cache_dir=tmp_path,
                     grammar_engine="llama") as rt:
        assert rt.grammar_engine == "llama"
        result = rt.call(QUERY, tools, tool_choice="required", max_tokens=48)
        assert result.stats["grammar_engine"] == "llama"
    reference = runtime.call(QUERY, tools, tool_choice="required", max_tokens=48)
    # Each engine forces other tokens in batches, so free-text values may part at a near-tie.
    assert result.finish_reason == reference.finish_reason == "tool_calls"
    assert [(c.name, sorted(c.arguments)) for c in result.tool_calls] == \
        [(c.name, sorted(c.arguments)) for c in reference.tool_calls]


@pytest.mark.slow
def test_the_llama_grammar_engine_refuses_more_tools_than_its_sampler_takes(gemma_270m_gguf, tmp_path):
    from toolgrad_edge.errors import SchemaError

    specs = [{"name": f"tool_{i}", "parameters": {"type": "object"}} for i in range(257)]
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=256, cache_dir=tmp_path, grammar_engine="llama") as rt:
        with pytest.raises(SchemaError, match=r"257 tools given; the llama grammar engine decodes with llama.cpp's "
                                              r"GBNF grammar sampler, which supports at most 256.*llguidance"):
            rt.call("Use tool 1.", specs, tool_choice="required", max_tokens=8)


@pytest.mark.slow
def test_draft_model_with_another_vocabulary_is_refused(gemma_270m_gguf, tmp_path):
    from toolgrad_edge.runtime import DraftModel

    class Target:  # stands for a runtime whose vocabulary differs in one token
        n_ctx, n_threads, n_gpu_layers = 256, 2, 0
        model_path = Path("target.gguf")

        class _session:
            n_vocab = 262144

            @staticmethod
            def piece(token):
                return b"?" if token == 7 else LlamaSession.piece(Target.real, token)

    Target.real = LlamaSession(gemma_270m_gguf, n_ctx=256, n_threads=2)
    try:
        with pytest.raises(ModelLoadError, match="same tokenizer"):
            DraftModel(gemma_270m_gguf, Target())
    finally:
        Target.real.close()


@pytest.mark.slow
def test_draft_model_changes_speed_not_output(gemma_270m_gguf, tools, runtime):
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048, prefix_cache=False,
                     draft_model=gemma_270m_gguf) as rt:
        result = rt.call(QUERY, tools, tool_choice="required", max_tokens=48)
    assert result.stats["drafted_tokens"] > 0
    assert result.raw_text == runtime.call(QUERY, tools, tool_choice="required", max_tokens=48).raw_text


@pytest.mark.slow
def test_a_thousand_tools(runtime):
    from toolgrad_edge.grammar_engines import LarkGrammar
    from toolgrad_edge.grammars import build_llg_grammar

    if runtime.grammar_engine != "llguidance":
        pytest.skip("llguidance is not installed")
    specs = [{"name": f"tool_{i}", "description": "", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x"]}} for i in range(1000)]
    tools = load_tools(specs)
    grammar = LarkGrammar(build_llg_grammar(tools, tool_choice="required"))
    matcher = runtime.engine._matcher(grammar)
    good = runtime.session.tokenize("[tool_999(x=7)]")
    bad = runtime.session.tokenize("[tool_999(x=12)]")
    assert matcher.validate(good) == len(good)
    assert matcher.validate(bad) < len(bad)  # the bound holds while decoding
    for token in runtime.session.tokenize("[tool_99"):
        matcher.accept(token)
    assert matcher.forced_tokens() == []  # tool_99, tool_990 ... tool_999 still fit
    # The context length is the only limit left, and the error says so.
    with pytest.raises(ContextLengthError, match="context"):
        runtime.call("Use tool 999 with x=7.", specs, tool_choice="required", max_tokens=8)


# -- model-free ---------------------------------------------------------------------

def test_a_keyword_checked_after_generation_returns_text_with_parse_error():
    tools = load_tools([{"name": "set_p", "description": "", "parameters": {
        "type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["p"]}}])
    result = result_from_text("[set_p(p=42)]", tools, False, True, "stop", "python")
    assert result.tool_calls == [] and result.finish_reason == "stop"
    assert result.content == "[set_p(p=42)]" and result.parse_error


def test_unknown_grammar_engine():
    from toolgrad_edge.grammar_engines import resolve_engine

    with pytest.raises(GenerationError, match="llguidance, llama"):
        resolve_engine("xgrammar")


def test_missing_llguidance_falls_back_with_one_note(monkeypatch):
    from toolgrad_edge import grammar_engines

    notes = []
    monkeypatch.setattr(grammar_engines, "llguidance_available", lambda: False)
    assert grammar_engines.resolve_engine(None, notes.append) == "llama"
    assert len(notes) == 1 and "llguidance" in notes[0]
    assert llguidance_available() in (True, False)
