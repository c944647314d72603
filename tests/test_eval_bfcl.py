"""BFCL evaluation without a model or the checker: data, result files, resume, report, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from toolgrad_edge.cli import main
from toolgrad_edge.errors import ContextLengthError, EvaluationError
from toolgrad_edge.evaluate import bfcl, report
from toolgrad_edge.evaluate.bfcl import (
    CATEGORIES,
    PYTHON_HINT,
    calls_to_python,
    check_manifest,
    load_entries,
    parse_categories,
    read_results,
    result_file,
    run_category,
)

DATA = Path(__file__).parent / "data" / "bfcl_eval_questions"


# --- categories and data ------------------------------------------------------------------

def test_parse_categories_all_and_order():
    assert parse_categories(None) == list(CATEGORIES)
    assert parse_categories("all") == list(CATEGORIES)
    assert parse_categories("live_relevance, simple_python") == ["simple_python", "live_relevance"]
    assert len(CATEGORIES) == 11


def test_parse_categories_unknown_names_them_and_lists_valid():
    with pytest.raises(EvaluationError) as err:
        parse_categories("simple_python,simple_java,multi_turn_base")
    msg = str(err.value)
    assert "simple_java, multi_turn_base" in msg and "live_parallel_multiple" in msg


def test_load_entries_prepares_as_bfcl_generation():
    entries = load_entries(DATA, "simple_python", limit=2)
    assert [e.id for e in entries] == ["simple_python_0", "simple_python_1"]
    first = entries[0]
    assert first.messages == [{"role": "user", "content": "Find the area of a triangle with a base of 10 units and height of 5 units."}]
    assert first.functions[0]["description"].endswith(PYTHON_HINT)
    # The question file itself is untouched (descriptions get the hint once, per load).
    again = load_entries(DATA, "simple_python", limit=1)[0]
    assert again.functions[0]["description"].count(PYTHON_HINT) == 1


def test_load_entries_missing_file_says_where(tmp_path):
    with pytest.raises(EvaluationError, match="BFCL_v4_simple_python.json not found"):
        load_entries(tmp_path, "simple_python")


def test_consecutive_user_messages_are_merged(tmp_path):
    raw = {"id": "x_0", "question": [[{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                      {"role": "user", "content": "b"}]], "function": []}
    (tmp_path / "BFCL_v4_live_simple.json").write_text(json.dumps(raw) + "\n")
    (entry,) = load_entries(tmp_path, "live_simple")
    assert entry.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "a\n\nb"}]


def test_calls_to_python_is_what_bfcl_decodes():
    text = calls_to_python([
        {"name": "math.hypot", "arguments": {"x": 4, "y": 5.5}},
        {"name": "f", "arguments": '{"s": "it\'s", "flag": true, "none": null, "xs": [1, "a"], "d": {"k": false}}'},
    ])
    assert text == "[math.hypot(x=4, y=5.5), f(s=\"it's\", flag=True, none=None, xs=[1, 'a'], d={'k': False})]"
    assert calls_to_python([]) == "[]"


# --- result files and resume ------------------------------------------------------------------

# As CallResult.stats: 8 tokens in 4 forward passes, 3 of 4 drafted tokens accepted.
STATS = {"forward_passes": 4, "forced_tokens": 2, "drafted_tokens": 4, "accepted_tokens": 3, "full_masks": 0,
         "tokens_per_forward": 2.0, "draft_acceptance": 0.75, "grammar_engine": "llguidance", "speculative": True}
TOKEN_IDS = [236840, 46285, 236779, 10884, 236769, 236749, 236770, 236842]


class FakeRuntime:
    """Answers with a fixed call; records which entries it was asked."""

    def __init__(self, fail_on=()):
        self.asked: list[str] = []
        self.fail_on = set(fail_on)
        self.model_path = Path("fake.gguf")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def call(self, messages, tools, **kwargs):
        self.asked.append(messages[-1]["content"])
        if messages[-1]["content"] in self.fail_on:
            raise ContextLengthError("the prompt is 9000 tokens and max_tokens is 512, which exceeds 8192")
        call = SimpleNamespace(name=tools[0]["name"], arguments={"n": 1})
        return SimpleNamespace(
            tool_calls=[call], raw_text=f"[{tools[0]['name']}(n=1)]", finish_reason="tool_calls",
            usage=SimpleNamespace(prompt_tokens=100, completion_tokens=8),
            timings=SimpleNamespace(total_s=0.25), stats=dict(STATS), token_ids=list(TOKEN_IDS),
        )


def test_run_category_writes_bfcl_result_lines(tmp_path):
    entries = load_entries(DATA, "simple_python")
    rt = FakeRuntime()
    records = run_category(rt, entries, tmp_path, constrained=True, syntax="python", max_tokens=64)
    lines = result_file(tmp_path, "simple_python").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [e.id for e in entries]
    first = json.loads(lines[0])
    assert first["result"] == "[calculate_triangle_area(n=1)]"
    assert first["latency"] == 0.25 and first["input_token_count"] == 100
    assert len(records) == 3


def test_records_keep_decoding_stats_and_token_ids(tmp_path):
    entries = load_entries(DATA, "simple_python", limit=1)
    run_category(FakeRuntime(), entries, tmp_path, constrained=True, syntax="python", max_tokens=64)
    (record,) = read_results(result_file(tmp_path, "simple_python")).values()
    assert record["stats"] == STATS and record["token_ids"] == TOKEN_IDS
    assert record["output_token_count"] == len(TOKEN_IDS)  # the completion token count
    # What BFCL's checker reads is unchanged.
    assert record["id"] == "simple_python_0" and record["result"] == "[calculate_triangle_area(n=1)]"


class RemoteLikeRuntime(FakeRuntime):
    """As ToolRuntime over llama-server: no decoding stats, no token ids, yet a completion count."""

    def call(self, messages, tools, **kwargs):
        res = super().call(messages, tools, **kwargs)
        res.stats, res.token_ids = {}, []
        return res


def test_records_leave_out_stats_and_token_ids_the_runtime_does_not_have(tmp_path):
    entries = load_entries(DATA, "simple_python", limit=1)
    (record,) = run_category(RemoteLikeRuntime(), entries, tmp_path, constrained=True, syntax="python",
                             max_tokens=64)
    assert "stats" not in record and "token_ids" not in record and record["output_token_count"] == 8


def test_json_syntax_results_are_rewritten_as_python_calls(tmp_path):
    entries = load_entries(DATA, "simple_python", limit=1)
    records = run_category(FakeRuntime(), entries, tmp_path, constrained=True, syntax="json", max_tokens=64)
    assert records[0]["result"] == "[calculate_triangle_area(n=1)]"


def test_interrupted_run_resumes_from_result_file(tmp_path):
    entries = load_entries(DATA, "simple_python")
    path = result_file(tmp_path, "simple_python")
    done = {"id": entries[0].id, "result": "[kept()]", "latency": 1.0}
    # One complete record, then a line torn by the interruption.
    path.write_text(json.dumps(done) + "\n" + '{"id": "simple_python_1", "res')
    rt = FakeRuntime()
    records = run_category(rt, entries, tmp_path, constrained=True, syntax="python", max_tokens=64)
    assert len(rt.asked) == 2  # only the two missing entries ran
    assert records[0]["result"] == "[kept()]"
    assert list(read_results(path)) == [e.id for e in entries]
    # A second run has nothing left to do.
    rt2 = FakeRuntime()
    run_category(rt2, entries, tmp_path, constrained=True, syntax="python", max_tokens=64)
    assert rt2.asked == []


def test_inference_errors_are_recorded_as_bfcl_does(tmp_path):
    entries = load_entries(DATA, "simple_python", limit=2)
    rt = FakeRuntime(fail_on={entries[1].messages[-1]["content"]})
    records = run_category(rt, entries, tmp_path, constrained=True, syntax="python", max_tokens=64)
    assert records[1]["result"].startswith("Error during inference: the prompt is 9000 tokens")
    assert records[1]["error"] == "ContextLengthError"


def test_out_dir_of_another_configuration_is_refused(tmp_path):
    check_manifest(tmp_path, {"model": "a.gguf", "grammar": True, "syntax": "python", "max_tokens": 512})
    check_manifest(tmp_path, {"model": "a.gguf", "grammar": True, "syntax": "python", "max_tokens": 512})
    with pytest.raises(EvaluationError, match="holds results of another run"):
        check_manifest(tmp_path, {"model": "a.gguf", "grammar": False, "syntax": "python", "max_tokens": 512})


def test_evaluate_bfcl_runs_then_scores(tmp_path, monkeypatch):
    """The whole flow with a fake runtime and a fake checker (the real one: test_eval_checker.py)."""
    from toolgrad_edge.evaluate import checker_env

    env = SimpleNamespace(python=Path("python"), root=tmp_path / "env", data_dir=DATA, version="test")
    monkeypatch.setattr(checker_env, "ensure_checker_env", lambda *a, **k: env)
    seen = {}

    def fake_score(env_, data_dir, out_dir, categories):
        seen["files"] = sorted(p.name for p in Path(out_dir).glob("BFCL_v4_*_result.json"))
        return {"bfcl_eval": "test", "categories": {
            c: {"n": 1, "correct": 1, "accuracy": 1.0, "with_calls": 1, "valid_calls": 1} for c in categories}}

    monkeypatch.setattr(bfcl, "score_results", fake_score)
    ticks = []
    out = bfcl.evaluate_bfcl(
        None, categories="simple_python,irrelevance", limit=1, out_dir=tmp_path / "out",
        runtime_factory=FakeRuntime, progress=lambda done, total, e: ticks.append((done, total)),
    )
    assert seen["files"] == ["BFCL_v4_irrelevance_result.json", "BFCL_v4_simple_python_result.json"]
    assert ticks == [(1, 2), (2, 2)]
    assert out["grammar"] is True and out["limit"] == 1
    assert out["categories"]["simple_python"] == {
        "accuracy": 1.0, "n": 1, "correct": 1, "valid_call_rate": 1.0, "valid_calls": 1, "with_calls": 1,
        "mean_latency_s": 0.25, "latency_total_s": 0.25, "inference_errors": 0,
        "tokens_per_forward": 2.0, "draft_acceptance": 0.75,
    }
    assert out["summary"]["tokens_per_forward"] == 2.0 and out["summary"]["draft_acceptance"] == 0.75
    assert out["summary"]["non_live"]["overall"] is None  # only one of the four non-live categories ran
    assert json.loads((tmp_path / "out" / "run.json").read_text())["model"] == "fake.gguf"


# --- report -----------------------------------------------------------------------------

def _cat(acc, n):
    return {"accuracy": acc, "n": n, "correct": round(acc * n), "valid_calls": n, "latency_total_s": n * 1.0}


def test_summary_reproduces_toolgrad_model_card_overall():
    """ToolGrad 4B's per-category scores (REFERENCE.md) -> its published overall figures."""
    cats = {
        "simple_python": _cat(0.6533, 400), "multiple": _cat(0.8650, 200), "parallel": _cat(0.7300, 200),
        "parallel_multiple": _cat(0.6500, 200),
        # v3 live counts: 258 / 1053 / 16 / 24
        "live_simple": _cat(0.7132, 258), "live_multiple": _cat(0.6486, 1053),
        "live_parallel": _cat(0.4375, 16), "live_parallel_multiple": _cat(0.5000, 24),
    }
    s = report.summarize(cats)
    assert round(100 * s["non_live"]["overall"], 2) == 72.46
    assert round(100 * s["live"]["overall"], 2) == 65.58
    assert s["irrelevance"] is None and s["relevance"] is None


