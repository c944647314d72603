"""Score BFCL result files with BFCL's official checker; print JSON scores.

Run by the checker environment's interpreter (see checker_env.py), never
imported by the runtime: it imports ``bfcl_eval``, which the runtime must not.

    python checker_runner.py --data-dir D --results-dir R --categories simple_python,irrelevance

Each entry is scored by the functions BFCL's own ``eval_runner`` applies per
entry: ``_evaluate_single_ast_entry`` (decode with the prompting decoder
``default_decode_ast_prompting``, check the output format, then
``ast_checker``) and ``_evaluate_single_relevance_entry`` (the relevance and
irrelevance rules). Only one piece of bfcl_eval is replaced: the model
registry ``bfcl_eval.constants.model_config``, which imports every API client
bfcl-eval supports. The checker reads one field from it, ``underscore_to_dot``,
and for Gemma in prompting mode (the handler ToolGrad was scored with,
registry name ``google/gemma-3-4b-it``) that field is False; the stand-in
below gives that value.

Output (stdout, one JSON object):
    {"bfcl_eval": VERSION, "model_name": NAME, "categories": {CATEGORY: {
        "n", "correct", "accuracy", "with_calls", "valid_calls",
        "entries": [{"id", "valid", "error_type"}]}}}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import types
from pathlib import Path

MODEL_NAME = "google_gemma-3-4b-it"  # BFCL's result-folder form of google/gemma-3-4b-it
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
VERSION_PREFIX = "BFCL_v4"


@dataclasses.dataclass(frozen=True)
class _PromptingModelConfig:
    # Same value as the "google/gemma-3-4b-it" entry of bfcl_eval's model_config.py.
    underscore_to_dot: bool = False


def _install_model_registry_stand_in(model_name: str) -> None:
    registry = types.ModuleType("bfcl_eval.constants.model_config")
    registry.MODEL_CONFIG_MAPPING = {model_name.replace("_", "/"): _PromptingModelConfig()}
    sys.modules["bfcl_eval.constants.model_config"] = registry


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _PromptingHandler:
    """The one handler method the per-entry checks call, as BFCL's OSSHandler defines it."""

    def __init__(self, decode):
        self._decode = decode

    def decode_ast(self, result, language, has_tool_call_tag):
        return self._decode(result, language, has_tool_call_tag)


def _call_is_valid(call: dict, functions: list[dict]) -> bool:
    """A decoded call names a given function, sets all its required and no unknown parameters."""
    (name, args), = call.items()
    doc = next((f for f in functions if f.get("name") == name), None)
    if doc is None:
        return False
    params = doc.get("parameters") or {}
    properties = params.get("properties") or {}
    required = params.get("required") or []
    return set(args) <= set(properties) and all(r in args for r in required)


def score_category(category: str, data_dir: Path, results_dir: Path, model_name: str, bfcl) -> dict:
    result_file = results_dir / f"{VERSION_PREFIX}_{category}_result.json"
    results = _read_jsonl(result_file) if result_file.is_file() else []
    prompts = _read_jsonl(data_dir / f"{VERSION_PREFIX}_{category}.json")
    relevance = category in RELEVANCE_CATEGORIES
    answers = None if relevance else _read_jsonl(data_dir / "possible_answer" / f"{VERSION_PREFIX}_{category}.json")
    # Prompts and possible answers are aligned by position (as in BFCL's eval_runner).
    index_of = {p["id"]: i for i, p in enumerate(prompts)}
    handler = _PromptingHandler(bfcl.default_decode_ast_prompting)

    entries, correct, with_calls, valid_calls = [], 0, 0, 0
    for record in results:
        entry_id, output = record["id"], record["result"]
        if entry_id not in index_of:
            raise SystemExit(f"{result_file}: id {entry_id!r} is not in {VERSION_PREFIX}_{category}.json")
        prompt = prompts[index_of[entry_id]]
        if relevance:
            verdict = bfcl.evaluate_relevance(handler, entry_id, output, prompt, model_name, category)
        else:
            verdict = bfcl.evaluate_ast(
                handler, entry_id, output, answers[index_of[entry_id]]["ground_truth"], prompt,
                model_name, category, language=bfcl.Language.PYTHON,
                return_format=bfcl.ReturnFormat.PYTHON, has_tool_call_tag=False,
            )
        correct += bool(verdict["valid"])
        entries.append({"id": entry_id, "valid": bool(verdict["valid"]), "error_type": verdict.get("error_type")})

        try:
            decoded = bfcl.default_decode_ast_prompting(output, bfcl.ReturnFormat.PYTHON, False)
        except Exception:  # the decoder raises whatever ast/its parsers raise
            decoded = None
        if decoded is not None and not bfcl.is_empty_output(decoded):
            with_calls += 1
            valid_calls += all(_call_is_valid(c, prompt["function"]) for c in decoded)

    n = len(results)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "with_calls": with_calls,
        "valid_calls": valid_calls,
        "entries": entries,
    }


def _load_bfcl(model_name: str):
    # eval_config creates result/score folders under BFCL_PROJECT_ROOT on import.
    os.environ.setdefault("BFCL_PROJECT_ROOT", tempfile.mkdtemp(prefix="bfcl-project-"))
    _install_model_registry_stand_in(model_name)
    from importlib.metadata import version

    from bfcl_eval.constants.enums import Language, ReturnFormat
    from bfcl_eval.eval_checker import eval_runner
    from bfcl_eval.model_handler.utils import default_decode_ast_prompting
    from bfcl_eval.utils import is_empty_output

    return types.SimpleNamespace(
        version=version("bfcl-eval"),
        Language=Language,
        ReturnFormat=ReturnFormat,
        evaluate_ast=eval_runner._evaluate_single_ast_entry,
        evaluate_relevance=eval_runner._evaluate_single_relevance_entry,
        default_decode_ast_prompting=default_decode_ast_prompting,
        is_empty_output=is_empty_output,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--categories", required=True, help="comma-separated")
    parser.add_argument("--model-name", default=MODEL_NAME)
    args = parser.parse_args(argv)

    # Whatever bfcl_eval prints goes to stderr: stdout carries only the JSON.
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        bfcl = _load_bfcl(args.model_name)
        scores = {
            category: score_category(category, args.data_dir, args.results_dir, args.model_name, bfcl)
            for category in args.categories.split(",")
            if category
        }
    finally:
        sys.stdout = out
    json.dump({"bfcl_eval": bfcl.version, "model_name": args.model_name, "categories": scores}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
