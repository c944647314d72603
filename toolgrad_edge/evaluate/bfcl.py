"""BFCL v1+v2 single-turn evaluation: run entries through ToolRuntime, score with BFCL.

Question data is read from bfcl-eval's data folder (the checker
environment's installed ``bfcl_eval/data``, or any folder with the same
layout). Each entry goes through ``ToolRuntime.call`` in the ToolGrad prompt
format; the raw outputs are written as BFCL result files
(``BFCL_v4_{category}_result.json``, one JSON line per entry with ``id`` and
``result``) so BFCL's own tooling reads them, and they are scored by BFCL's
official checker running in its own environment (checker_runner.py). A
record also keeps the call's decoding statistics (``stats``) and generated
``token_ids``, which BFCL ignores, so two runs compare token by token.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ContextLengthError, EvaluationError, GenerationError, SchemaError
from .categories import (CALL_CATEGORIES, CATEGORIES, INFERENCE_ERROR_PREFIX, LIVE, NON_LIVE,  # noqa: F401
                         RELEVANCE_CATEGORIES)

VERSION_PREFIX = "BFCL_v4"

# --tool-choice: "auto" (calls or text, BFCL's setting) or "required" (the
# grammar forces a call list). "required" applies to the AST categories only:
# the relevance categories measure whether the model *decides* to call, so
# they always run with "auto".
TOOL_CHOICES = ("auto", "required")

# BFCL's generation step appends this to every Python function's description
# (bfcl_eval.utils._get_language_specific_hint); the model saw it in training.
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."

RUN_MANIFEST = "run.json"


@dataclass(frozen=True)
class BfclEntry:
    """One single-turn BFCL question: chat messages and the functions offered."""

    id: str
    category: str
    messages: list[dict]
    functions: list[dict]


def parse_categories(spec: str | Iterable[str] | None) -> list[str]:
    """Category names from a comma list (or "all"/None), validated, in CATEGORIES order."""
    if spec is None:
        return list(CATEGORIES)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names or names == ["all"]:
        return list(CATEGORIES)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        raise EvaluationError(
            f"Unknown BFCL categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"expected a comma-separated list of: {', '.join(CATEGORIES)} (or 'all')."
        )
    return [c for c in CATEGORIES if c in names]


def category_tool_choice(category: str, tool_choice: str) -> str:
    """The tool_choice an entry of ``category`` runs with under the run's ``tool_choice``."""
    return "auto" if category in RELEVANCE_CATEGORIES else tool_choice


def question_file(data_dir: Path, category: str) -> Path:
    return Path(data_dir) / f"{VERSION_PREFIX}_{category}.json"


def result_file(out_dir: Path, category: str) -> Path:
    return Path(out_dir) / f"{VERSION_PREFIX}_{category}_result.json"


def load_entries(data_dir: Path, category: str, limit: int | None = None) -> list[BfclEntry]:
    """The first ``limit`` entries of a category, prepared as BFCL's generation step does."""
    path = question_file(data_dir, category)
    if not path.is_file():
        raise EvaluationError(
            f"BFCL question file {path} not found; expected bfcl-eval's data folder "
            f"(with {VERSION_PREFIX}_<category>.json files). Pass --data-dir or let the "
            "command use the checker environment's copy."
        )
    entries = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(entries) >= limit:
                break
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                entries.append(_prepare_entry(raw, category))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise EvaluationError(f"{path}:{line_no}: not a BFCL single-turn entry ({exc}).") from None
    return entries


def _prepare_entry(raw: dict, category: str) -> BfclEntry:
    functions = copy.deepcopy(raw["function"])
    for function in functions:
        function["description"] = function.get("description", "") + PYTHON_HINT
    # Single-turn entries hold one turn; BFCL merges consecutive user messages.
    messages: list[dict] = []
    for message in raw["question"][0]:
        if messages and message["role"] == "user" and messages[-1]["role"] == "user":
            messages[-1] = {"role": "user", "content": messages[-1]["content"] + "\n\n" + message["content"]}
        else:
            messages.append({"role": message["role"], "content": message["content"]})
    return BfclEntry(id=raw["id"], category=category, messages=messages, functions=functions)


