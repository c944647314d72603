"""The batched engine (engines/batched.py) on the real Gemma 3 270M: several requests in one context."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from toolgrad_edge import ToolRuntime, load_tools
from toolgrad_edge.bench.agreement import run_together
from toolgrad_edge.engines.batched import BatchedEngine
from toolgrad_edge.errors import ModelLoadError
from toolgrad_edge.prompt import render_prompt
from toolgrad_edge.results import Decoded, Final

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tools.json"
PARALLEL = 4

# Different tools, tool choices and syntaxes side by side.
REQUESTS = [
    dict(query="What is the weather in Paris (celsius) and what time is it in Tokyo?", tool_choice="required"),
    dict(query="What time is it in Lima?", tool_choice="get_time"),
    dict(query="Say hello to Ada in one short sentence.", tool_choice="none", max_tokens=20),
    dict(query="Weather in Oslo in fahrenheit, please.", tool_choice="auto", syntax="json"),
]


@pytest.fixture(scope="module")
def tools():
    return load_tools(EXAMPLES)


@pytest.fixture(scope="module")
def batched(gemma_270m_gguf, tmp_path_factory):
    engine = BatchedEngine(gemma_270m_gguf, parallel=PARALLEL, n_threads=2, n_ctx=2048,
                           cache_dir=tmp_path_factory.mktemp("prefix-batched"))
    with ToolRuntime(engine=engine) as rt:
        yield rt


@pytest.fixture(scope="module")
def alone(gemma_270m_gguf, tmp_path_factory):
    with ToolRuntime(gemma_270m_gguf, n_threads=2, n_ctx=2048,
                     cache_dir=tmp_path_factory.mktemp("prefix-alone")) as rt:
        yield rt


def tool_subset(tools, i):
    """Request i's tools: all of them, or all but one, so that prefixes differ between some requests."""
    return tools if i % 2 == 0 else tools[:2]


def ask(runtime, tools, i, stream=False, **extra):
    spec = dict(REQUESTS[i % len(REQUESTS)])
    spec.update(extra)
    query = spec.pop("query")
    spec.setdefault("max_tokens", 64)
    if not stream:
        return runtime.call(query, tool_subset(tools, i), seed=0, **spec)
    pieces, result = [], None
    for event in runtime.stream(query, tool_subset(tools, i), seed=0, **spec):
        if isinstance(event, Decoded):  # the raw text as it is decoded
            pieces.append(event.text)
        elif isinstance(event, Final):
            result = event.result
    return pieces, result


def concurrently(fns):
    """Run the functions on threads at once; return their results in order (re-raising the first error)."""
    return run_together(fns, "batched-test")


def assert_valid(result, tools):
    by_name = {t.name: t for t in tools}
    for call in result.tool_calls:
        assert call.name in by_name, call
        jsonschema.validate(call.arguments, by_name[call.name].parameters)


def test_concurrent_requests_each_valid_for_their_own_schema(batched, tools):
    out = concurrently([lambda i=i: ask(batched, tools, i, stream=True) for i in range(PARALLEL)])
    for i, (pieces, result) in enumerate(out):
        choice = REQUESTS[i]["tool_choice"]
        assert "".join(pieces) == result.raw_text  # streamed text is the final text
        assert_valid(result, tool_subset(tools, i))
        if choice == "required":
            # A call list, complete or cut by max_tokens (the base model may write a long string argument).
            assert result.raw_text.startswith("[") and (result.tool_calls or result.finish_reason == "length"), \
                result.raw_text
        elif choice == "none":
            assert result.tool_calls == [] and result.content
        elif choice == "get_time":
            assert result.raw_text.startswith("[get_time(") and {c.name for c in result.tool_calls} <= {"get_time"}
            assert result.tool_calls or result.finish_reason == "length", result.raw_text
        assert result.stats["parallel"] == PARALLEL


def test_streamed_equals_non_streamed(batched, tools):
    """One request at a time through the batched engine: the same passes, so the same tokens either way."""
    for i in (0, 3):
        pieces, streamed = ask(batched, tools, i, stream=True)
        assert "".join(pieces) == streamed.raw_text
        assert ask(batched, tools, i).token_ids == streamed.token_ids


NEAR_TIE = 1.0  # logits; batched and one-row passes differ by up to about 0.9 here (REFERENCE.md section 10)


