"""Side-by-side bench: quality maths, reference choice, report and CLI, without measuring a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toolgrad_edge.bench import compare as bench_compare
from toolgrad_edge.bench import measure as bench
from toolgrad_edge.bench.compare import (
    QualityStats,
    compare_models,
    format_markdown,
    format_table,
    kl_divergence,
    log_softmax,
    pick_reference,
    quality_prompts,
)
from toolgrad_edge.cli import main
from toolgrad_edge.errors import EvaluationError


def test_log_softmax_normalizes_and_survives_large_logits():
    lp = log_softmax(np.array([1000.0, 1000.0, -1000.0]))
    assert np.exp(lp).sum() == pytest.approx(1.0)
    assert lp[0] == pytest.approx(np.log(0.5))


def test_kl_divergence_known_values():
    p = np.log(np.array([0.5, 0.5]))
    q = np.log(np.array([0.9, 0.1]))
    assert float(kl_divergence(p, p)) == 0.0
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert float(kl_divergence(p, q)) == pytest.approx(expected)
    assert float(kl_divergence(q, p)) != pytest.approx(expected)  # KL(ref || file) is not symmetric


def test_quality_stats_top1_and_mean_kl():
    stats = QualityStats()
    ref = log_softmax(np.array([3.0, 1.0, 0.0]))
    stats.add(ref, ref)
    stats.add(ref, log_softmax(np.array([0.0, 3.0, 1.0])))
    d = stats.to_dict()
    assert d["positions"] == 2 and d["top1_agreement"] == 0.5
    assert d["mean_kl"] == pytest.approx(float(kl_divergence(ref, log_softmax(np.array([0.0, 3.0, 1.0])))) / 2)


def test_reference_is_the_highest_precision_file():
    files = [
        {"quant": "Q4_K_M", "file_size_bytes": 250}, {"quant": "BF16", "file_size_bytes": 540},
        {"quant": "Q8_0", "file_size_bytes": 290}, {"quant": "F16", "file_size_bytes": 540},
    ]
    assert pick_reference(files) == 1
    assert pick_reference(files[2:3] + files[0:1]) == 0
    # An unknown type falls back to bits per weight from size and parameter count.
    odd = [{"quant": "TQ1_0", "file_size_bytes": 200, "n_params": 1000}, {"quant": "Q2_K", "file_size_bytes": 300}]
    assert pick_reference(odd) == 1
    with pytest.raises(EvaluationError):
        pick_reference([])


def test_quality_prompts_are_bfcl_prompts_with_answers():
    prompts = quality_prompts()
    assert len(prompts) == 8
    assert {p.id.rsplit("_", 1)[0] for p in prompts} >= {"simple_python", "multiple", "parallel"}
    for p in prompts:
        assert p.answer.startswith("[") and p.answer.endswith(")]")
        assert p.messages[-1]["role"] == "user" and p.functions


def _fake_measure(path, **kwargs):
    base = 30.0 if "Q4" in path.name else 20.0
    if kwargs.get("progress"):
        kwargs["progress"](f"{path.name}: decode run 0/1", 1)
    return {"model": str(path), "quant": "ignored", "prefill_tps": 400.0, "decode_tps_free": base,
            "decode_tps_constrained": base * 0.8, "decode_tps_baseline": base * 0.2, "ttft_cold_s": 3.0,
            "ttft_warm_s": 0.05, "peak_rss_bytes": 600 * 2**20, "n_threads": 2, "backend": "cpu",
            "cpu": "Test CPU", "prompt_tokens": 1500, "ratios": {"constrained_vs_baseline": 4.0}}


@pytest.fixture
def two_files(tmp_path, monkeypatch):
    files = {tmp_path / "m-BF16.gguf": ("BF16", 540), tmp_path / "m-Q4_K_M.gguf": ("Q4_K_M", 250)}
    for p, (_, size) in files.items():
        p.write_bytes(b"\0" * size)
    monkeypatch.setattr(bench_compare, "describe_file", lambda p: {
        "model": str(p), "quant": files[Path(p)][0], "file_size_bytes": files[Path(p)][1], "n_params": 100})
    return list(files)


def test_compare_models_measures_each_and_scores_against_reference(two_files):
    seen = {}

    def fake_quality(reference, others, **kwargs):
        seen["reference"], seen["others"] = reference, others
        return {str(reference): {"positions": 10, "top1_agreement": 1.0, "mean_kl": 0.0},
                **{str(o): {"positions": 10, "top1_agreement": 0.9, "mean_kl": 0.0123} for o in others}}

    ticks = []
    report = compare_models(list(reversed(two_files)), runs=1, measure=_fake_measure, quality_fn=fake_quality,
                            progress=lambda label, n: ticks.append(label))
    assert seen["reference"] == two_files[0] and seen["others"] == [two_files[1]]
    assert report["reference"] == str(two_files[0])
    q4 = report["models"][0]
    assert q4["quant"] == "Q4_K_M" and q4["quality"]["mean_kl"] == 0.0123
    assert report["machine"]["cpu"] == "Test CPU" and report["machine"]["threads"] == 2
    assert len(ticks) == 2

    table = format_table(report)
    assert "m-BF16.gguf (ref)" in table and "0.0123" in table and "90.0%" in table and "4.00x" in table
    assert "Test CPU, 2 threads" in table
    md = format_markdown(report)
    assert md.count("\n| ") == 3 and "| constr/base |" in md
    json.dumps(report)  # serializable


def test_compare_models_rejects_missing_and_duplicate_files(two_files, tmp_path):
    with pytest.raises(EvaluationError, match="not found"):
        compare_models([tmp_path / "nope.gguf"], measure=_fake_measure)
    with pytest.raises(EvaluationError, match="twice"):
        compare_models([two_files[0], two_files[0]], measure=_fake_measure)


def test_single_file_has_no_quality_columns(two_files):
    report = compare_models(two_files[:1], runs=1, measure=_fake_measure)
    assert "quality" not in report["models"][0] and report["quality_prompts"] == 0
    assert "(ref)" not in format_table(report)


def test_plot_writes_png_or_says_how_to_install(two_files, tmp_path):
    report = compare_models(two_files, runs=1, measure=_fake_measure, quality=False)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(EvaluationError, match=r"toolgrad-edge\[bench\]"):
            bench_compare.plot(report, tmp_path / "p.png")
        return
    out = bench_compare.plot(report, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_compares_files(two_files, monkeypatch):
    monkeypatch.setattr(bench, "measure_in_subprocess", lambda draft_model=None, grammar_engine=None: _fake_measure)
    monkeypatch.setattr(bench_compare, "compare_quality", lambda ref, others, **k: {
        str(p): {"positions": 3, "top1_agreement": 1.0, "mean_kl": 0.0} for p in [ref, *others]})
    args = ["bench", "-m", str(two_files[0]), "-m", str(two_files[1]), "--runs", "1"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["quant"] for m in report["models"]] == ["BF16", "Q4_K_M"]
    result = CliRunner().invoke(main, args + ["--markdown"])
    assert result.exit_code == 0 and "| m-Q4_K_M.gguf | Q4_K_M |" in result.stdout


def test_cli_bench_usage_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--quant", "Q8_0"])
    assert result.exit_code == 2 and "--quant needs --from" in result.output
    result = runner.invoke(main, ["bench", "-m", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 1 and "missing.gguf" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["bench", "--help"])
    assert "Examples:" in result.output and "--plot" in result.output


@pytest.mark.slow
def test_quality_of_a_file_against_itself_is_perfect(gemma_270m_gguf):
    prompts = quality_prompts()[:1]
    scores = bench_compare.compare_quality(gemma_270m_gguf, [gemma_270m_gguf], prompts, n_threads=2)
    (only,) = scores.values()
    assert only["positions"] > 5
    assert only["top1_agreement"] == 1.0 and only["mean_kl"] == pytest.approx(0.0, abs=1e-6)
