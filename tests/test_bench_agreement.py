"""`bench --batch-agreement N`: the bench's requests alone and N at once on the batched engine, token by token."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from toolgrad_edge.bench import agreement
from toolgrad_edge.cli import main


def test_a_call_list_cut_by_max_tokens_counts_by_its_complete_calls():
    from types import SimpleNamespace as R

    assert agreement._valid(R(tool_calls=[1], parse_error=None, finish_reason="tool_calls"))
    assert agreement._valid(R(tool_calls=[1], parse_error="cut", finish_reason="length"))
    assert not agreement._valid(R(tool_calls=[], parse_error="cut", finish_reason="length"))  # first call cut
    assert not agreement._valid(R(tool_calls=[], parse_error="bad", finish_reason="stop"))


def test_first_difference():
    assert agreement._first_difference([1, 2, 3], [1, 2, 3]) is None
    assert agreement._first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert agreement._first_difference([1, 2], [1, 2, 3]) == 2  # one extends the other


@pytest.mark.parametrize("extra, named", [
    (["--engine", "http://127.0.0.1:9"], "--engine"),
    (["--draft-model", __file__], "--draft-model"),
    (["--plot", "x.png"], "--plot"),
])
def test_batch_agreement_refuses_what_it_cannot_measure(extra, named):
    result = CliRunner().invoke(main, ["bench", "--batch-agreement", "2", *extra])
    assert result.exit_code == 2 and named in result.output and "--batch-agreement" in result.output


def test_batch_agreement_needs_two_requests():
    result = CliRunner().invoke(main, ["bench", "--batch-agreement", "1"])
    assert result.exit_code == 2 and "--batch-agreement" in result.output


def test_batch_agreement_report_formats():
    request = {"query": 0, "identical": False, "first_difference": 7, "alone_tokens": 20, "batched_tokens": 22,
               "alone_finish": "tool_calls", "batched_finish": "length",
               "engine_alone_identical": True, "valid": True, "alone_text": "[a(x=1)]", "batched_text": "[a(x=2)]"}
    same = {"query": 1, "identical": True, "first_difference": None, "alone_tokens": 18, "batched_tokens": 18,
            "engine_alone_identical": True, "valid": True}
    report = {"machine": {"cpu": "cpu"}, "parallel": 2, "max_tokens": 64, "models": [{
        "model_name": "m", "parallel": 2, "requests": [request, same], "identical": 1, "batch_agreement": 0.5,
        "engine_alone_identical": 2, "engine_alone_agreement": 1.0, "invalid_decodes": 0, "batched_passes": 30,
        "mean_tokens_per_pass": 1.9}]}
    text = agreement.format_table(report)
    assert "m: batch_agreement: 1 of 2 identical" in text
    assert "query 0: differs from token 7 (alone 20 tokens; batched 22 tokens, cut by max tokens)" in text
    assert "query 1: identical (18 tokens)" in text and "'[a(x=2)]'" in text
    assert "batch_agreement: 1 of 2 identical" in agreement.format_markdown(report)


def test_batch_agreement_on_the_demo_model(gemma_270m_gguf):
    result = CliRunner().invoke(main, ["bench", "-m", str(gemma_270m_gguf), "--batch-agreement", "2",
                                       "--threads", "2", "--max-tokens", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parallel"] == 2 and len(report["models"]) == 1
    (model,) = report["models"]
    assert [r["query"] for r in model["requests"]] == [0, 1]
    for r in model["requests"]:
        # Every decode (alone, batched engine alone, at once) is a valid call list (complete calls, each
        # checked against its schema; one cut by max_tokens counts by the calls it completed).
        assert r["valid"] and "invalid" not in r
        assert {r["alone_finish"], r["batched_finish"]} <= {"tool_calls", "length"}
        assert r["alone_tokens"] > 0 and r["batched_tokens"] > 0
        assert r["identical"] == (r["first_difference"] is None)
        if not r["identical"]:
            assert 0 <= r["first_difference"] <= min(r["alone_tokens"], r["batched_tokens"])
    assert model["identical"] == sum(r["identical"] for r in model["requests"])
    assert model["batch_agreement"] == model["identical"] / 2 and model["invalid_decodes"] == 0
    assert model["batched_passes"] > 0 and model["mean_tokens_per_pass"] >= 1
    text = agreement.format_table(report)
    assert f"batch_agreement: {model['identical']} of 2 identical" in text