def divergence(alone, tools, i, alone_ids, batched_ids):
    """None where the ids agree; else (position, margin): how far the alone run's choice led the batched run's
    choice in the alone run's own logits at the first position where they differ."""
    k = next((j for j, (a, b) in enumerate(zip(alone_ids, batched_ids)) if a != b), None)
    if k is None:
        return None if len(alone_ids) == len(batched_ids) else (min(len(alone_ids), len(batched_ids)), 0.0)
    spec = REQUESTS[i % len(REQUESTS)]
    parts = render_prompt(spec["query"], load_tools(tool_subset(tools, i)), spec.get("syntax", "python"))
    tokens = alone.tokenize_segments(parts.prefix) + alone.tokenize_segments(parts.rest) + alone_ids[:k]
    session = alone.session
    session.sync(tokens[:-1])
    logits = session.decode(tokens[-1:], 1)[0]
    return k, float(logits[alone_ids[k]] - logits[batched_ids[k]])


def test_batched_answers_match_alone_up_to_near_ties(batched, alone, tools):
    """batch_agreement: each request's greedy ids batched against alone; where they differ, the first
    difference is a near-tie of the alone run's logits (a kernel's rounding by batch size can flip it)."""
    together = concurrently([lambda i=i: ask(batched, tools, i) for i in range(PARALLEL)])
    for i, result in enumerate(together):
        single = ask(alone, tools, i)
        assert_valid(result, tool_subset(tools, i))
        diff = divergence(alone, tools, i, single.token_ids, result.token_ids)
        if diff is not None:
            position, margin = diff
            print(f"request {i}: differs at token {position}, alone's margin {margin:.3f}")
            assert margin < NEAR_TIE, (i, diff, result.raw_text, single.raw_text)


def test_a_request_joining_others_gets_its_answer_alone(batched, alone, tools):
    started = threading.Event()

    def long_text():
        polls = {"n": 0}

        def should_stop():
            polls["n"] += 1
            if polls["n"] == 4:
                started.set()  # the long requests are decoding
            return False

        return batched.call("Write a long poem about the sea.", tools, tool_choice="none", max_tokens=60,
                            should_stop=should_stop)

    def joiner():
        assert started.wait(120)
        return ask(batched, tools, 0)

    _, _, joined = concurrently([long_text, long_text, joiner])
    single = ask(alone, tools, 0)
    diff = divergence(alone, tools, 0, single.token_ids, joined.token_ids)
    assert diff is None or diff[1] < NEAR_TIE, (diff, joined.raw_text, single.raw_text)


def test_shared_prefix_is_evaluated_once(gemma_270m_gguf, tools, tmp_path):
    engine = BatchedEngine(gemma_270m_gguf, parallel=PARALLEL, n_threads=2, n_ctx=2048, cache_dir=tmp_path)
    with ToolRuntime(engine=engine) as rt:
        prefix_len = len(rt.tokenize_segments(render_prompt("x", load_tools(tools), "python").prefix))
        results = concurrently([lambda i=i: rt.call(f"What time is it in city number {i}?", tools,
                                                    tool_choice="required", max_tokens=24)
                                for i in range(PARALLEL)])
        stats = engine.stats
    assert stats["prefix_evaluations"] == 1 and stats["prefix_copies"] == PARALLEL
    assert sorted(r.usage.cached_tokens for r in results) == [0] + [prefix_len] * (PARALLEL - 1)
    # Evaluated: the prefix once, each prompt's rest, and at most the output plus drafts per request.
    rest = sum(r.usage.prompt_tokens - prefix_len for r in results)
    out = sum(r.usage.completion_tokens + r.stats["drafted_tokens"] + 1 for r in results)
    assert stats["evaluated_tokens"] <= prefix_len + rest + out
    assert stats["evaluated_tokens"] < 2 * prefix_len  # not evaluated again per request


def test_a_cancelled_request_frees_its_sequence_and_the_others_finish(batched, tools):
    engine = batched.engine
    polls = {"n": 0}

    def stop_soon():
        polls["n"] += 1
        return polls["n"] > 3

    def cancelled():
        return batched.call("Write a long poem about the sea.", tools, tool_choice="none", max_tokens=60,
                            should_stop=stop_soon)

    results = concurrently([cancelled] + [lambda i=i: ask(batched, tools, i) for i in range(2)])
    assert results[0].finish_reason == "cancelled"
    for i, r in enumerate(results[1:]):
        assert r.finish_reason in ("tool_calls", "stop", "length") and (r.tool_calls or r.content)
    assert sorted(engine._free) == list(range(PARALLEL)) and engine._reserved == 0
    assert all(engine._session.sequence_length(seq) == 0 for seq in range(PARALLEL))


