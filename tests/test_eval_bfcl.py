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
            timings=SimpleNamespace(total_s=0.25),
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
    }
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


def _fake_checker(monkeypatch, tmp_path):
    from toolgrad_edge.evaluate import checker_env

    env = SimpleNamespace(python=Path("python"), root=tmp_path / "env", data_dir=DATA, version="test")
    monkeypatch.setattr(checker_env, "ensure_checker_env", lambda *a, **k: env)
    monkeypatch.setattr(bfcl, "score_results", lambda env_, data_dir, out_dir, categories: {
        "bfcl_eval": "test", "categories": {
            c: {"n": 1, "correct": 0, "accuracy": 0.0, "with_calls": 1, "valid_calls": 1} for c in categories}})


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
    _fake_checker(monkeypatch, tmp_path)
    seen, rep = _tool_choices_per_category(monkeypatch, tmp_path, tool_choice="required")
    assert set(seen) == set(CATEGORIES)
    relevance = {"irrelevance", "live_irrelevance", "live_relevance"}
    assert {c for c, choices in seen.items() if choices == {"auto"}} == relevance
    assert {c for c, choices in seen.items() if choices == {"required"}} == set(CATEGORIES) - relevance
    assert rep["tool_choice"] == "required" and rep["speculative"] is True
    assert "tool choice required (relevance categories: auto)" in report.format_table(rep)


def test_auto_is_the_default_everywhere(tmp_path, monkeypatch):
    _fake_checker(monkeypatch, tmp_path)
    seen, rep = _tool_choices_per_category(monkeypatch, tmp_path)
    assert all(choices == {"auto"} for choices in seen.values()) and len(seen) == len(CATEGORIES)
    assert rep["tool_choice"] == "auto"


def test_resume_key_separates_tool_choice_and_speculation(tmp_path, monkeypatch):
    _fake_checker(monkeypatch, tmp_path)
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

    _fake_checker(monkeypatch, tmp_path)
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