def test_irrelevance_is_unweighted_mean_and_latency_is_per_entry():
    s = report.summarize({"irrelevance": _cat(0.5, 240), "live_irrelevance": _cat(0.7, 882), "live_relevance": _cat(1.0, 16)})
    assert s["irrelevance"] == pytest.approx(0.6)
    assert s["relevance"] == 1.0
    assert s["valid_call_rate"] == 1.0  # only live_relevance expects calls here
    assert s["mean_latency_s"] == 1.0 and s["n_entries"] == 240 + 882 + 16


def _record(i, tokens, passes, drafted, accepted):
    return {"id": f"simple_python_{i}", "result": "[f()]", "output_token_count": tokens,
            "stats": {"forward_passes": passes, "drafted_tokens": drafted, "accepted_tokens": accepted}}


def _checker_scores(categories):
    return {"bfcl_eval": "test", "categories": {
        c: {"n": n, "correct": 0, "accuracy": 0.0, "with_calls": n, "valid_calls": n} for c, n in categories.items()}}


def test_report_sums_decoding_figures_over_the_records():
    records = {
        "simple_python": [_record(0, 10, 4, 6, 6), _record(1, 2, 2, 0, 0)],
        "multiple": [{**_record(0, 30, 10, 10, 2), "id": "multiple_0"}],
    }
    rep = report.build_report(model="m", grammar=True, syntax="python", limit=None, out_dir="o",
                              checker=_checker_scores({"simple_python": 2, "multiple": 1}), records=records)
    simple = rep["categories"]["simple_python"]
    assert simple["tokens_per_forward"] == 2.0 and simple["draft_acceptance"] == 1.0  # 12 / 6, 6 / 6
    assert rep["summary"]["tokens_per_forward"] == 42 / 16 and rep["summary"]["draft_acceptance"] == 8 / 16
    assert "decoding: 2.62 tokens per forward pass, draft acceptance 50.0 %" in report.format_table(rep)