def test_more_requests_than_sequences_wait_then_run(gemma_270m_gguf, tools, tmp_path):
    engine = BatchedEngine(gemma_270m_gguf, parallel=2, n_threads=2, n_ctx=1024, cache_dir=tmp_path)
    admitted, most = [0], [0]
    admit, release = engine._admit, engine._release

    def counting_admit(*a):
        seq = admit(*a)
        admitted[0] += 1
        most[0] = max(most[0], admitted[0])
        return seq

    def counting_release(*a):
        admitted[0] -= 1
        release(*a)

    engine._admit, engine._release = counting_admit, counting_release
    with ToolRuntime(engine=engine) as rt:
        results = concurrently([lambda i=i: rt.call(f"What time is it in city {i}?", tools,
                                                    tool_choice="get_time", max_tokens=24) for i in range(3)])
    assert most[0] == 2
    for r in results:
        assert r.tool_calls and r.tool_calls[0].name == "get_time"


def test_refuses_one_sequence_and_a_draft_model(gemma_270m_gguf):
    with pytest.raises(ModelLoadError, match="--parallel 1"):
        BatchedEngine(gemma_270m_gguf, parallel=1)
    with pytest.raises(ModelLoadError, match="draft model"):
        BatchedEngine(gemma_270m_gguf, parallel=2, draft_model=gemma_270m_gguf)


