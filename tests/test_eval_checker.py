"""BFCL's official checker (in its own environment) on canned outputs with known scores.

The environment is found ($TOOLGRAD_EDGE_BFCL_ENV, or benchmarks/bfcl/env in
this checkout); tests never reach the network, so without one the test is
skipped and says how to build it (`toolgrad-edge eval bfcl` builds it on first use).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from toolgrad_edge.errors import EvaluationError
from toolgrad_edge.evaluate import checker_env, report
from toolgrad_edge.evaluate.bfcl import CATEGORIES, score_results

HERE = Path(__file__).parent
QUESTIONS = HERE / "data" / "bfcl_eval_questions"
RESULTS = HERE / "data" / "bfcl_eval_results"

# Canned outputs in tests/data/bfcl_eval_results -> (correct, n, outputs with calls, of them schema-valid)
EXPECTED = {
    "simple_python": (2, 3, 3, 3),        # wrong value for math.hypot
    "multiple": (1, 2, 1, 1),             # plain text where a call was due
    "parallel": (1, 2, 2, 2),             # one call of two
    "parallel_multiple": (1, 2, 2, 2),    # fenced, reordered: right; string for a float: wrong
    "irrelevance": (1, 2, 1, 1),          # text: right; a call: wrong
    "live_simple": (2, 2, 2, 2),
    "live_multiple": (1, 2, 2, 1),        # missing required new_preferences
    "live_parallel": (1, 1, 1, 1),
    "live_parallel_multiple": (0, 1, 0, 0),  # "[]"
    "live_irrelevance": (1, 2, 1, 1),     # "[]" counts as no call
    "live_relevance": (1, 2, 1, 1),
}


def env_candidates() -> list[Path]:
    explicit = os.environ.get(checker_env.ENV_CHECKER)
    return ([Path(explicit)] if explicit else []) + [HERE.parent / "benchmarks" / "bfcl" / "env"]


def find_env_or_skip(candidates: list[Path]):
    """The first ready checker environment among ``candidates``; skip the test (never build one) if none."""
    for root in candidates:
        found = checker_env.find_checker_env(root)
        if found is not None:
            return found
    pytest.skip(f"no BFCL checker environment (looked in {', '.join(map(str, candidates))}); building one needs "
                "PyPI, which tests never use: build it once (`toolgrad-edge eval bfcl` does on first use), "
                f"then point ${checker_env.ENV_CHECKER} at it")


@pytest.fixture(scope="session")
def bfcl_env():
    return find_env_or_skip(env_candidates())


@pytest.mark.slow
def test_official_checker_scores_canned_outputs(bfcl_env):
    scores = score_results(bfcl_env, QUESTIONS, RESULTS, list(CATEGORIES))
    assert scores["bfcl_eval"] == bfcl_env.version
    got = {
        c: (s["correct"], s["n"], s["with_calls"], s["valid_calls"]) for c, s in scores["categories"].items()
    }
    assert got == EXPECTED
    errors = {e["id"]: e["error_type"] for s in scores["categories"].values() for e in s["entries"]}
    assert errors["simple_python_2"] == "value_error:others"
    assert errors["multiple_1"] == "ast_decoder:decoder_failed"
    assert errors["irrelevance_1"] == "irrelevance_error:decoder_success"
    assert errors["live_relevance_1-1-0"] == "relevance_error:decoder_failed"

    records = {c: [json.loads(line) for line in (RESULTS / f"BFCL_v4_{c}_result.json").open()] for c in CATEGORIES}
    rep = report.build_report(model="canned", grammar=True, syntax="python", limit=None, out_dir=str(RESULTS),
                              checker=scores, records=records)
    s = rep["summary"]
    assert s["non_live"]["overall"] == pytest.approx((2 / 3 + 0.5 + 0.5 + 0.5) / 4)
    assert s["live"]["overall"] == pytest.approx((2 + 1 + 1 + 0) / 6)  # weighted by count
    assert s["irrelevance"] == 0.5 and s["relevance"] == 0.5
    assert s["valid_call_rate"] == pytest.approx(13 / 17)
    assert s["n_entries"] == 21 and s["correct"] == 12


def test_checker_env_not_found_without_create(tmp_path):
    assert checker_env.find_checker_env(tmp_path / "env") is None
    with pytest.raises(EvaluationError, match="No BFCL checker environment"):
        checker_env.ensure_checker_env(tmp_path / "env", create=False)


def test_default_env_dir_follows_cache(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(checker_env.ENV_CHECKER, raising=False)  # CI sets it for the checker tests
    assert checker_env.default_env_dir().name == "bfcl-env"
    monkeypatch.setenv(checker_env.ENV_CHECKER, str(tmp_path / "mine"))
    assert checker_env.default_env_dir() == tmp_path / "mine"


def test_missing_checker_env_is_a_skip_not_a_build(tmp_path, monkeypatch):
    """Without an environment the checker test skips, saying how to build one, and builds nothing."""
    def no_build(*args, **kwargs):
        raise AssertionError("a test must not build the checker environment (that needs PyPI)")

    monkeypatch.setattr(checker_env, "create_checker_env", no_build)
    (tmp_path / "partial" / "bin").mkdir(parents=True)  # an interrupted build: no ready marker
    with pytest.raises(pytest.skip.Exception, match="toolgrad-edge eval bfcl"):
        find_env_or_skip([tmp_path / "absent", tmp_path / "partial"])
    assert not (tmp_path / "absent").exists()


def test_checker_env_command_prints_a_ready_environment(bfcl_env):
    from click.testing import CliRunner

    from toolgrad_edge.cli import main

    result = CliRunner().invoke(main, ["eval", "checker-env", "--path", str(bfcl_env.root)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(bfcl_env.root)
    assert f"bfcl-eval {bfcl_env.version}" in result.stderr


def test_checker_env_command_reports_a_failed_build(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from toolgrad_edge.cli import main

    def offline(root, **kwargs):
        raise EvaluationError("could not install bfcl-eval==2026.3.23: no route to PyPI")

    monkeypatch.setattr(checker_env, "create_checker_env", offline)
    result = CliRunner().invoke(main, ["eval", "checker-env", "--path", str(tmp_path / "env")])
    assert result.exit_code == 1
    assert "no route to PyPI" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "env").exists()