def test_older_result_files_without_stats_still_resume_and_report(tmp_path):
    """Result files written before stats and token_ids were recorded: read, resumed, reported as n/a."""
    entries = load_entries(DATA, "simple_python")
    old = [{"id": e.id, "result": "[f()]", "latency": 1.0, "input_token_count": 90, "output_token_count": 3,
            "finish_reason": "tool_calls"} for e in entries[:2]]
    result_file(tmp_path, "simple_python").write_text("".join(json.dumps(r) + "\n" for r in old))
    rt = FakeRuntime()
    records = run_category(rt, entries, tmp_path, constrained=True, syntax="python", max_tokens=64)
    assert len(rt.asked) == 1 and records[:2] == old and records[2]["stats"] == STATS
    # Only the new record has stats: the figures are its own.
    assert report.decoding_figures(records) == {"tokens_per_forward": 2.0, "draft_acceptance": 0.75}
    rep = report.build_report(model="m", grammar=True, syntax="python", limit=None, out_dir="o",
                              checker=_checker_scores({"simple_python": 3}), records={"simple_python": old})
    assert rep["summary"]["tokens_per_forward"] is None and rep["summary"]["draft_acceptance"] is None
    assert "decoding:" not in report.format_table(rep)


def test_first_token_differences_compares_two_runs_token_by_token(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    runs = {a: [("s_0", [1, 2, 3]), ("s_1", [1, 2, 3]), ("s_2", [5, 6]), ("s_3", None)],
            b: [("s_0", [1, 2, 3]), ("s_1", [1, 9, 3]), ("s_2", [5, 6, 7]), ("s_3", [4])]}
    for folder, records in runs.items():
        folder.mkdir()
        lines = [{"id": i, "result": "[f()]", **({"token_ids": t} if t is not None else {})} for i, t in records]
        result_file(folder, "simple_python").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # Same text, other tokens (s_1) is found; a longer output parts where the shorter ends (s_2);
    # an entry without token_ids on one side (an older file) is left out (s_3).
    assert bfcl.first_token_differences(a, b, ["simple_python"]) == {"simple_python": {"s_1": 1, "s_2": 2}}
    assert bfcl.differing_results(a, b, ["simple_python"]) == {"simple_python": []}


@pytest.mark.slow
def test_bfcl_checker_scores_records_with_the_new_fields_as_before(tmp_path):
    from test_eval_checker import env_candidates, find_env_or_skip

    env = find_env_or_skip(env_candidates())
    entries = load_entries(DATA, "simple_python")
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    run_category(FakeRuntime(), entries, new, constrained=True, syntax="python", max_tokens=64)
    lines = result_file(new, "simple_python").read_text().splitlines()
    assert all("token_ids" in json.loads(line) for line in lines)
    result_file(old, "simple_python").write_text("".join(
        json.dumps({k: json.loads(line)[k] for k in ("id", "result")}) + "\n" for line in lines))
    new_scores = bfcl.score_results(env, DATA, new, ["simple_python"])
    assert new_scores["categories"] == bfcl.score_results(env, DATA, old, ["simple_python"])["categories"]
    assert new_scores["categories"]["simple_python"]["n"] == len(entries)


def test_table_has_the_seed_layout():
    cats = {c: {**_cat(0.5, 2), "with_calls": 2, "mean_latency_s": 1.0, "inference_errors": 0,
                "valid_call_rate": 1.0} for c in CATEGORIES}
    rep = {"model": "m.gguf", "grammar": False, "syntax": "python", "limit": 2, "out_dir": "o",
           "bfcl_eval": "2026.3.23", "categories": cats, "summary": {**report.summarize(cats), "wall_s": 3.0}}
    table = report.format_table(rep)
    header = next(line for line in table.splitlines() if "Simple" in line)
    assert header.split() == ["Simple", "Multi", "Par", "MultiPar", "Overall"]
    assert "Non-live" in table and "Live" in table and "Relevance" in table and "Irrelevance" in table
    assert "grammar off" in table and "first 2 per category" in table
    assert "valid-call rate 100.00 %" in table
    assert "| Non-live | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 |" in report.format_markdown(rep)


# --- CLI errors ------------------------------------------------------------------------

def test_cli_unknown_category():
    result = CliRunner().invoke(main, ["eval", "bfcl", "--categories", "simple_jav"])
    assert result.exit_code == 1
    assert "Unknown BFCL category simple_jav" in result.output
    assert "Traceback" not in result.output


def test_cli_missing_model(tmp_path):
    result = CliRunner().invoke(main, ["eval", "bfcl", "--model", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 1
    assert "nope.gguf does not exist" in result.output


def test_cli_unreachable_checker_env(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    result = CliRunner().invoke(main, [
        "eval", "bfcl", "--model", str(model), "--checker-env", str(tmp_path / "no-env"), "--no-create-env",
    ])
    assert result.exit_code == 1
    assert "No BFCL checker environment at" in result.output and "no-env" in result.output


def test_cli_help_has_examples():
    result = CliRunner().invoke(main, ["eval", "bfcl", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "--no-grammar" in result.output


# --- forced-call mode (--tool-choice required) and --no-speculative ------------------------

class RecordingRuntime(FakeRuntime):
    """A FakeRuntime that records the tool_choice of every call, by category."""

    def __init__(self, **options):
        super().__init__()
        self.options = options
        self.tool_choices: dict[str, set[str]] = {}
        self.category = None

    def call(self, messages, tools, **kwargs):
        self.tool_choices.setdefault(self.category, set()).add(kwargs["tool_choice"])
        return super().call(messages, tools, **kwargs)


def fake_checker(monkeypatch, tmp_path, n: int = 1, correct: int = 0):
    """BFCL's checker environment and scores stood in for: every category scores ``correct`` of ``n``."""
    from toolgrad_edge.evaluate import checker_env

    env = SimpleNamespace(python=Path("python"), root=tmp_path / "env", data_dir=DATA, version="test")
    monkeypatch.setattr(checker_env, "ensure_checker_env", lambda *a, **k: env)
    monkeypatch.setattr(bfcl, "score_results", lambda env_, data_dir, out_dir, categories: {
        "bfcl_eval": "test", "categories": {
            c: {"n": n, "correct": correct, "accuracy": correct / n, "with_calls": n, "valid_calls": n}
            for c in categories}})


def _tool_choices_per_category(monkeypatch, tmp_path, **kwargs):
    rt = RecordingRuntime()
    real_run_category = bfcl.run_category

    def run_category_noting(runtime, entries, *args, **kw):
        runtime.category = entries[0].category
        return real_run_category(runtime, entries, *args, **kw)

    monkeypatch.setattr(bfcl, "run_category", run_category_noting)
    rep = bfcl.evaluate_bfcl(None, limit=1, out_dir=tmp_path / kwargs.get("tool_choice", "auto"),
                             runtime_factory=lambda: rt, **kwargs)
    return rt.tool_choices, rep


def test_required_reaches_the_runtime_in_ast_categories_only(tmp_path, monkeypatch):
    fake_checker(monkeypatch, tmp_path)
    seen, rep = _tool_choices_per_category(monkeypatch, tmp_path, tool_choice="required")
    assert set(seen) == set(CATEGORIES)
    relevance = {"irrelevance", "live_irrelevance", "live_relevance"}
    assert {c for c, choices in seen.items() if choices == {"auto"}} == relevance
    assert {c for c, choices in seen.items() if choices == {"required"}} == set(CATEGORIES) - relevance
    assert rep["tool_choice"] == "required" and rep["speculative"] is True
    assert "tool choice required (relevance categories: auto)" in report.format_table(rep)


def test_auto_is_the_default_everywhere(tmp_path, monkeypatch):
    fake_checker(monkeypatch, tmp_path)
    seen, rep = _tool_choices_per_category(monkeypatch, tmp_path)
    assert all(choices == {"auto"} for choices in seen.values()) and len(seen) == len(CATEGORIES)
    assert rep["tool_choice"] == "auto"


def test_resume_key_separates_tool_choice_and_speculation(tmp_path, monkeypatch):
    fake_checker(monkeypatch, tmp_path)
    out = tmp_path / "out"

    def run(**kwargs):
        rt = RecordingRuntime()
        bfcl.evaluate_bfcl(None, categories="simple_python", limit=1, out_dir=out, runtime_factory=lambda: rt,
                           **kwargs)
        return rt

    assert len(run(tool_choice="required").asked) == 1
    assert run(tool_choice="required").asked == []  # same mode: resumed, nothing to do
    with pytest.raises(EvaluationError, match="holds results of another run"):
        run(tool_choice="auto")
    with pytest.raises(EvaluationError, match="'speculative': False"):
        run(tool_choice="required", speculative=False)
    assert json.loads((out / "run.json").read_text())["tool_choice"] == "required"
    # The default folders differ too, so runs of different modes never meet.
    names = {bfcl.default_run_name("m.gguf", grammar=True, syntax="python", tool_choice=t, speculative=s)
             for t in ("auto", "required") for s in (True, False)}
    assert names == {"m-grammar-python", "m-grammar-python-required", "m-grammar-python-stepwise",
                     "m-grammar-python-required-stepwise"}


def test_manifest_written_before_these_keys_resumes_as_auto_speculative(tmp_path):
    old = {"model": "a.gguf", "grammar": True, "syntax": "python", "max_tokens": 512}
    (tmp_path / "run.json").write_text(json.dumps(old))
    check_manifest(tmp_path, {**old, "tool_choice": "auto", "speculative": True})
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(EvaluationError, match="holds results of another run"):
        check_manifest(tmp_path, {**old, "tool_choice": "required", "speculative": True})


def test_required_needs_the_grammar(tmp_path):
    with pytest.raises(EvaluationError, match="needs the grammar"):
        bfcl.evaluate_bfcl(None, tool_choice="required", grammar=False, out_dir=tmp_path)
    with pytest.raises(EvaluationError, match="Unknown tool choice 'none'"):
        bfcl.evaluate_bfcl(None, tool_choice="none", out_dir=tmp_path)


def test_no_speculative_reaches_the_runtime_only_when_it_has_the_option(tmp_path, monkeypatch):
    import toolgrad_edge.runtime as runtime_module

    fake_checker(monkeypatch, tmp_path)
    made = []

    class SpeculativeRuntime(RecordingRuntime):
        def __init__(self, model=None, n_ctx=None, n_threads=None, prefix_cache=True, speculative="not passed"):
            super().__init__(speculative=speculative, prefix_cache=prefix_cache)
            made.append(self)

    class OlderRuntime(RecordingRuntime):
        def __init__(self, model=None, n_ctx=None, n_threads=None, prefix_cache=True):
            super().__init__(prefix_cache=prefix_cache)
            made.append(self)

    monkeypatch.setattr(runtime_module, "ToolRuntime", SpeculativeRuntime)
    bfcl.evaluate_bfcl(None, categories="simple_python", limit=1, out_dir=tmp_path / "a", speculative=False)
    bfcl.evaluate_bfcl(None, categories="simple_python", limit=1, out_dir=tmp_path / "b")
    assert [rt.options for rt in made] == [{"speculative": False, "prefix_cache": False},
                                           {"speculative": "not passed", "prefix_cache": False}]

    monkeypatch.setattr(runtime_module, "ToolRuntime", OlderRuntime)
    bfcl.evaluate_bfcl(None, categories="simple_python", limit=1, out_dir=tmp_path / "c")  # the default needs nothing
    with pytest.raises(EvaluationError, match="no speculative decoding to turn off"):
        bfcl.evaluate_bfcl(None, categories="simple_python", limit=1, out_dir=tmp_path / "d", speculative=False)


def test_differing_results_compares_outputs_of_two_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, second in ((a, "[g(x=1)]"), (b, "[g(x=2)]")):
        folder.mkdir()
        result_file(folder, "simple_python").write_text(
            json.dumps({"id": "s_0", "result": "[f()]"}) + "\n" + json.dumps({"id": "s_1", "result": second}) + "\n")
    result_file(a, "multiple").write_text(json.dumps({"id": "m_0", "result": "[h()]"}) + "\n")
    assert bfcl.differing_results(a, b, ["simple_python", "multiple"]) == {"simple_python": ["s_1"], "multiple": []}


def test_cli_passes_tool_choice_and_speculation(tmp_path, monkeypatch):
    seen = {}

    def fake_evaluate(model, **kwargs):
        seen.update(kwargs)
        raise EvaluationError("stop here")

    monkeypatch.setattr(bfcl, "evaluate_bfcl", fake_evaluate)
    result = CliRunner().invoke(main, ["eval", "bfcl", "--tool-choice", "required", "--no-speculative"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen["tool_choice"] == "required" and seen["speculative"] is False
    CliRunner().invoke(main, ["eval", "bfcl"])
    assert seen["tool_choice"] == "auto" and seen["speculative"] is True


def test_cli_required_without_grammar_is_one_clear_error(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    result = CliRunner().invoke(main, ["eval", "bfcl", "--model", str(model), "--tool-choice", "required",
                                       "--no-grammar"])
    assert result.exit_code == 1 and "needs the grammar" in result.output and "Traceback" not in result.output
    help_text = CliRunner().invoke(main, ["eval", "bfcl", "--help"]).output
    assert "--tool-choice" in help_text and "live_relevance, which keep auto" in " ".join(help_text.split())