# --- model output -> BFCL result text ---------------------------------------------------

def calls_to_python(calls: Iterable) -> str:
    """Calls (ToolCall objects or {"name", "arguments"} dicts) in BFCL's python call-list form."""
    rendered = []
    for call in calls:
        name = call["name"] if isinstance(call, dict) else call.name
        args = call["arguments"] if isinstance(call, dict) else call.arguments
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        rendered.append(f"{name}({', '.join(f'{k}={_python_literal(v)}' for k, v in args.items())})")
    return "[" + ", ".join(rendered) + "]"


def _python_literal(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    return repr(value)  # str, int, float, bool, None: Python literals BFCL's ast decoder reads


def result_text(call_result, syntax: str) -> str:
    """What goes into the result file: what the model wrote, in the syntax BFCL decodes.

    With the python syntax that is the raw text itself (BFCL decodes it); the
    JSON syntax's calls are rewritten as a python call list.
    """
    if syntax == "python" or not call_result.tool_calls:
        return call_result.raw_text
    return calls_to_python(call_result.tool_calls)


# --- result files (resumable) -------------------------------------------------------------

def read_results(path: Path) -> dict[str, dict]:
    """Records already written, by id. A torn last line (interrupted write) is dropped."""
    records: dict[str, dict] = {}
    if not Path(path).is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and "result" in record:
                records[record["id"]] = record
    return records


def _rewrite(path: Path, records: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def run_entry(runtime, entry: BfclEntry, *, constrained: bool, syntax: str, max_tokens: int,
              tool_choice: str = "auto", should_stop: Callable[[], bool] | None = None) -> dict:
    """One entry through the runtime -> one result-file record.

    should_stop (batched runs): polled by the engine before every step; a
    record of a call it stopped is incomplete, and the caller drops it.
    """
    start = time.perf_counter()
    options = {} if should_stop is None else {"should_stop": should_stop}
    try:
        res = runtime.call(
            entry.messages, entry.functions, tool_choice=category_tool_choice(entry.category, tool_choice),
            parallel=True, syntax=syntax, max_tokens=max_tokens, temperature=0.0, constrained=constrained,
            **options,
        )
    except (ContextLengthError, SchemaError, GenerationError) as exc:
        # BFCL's generation step records a failed inference as text and scores it as such.
        return {
            "id": entry.id, "result": INFERENCE_ERROR_PREFIX + str(exc),
            "latency": time.perf_counter() - start, "error": type(exc).__name__,
        }
    record = {
        "id": entry.id,
        "result": result_text(res, syntax),
        "latency": res.timings.total_s,
        "input_token_count": res.usage.prompt_tokens,
        "output_token_count": res.usage.completion_tokens,
        "finish_reason": res.finish_reason,
    }
    stats = getattr(res, "stats", None)
    if stats:
        record["stats"] = dict(stats)
    # Only when they are the whole output (a runtime over llama-server reports none).
    token_ids = getattr(res, "token_ids", None)
    if token_ids is not None and len(token_ids) == res.usage.completion_tokens:
        record["token_ids"] = list(token_ids)
    return record


def run_category(
    runtime,
    entries: list[BfclEntry],
    out_dir: Path,
    *,
    constrained: bool,
    syntax: str,
    max_tokens: int,
    tool_choice: str = "auto",
    on_entry: Callable[[BfclEntry, dict], None] | None = None,
    parallel: int = 1,
) -> list[dict]:
    """Run the entries not yet in the category's result file; return all records in entry order.

    Each record is appended and flushed as soon as it exists, so an
    interrupted run resumes where it stopped. parallel > 1: that many
    entries at once, each on its own thread calling the runtime (which
    decodes them together: ToolRuntime(parallel=N)); see _run_concurrently.
    """
    if not entries:
        return []
    path = result_file(out_dir, entries[0].category)
    done = read_results(path)
    wanted = {e.id for e in entries}
    # Drop torn lines and records of entries outside this run before appending.
    _rewrite(path, [done[e.id] for e in entries if e.id in done])
    if parallel > 1:
        _run_concurrently(runtime, [e for e in entries if e.id not in done], path, done, parallel,
                          dict(constrained=constrained, syntax=syntax, max_tokens=max_tokens,
                               tool_choice=tool_choice), on_entry, skipped=[e for e in entries if e.id in done])
        # Completion order is the threads' race: rewrite in entry order, as a serial run leaves the file.
        _rewrite(path, [done[e.id] for e in entries if e.id in done])
        return [done[e.id] for e in entries if e.id in wanted]
    with open(path, "a", encoding="utf-8") as f:
        for entry in entries:
            if entry.id in done:
                if on_entry:
                    on_entry(entry, done[entry.id])
                continue
            record = run_entry(runtime, entry, constrained=constrained, syntax=syntax, max_tokens=max_tokens,
                               tool_choice=tool_choice)
            f.write(json.dumps(record) + "\n")
            f.flush()
            done[entry.id] = record
            if on_entry:
                on_entry(entry, record)
    return [done[e.id] for e in entries if e.id in wanted]


def _run_concurrently(runtime, todo: list[BfclEntry], path: Path, done: dict[str, dict], parallel: int,
                      options: dict, on_entry, skipped: list[BfclEntry]) -> None:
    """Run ``todo`` on ``parallel`` worker threads; append each record to ``path`` as it completes.

    Only this (the calling) thread writes, whole lines, flushed, so the file
    never holds a torn record. At most ``parallel`` entries are in flight.
    On an interruption (Ctrl-C, an error) the calls in flight are cancelled
    through should_stop and their records dropped (a cancelled call's output
    is cut short), the rest never start, and the exception goes on once the
    threads have stopped: the file holds only complete records, and a rerun
    resumes from them.
    """
    import concurrent.futures as cf
    import threading

    if on_entry:
        for entry in skipped:
            on_entry(entry, done[entry.id])
    stop = threading.Event()
    pending = iter(todo)
    with open(path, "a", encoding="utf-8") as f, \
            cf.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="bfcl-entry") as pool:
        in_flight: dict[cf.Future, BfclEntry] = {}

        def submit_next() -> None:
            entry = next(pending, None)
            if entry is not None:
                in_flight[pool.submit(run_entry, runtime, entry, should_stop=stop.is_set, **options)] = entry

        try:
            for _ in range(parallel):
                submit_next()
            while in_flight:
                finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    entry = in_flight.pop(future)
                    record = future.result()
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    done[entry.id] = record
                    if on_entry:
                        on_entry(entry, record)
                    submit_next()
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# What makes two runs' outputs comparable: a folder's results are resumed only
# by a run that agrees on all of these. A key missing from an older run.json
# takes the value that older runs had.
MANIFEST_KEYS = ("model", "grammar", "syntax", "max_tokens", "tool_choice", "speculative")
MANIFEST_DEFAULTS = {"tool_choice": "auto", "speculative": True}


def check_manifest(out_dir: Path, manifest: dict) -> None:
    """Refuse to resume into a folder holding another configuration's results."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        theirs = {k: previous.get(k, MANIFEST_DEFAULTS.get(k)) for k in MANIFEST_KEYS}
        ours = {k: manifest.get(k, MANIFEST_DEFAULTS.get(k)) for k in MANIFEST_KEYS}
        if theirs != ours:
            raise EvaluationError(
                f"{out_dir} holds results of another run ({theirs}), not of this one ({ours}). "
                "Choose another --out, or delete that folder to start over."
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def differing_results(out_a: Path, out_b: Path, categories: Iterable[str]) -> dict[str, list[str]]:
    """Ids, per category, of the entries that both folders hold with different outputs.

    Used to check that a decoding change (e.g. --no-speculative) changes no
    answer: the "result" texts are compared exactly.
    """
    differing = {}
    for c in categories:
        a, b = read_results(result_file(out_a, c)), read_results(result_file(out_b, c))
        differing[c] = [i for i in a if i in b and a[i]["result"] != b[i]["result"]]
    return differing


def first_token_differences(out_a: Path, out_b: Path, categories: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per category, ``{id: index of the first token where the two runs part}`` for the
    entries both folders hold with different ``token_ids`` (entries without them, as in
    result files written before they were recorded, are left out).

    Unlike ``differing_results`` this also finds the same text reached through other tokens.
    """
    differing = {}
    for c in categories:
        a, b = read_results(result_file(out_a, c)), read_results(result_file(out_b, c))
        differing[c] = {}
        for i, record in a.items():
            ta, tb = record.get("token_ids"), b.get(i, {}).get("token_ids")
            if ta is None or tb is None or ta == tb:
                continue
            differing[c][i] = next((n for n, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    return differing


# --- scoring (in the checker environment) -------------------------------------------------

def score_results(checker_env, data_dir: Path, out_dir: Path, categories: list[str]) -> dict:
    """Score the result files in ``out_dir`` with BFCL's checker; its JSON as a dict."""
    runner = Path(__file__).with_name("checker_runner.py")
    cmd = [
        str(checker_env.python), str(runner), "--data-dir", str(data_dir),
        "--results-dir", str(out_dir), "--categories", ",".join(categories),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise EvaluationError(f"Could not start the BFCL checker {checker_env.python}: {exc}.") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise EvaluationError(
            f"BFCL's checker failed (exit {proc.returncode}) on the results in {out_dir}:\n{tail}\n"
            f"Delete {checker_env.root} to rebuild the checker environment if it is broken."
        )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise EvaluationError(f"BFCL's checker printed no JSON scores; stdout was: {proc.stdout[-500:]!r}") from None


# --- the whole evaluation ------------------------------------------------------------------

def default_run_name(model_path, *, grammar: bool, syntax: str, tool_choice: str = "auto",
                     speculative: bool = True) -> str:
    """``<model>-<grammar|free>-<syntax>[-required][-stepwise]``: one folder per configuration."""
    name = f"{Path(model_path).stem}-{'grammar' if grammar else 'free'}-{syntax}"
    if tool_choice != "auto":
        name += f"-{tool_choice}"
    if not speculative:
        name += "-stepwise"
    return name


def evaluate_bfcl(
    model: str | os.PathLike | None = None,
    *,
    categories: str | Iterable[str] | None = None,
    limit: int | None = None,
    grammar: bool = True,
    syntax: str = "python",
    tool_choice: str = "auto",
    speculative: bool = True,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    checker_env_dir: str | os.PathLike | None = None,
    create_env: bool = True,
    max_tokens: int = 512,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    engine: str | None = None,
    parallel: int = 1,
    runtime_factory: Callable | None = None,
    progress: Callable[[int, int, BfclEntry], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run BFCL categories through the runtime and score them with BFCL's checker.

    tool_choice="required" forces a call list in every category but the
    relevance ones (see TOOL_CHOICES); speculative=False asks the runtime for
    one token per forward pass (no jump-forward or drafts); engine: a
    llama-server's URL to decode on (ToolRuntime's ``engine``). parallel:
    entries run at once, each on its own thread; in process they decode
    together in one batched engine (``ToolRuntime(parallel=N)``), on a
    llama-server in its slots. Results are the serial run's files, in the same
    order; a batched pass can flip a greedy near-tie, so answers may differ
    from a serial run's (docs/evaluation.md).

    Returns the report: ``{"model", "grammar", "syntax", "tool_choice",
    "speculative", "limit", "out_dir", "bfcl_eval", "categories": {name:
    {...}}, "summary": {...}}`` (see report.py). Result files already in
    ``out_dir`` are reused (resume).
    """
    from . import checker_env, report

    cats = parse_categories(categories)
    if syntax not in ("python", "json"):
        raise EvaluationError(f"Unknown call syntax {syntax!r}; expected 'python' or 'json'.")
    if tool_choice not in TOOL_CHOICES:
        raise EvaluationError(f"Unknown tool choice {tool_choice!r}; expected one of: {', '.join(TOOL_CHOICES)}.")
    if tool_choice == "required" and not grammar:
        raise EvaluationError(
            "--tool-choice required needs the grammar: free decoding (--no-grammar) cannot force a call."
        )
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1, got {limit}.")
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise EvaluationError(f"--parallel must be a whole number of entries >= 1, got {parallel!r}.")
    if model is not None and not Path(model).is_file():
        raise EvaluationError(f"Model file {model} does not exist; pass the path of a GGUF file.")

    # The checker is needed for scoring: find (or build) it before spending time on inference.
    env = checker_env.ensure_checker_env(
        Path(checker_env_dir) if checker_env_dir else None, create=create_env, log=log
    )
    data = Path(data_dir) if data_dir else env.data_dir
    entries = {c: load_entries(data, c, limit) for c in cats}
    total = sum(len(v) for v in entries.values())

    if runtime_factory is None:
        from ..runtime import ToolRuntime

        options = {}
        if not speculative:
            if "speculative" not in inspect.signature(ToolRuntime).parameters:
                raise EvaluationError("This runtime has no speculative decoding to turn off (--no-speculative).")
            options["speculative"] = False
        if engine is not None:
            options["engine"] = engine  # eval's --engine: decode on that llama-server
        elif parallel > 1:
            options["parallel"] = parallel  # one batched engine decodes the worker threads' entries together

        def runtime_factory():
            # Every BFCL entry has its own tools: saving each prefix state would
            # only fill the user's prefix cache with entries never reused.
            return ToolRuntime(model=model, n_ctx=n_ctx, n_threads=n_threads, prefix_cache=False, **options)

    with runtime_factory() as runtime:
        model_path = str(getattr(runtime, "model_path", model))
        out = Path(out_dir) if out_dir else Path("bfcl-results") / default_run_name(
            model_path, grammar=grammar, syntax=syntax, tool_choice=tool_choice, speculative=speculative)
        check_manifest(out, {
            "model": model_path, "grammar": grammar, "syntax": syntax, "max_tokens": max_tokens,
            "tool_choice": tool_choice, "speculative": speculative,
            "bfcl_eval": env.version, "data_dir": str(data), "parallel": parallel,
        })
        slots = getattr(runtime, "concurrency", parallel)
        if parallel > 1 and isinstance(slots, int) and slots < parallel and log:
            log(f"note: the engine decodes {slots} request(s) at once; the other entries of --parallel "
                f"{parallel} wait for it.")
        records: dict[str, list[dict]] = {}
        count = 0

        def tick(entry, record):
            nonlocal count
            count += 1
            if progress:
                progress(count, total, entry)

        started = time.perf_counter()
        for c in cats:
            records[c] = run_category(
                runtime, entries[c], out, constrained=grammar, syntax=syntax,
                max_tokens=max_tokens, tool_choice=tool_choice, on_entry=tick, parallel=parallel,
            )
        wall_s = time.perf_counter() - started

    scores = score_results(env, data, out, cats)
    return report.build_report(
        model=model_path, grammar=grammar, syntax=syntax, tool_choice=tool_choice, speculative=speculative,
        limit=limit, out_dir=str(out),
        checker=scores, records=records, wall_s=wall_s, parallel=parallel,
    )