def test_through_the_server_each_client_gets_its_own_tool_and_a_gone_client_frees_its_sequence(batched):
    """The real server over the batched engine: clients forcing different tools at once (half streamed) each
    get a valid call of their own tool; a streaming client that leaves after its first chunk frees its sequence."""
    import httpx

    from test_server_e2e import SCHEMAS, TOOLS, serving
    from toolgrad_edge.server import ServerSettings, create_app

    names = list(SCHEMAS)
    engine = batched.engine

    def body(name, stream, max_tokens=48):
        return {"model": "local", "messages": [{"role": "user", "content": "Weather in Paris, time in Tokyo?"}],
                "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": name}},
                "parallel_tool_calls": False, "max_tokens": max_tokens, "temperature": 0, "stream": stream}

    def one(k, url):
        name = names[k % len(names)]
        with httpx.Client(timeout=600) as http:
            if k % 2 == 0:
                message = http.post(url + "/v1/chat/completions", json=body(name, False)).json()
                calls = [(c["function"]["name"], c["function"]["arguments"])
                         for c in message["choices"][0]["message"]["tool_calls"]]
            else:
                calls = {}
                with http.stream("POST", url + "/v1/chat/completions", json=body(name, True)) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            for choice in json.loads(line[6:])["choices"]:
                                for tc in (choice.get("delta") or {}).get("tool_calls") or []:
                                    slot = calls.setdefault(tc["index"], ["", ""])
                                    slot[0] += tc.get("function", {}).get("name") or ""
                                    slot[1] += tc.get("function", {}).get("arguments") or ""
                calls = [tuple(v) for _, v in sorted(calls.items())]
        return name, calls

    def leaver(url):
        with httpx.Client(timeout=600) as http:
            with http.stream("POST", url + "/v1/chat/completions",
                             json={**body(names[0], True, 200), "tool_choice": "none"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        return True  # leave after the first chunk: the connection closes
        return False

    with serving(create_app(batched, ServerSettings(max_queue=16))) as url:
        results = concurrently([lambda k=k: one(k, url) for k in range(PARALLEL - 1)] + [lambda: leaver(url)])
        deadline = time.monotonic() + 120
        while (len(engine._free) < PARALLEL or engine._reserved) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name, calls in results[:-1]:
        assert len(calls) == 1 and calls[0][0] == name, calls
        jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[name])
    assert results[-1] is True
    assert sorted(engine._free) == list(range(PARALLEL)) and engine._reserved == 0


def test_narrow_rows_match_the_output_layer_and_skip_it_when_every_row_is_narrow(batched):
    """A pass whose logits rows all ask for a few tokens stops after the final norm; the head's values for
    those tokens equal llama.cpp's logits (the first such pass runs whole and checks every row)."""
    import numpy as np

    from toolgrad_edge.engines.scheduler import Slice, Submission

    engine = batched.engine
    session = engine._session
    if not session.narrow:
        pytest.skip("the output head is off on this kernel path (doctor's 'narrow head' line says why)")
    prompt = session.tokenize("The weather in Paris is")
    ids = [np.array(session.tokenize(w)[:1] + [236761, 236764], dtype=np.int64) for w in (" sunny", " cold", " wet")]

    def one_pass(narrow):
        with engine._ctx_lock:
            for seq in range(3):
                session.remove(seq)
            plan = [Slice(Submission(seq, prompt[: len(prompt) - seq], 0, [len(prompt) - seq - 1]), 0,
                          len(prompt) - seq, (len(prompt) - seq - 1,)) for seq in range(3)]
            out = session.run(plan, {k: ids[k] for k in range(3)} if narrow else None)
            for seq in range(3):
                session.remove(seq)
        return out

    full = one_pass(narrow=False)
    hidden_before = session.hidden_passes
    session._verify_head = True  # check the head again on this pass's three rows (earlier tests checked one)
    first, second = one_pass(narrow=True), one_pass(narrow=True)  # the first is checked against a whole pass
    assert session.head_check is not None and session.head_check["ok"], session.head_check
    assert session.head_check["sequences"] == 3
    assert session.hidden_passes == hidden_before + 1  # the second skipped the output layer
    for k in range(3):
        assert first[k].shape == second[k].shape == (len(ids[k]),)
        np.testing.assert_allclose(second[k], full[k][0][ids[k]], atol=1e-3)
        np.testing.assert_allclose(first[k], full[k][0][ids[k]], atol=1e-3)


def test_a_pass_with_one_full_row_still_gives_the_narrow_rows_the_heads_values(batched):
    import numpy as np

    from toolgrad_edge.engines.scheduler import Slice, Submission

    engine = batched.engine
    session = engine._session
    prompt = session.tokenize("Book a table for two")
    few = np.array([236761, 236764, 107], dtype=np.int64)

    def one_pass(narrow):
        with engine._ctx_lock:
            for seq in range(2):
                session.remove(seq)
            plan = [Slice(Submission(seq, prompt, 0, [len(prompt) - 1]), 0, len(prompt), (len(prompt) - 1,))
                    for seq in range(2)]
            out = session.run(plan, narrow)
            for seq in range(2):
                session.remove(seq)
        return out

    whole = one_pass(None)
    hidden_before = session.hidden_passes
    out = one_pass({1: few})
    assert session.hidden_passes == hidden_before  # a full row: the output layer ran for the pass
    assert out[0].shape == (1, session.n_vocab) and out[1].shape == (len(few),)
    np.testing.assert_array_equal(out[0], whole[0])
    np.testing.assert_allclose(out[1], whole[1][0][few], atol=1e-3)  # the head's values, from the same pass


def test_requests_use_hidden_only_passes_where_their_grammar_allows_few_tokens(batched, tools):
    before = batched.engine.stats["hidden_passes"]
    result = ask(batched, tools, 1)  # get_time forced: its arguments leave few tokens at most steps
    assert_valid(result, tool_subset(tools, 1))
    if batched.engine._session.narrow:
        assert result.stats["narrow_passes"] > 0
        assert batched.engine.stats["hidden_passes"] > before



def test_a_head_that_does_not_match_llama_cpp_is_turned_off_and_narrow_rows_read_the_logits(gemma_270m_gguf, tmp_path):
    """Where the head's check fails (another kernel path's rounding), every later pass computes the output
    layer and narrow rows take llama.cpp's own logits at their ids."""
    import numpy as np

    from toolgrad_edge.engines.scheduler import Slice, Submission

    engine = BatchedEngine(gemma_270m_gguf, parallel=2, n_threads=2, n_ctx=512, cache_dir=tmp_path)
    try:
        session = engine._session
        if not session.narrow:
            pytest.skip("the output head is off on this kernel path already")
        session.HEAD_TOLERANCE = -1.0  # no head can pass: as if it rounded otherwise than the kernels
        prompt = session.tokenize("The weather in Paris is")
        few = np.array([236761, 236764, 107], dtype=np.int64)

        def one_pass(narrow):
            with engine._ctx_lock:
                session.remove(0)
                plan = [Slice(Submission(0, prompt, 0, [len(prompt) - 1]), 0, len(prompt), (len(prompt) - 1,))]
                out = session.run(plan, narrow)
                session.remove(0)
            return out

        whole = one_pass(None)[0][0]
        checked = one_pass({0: few})[0]
        assert session.head_check is not None and not session.head_check["ok"]
        assert not session.narrow  # off from now on
        after = one_pass({0: few})[0]
        assert session.hidden_passes == 0
        np.testing.assert_array_equal(after, whole[few])
        np.testing.assert_array_equal(checked, whole[few])
    finally:
        engine.close()
