"""ToolRuntime: tool calls from a GGUF model on llama.cpp.

One object owns one loaded model and its context (engines/inprocess.py). A
call renders ToolGrad's prompt, restores the evaluated tool prefix from the
PrefixCache when it can (or reuses the longest common prefix with what the
KV cache already holds), decodes with the grammar engine as a sample-then-check
gate and several tokens per forward pass where that is exact (decoding.py),
and parses the text into validated ToolCalls.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .decoding import PromptLookupDrafter, SamplingParams, StepDecoder, TokenChooser
from .engines.inprocess import LlamaSession, common_prefix
from .engines.output_head import OutputHead
from .errors import ContextLengthError, GenerationError, ModelLoadError, SchemaError, ToolCallError
from .gguf_info import check_supported, read_gguf_info
from .grammar_engines import (LarkGrammar, LlamaGrammarMatcher, LlguidanceMatcher, LlguidanceTokenizer, llg_grammar,
                              resolve_engine)
from .grammars import (CallStreamParser, Tool, ToolCall, build_grammar, build_llg_grammar, forced_name_suffix,
                       load_tools, parse_calls)
from .model_resolution import backend_name, resolve_gpu_layers, resolve_model
from .paths import cache_root, prefix_cache_dir
from .prefix_cache import PrefixCache, model_identity, prefix_key
from .prompt import END_OF_TURN, START_OF_TURN, PromptParts, Segment, render_prompt

DEFAULT_CTX = 8192
TOOL_CHOICES = ("auto", "required", "none")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Timings:
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass
class CallResult:
    tool_calls: list[ToolCall]
    content: str | None
    raw_text: str
    finish_reason: str  # tool_calls | stop | length | cancelled
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    parse_error: str | None = None
    # forward_passes, forced_tokens, drafted_tokens, accepted_tokens, full_masks,
    # tokens_per_forward, draft_acceptance, grammar_engine, speculative
    stats: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list, repr=False)  # the generated tokens

    def to_dict(self) -> dict:
        out = {
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "content": self.content,
            "finish_reason": self.finish_reason,
            "usage": asdict(self.usage),
            "timings": asdict(self.timings),
            "stats": dict(self.stats),
        }
        if self.parse_error:
            out["parse_error"] = self.parse_error
        return out


class ToolRuntime:
    """A loaded model that answers requests with tool calls.

    Use as a context manager, or call close(): the llama.cpp model and context
    are freed then. Calls may come from several threads; each step of the
    decode loop holds an internal lock, but no lock is held while a stream's
    consumer has the text, so a consumer may abandon a stream or call the
    runtime again at any time (an interleaved call's KV cache is restored).

    speculative=False turns off every multi-token step (jump-forward, prompt
    lookup, the draft model) so that each forward pass yields one token.
    grammar_engine: "llguidance" (default; falls back to "llama" with a note
    when the package is missing) or "llama" (llama.cpp's GBNF sampler).
    """

    def __init__(self, model: str | os.PathLike | None = None, n_gpu_layers: int | str = "auto",
                 n_threads: int | None = None, n_ctx: int | None = None,
                 cache_dir: str | os.PathLike | None = None, verbose: bool = False,
                 prefix_cache: bool = True, fast_forward: bool = True, speculative: bool = True,
                 grammar_engine: str | None = None, draft_model: str | os.PathLike | None = None,
                 engine=None):
        import llama_cpp

        from .engines.llama_server import remote_engine

        # engine="http://HOST:PORT" (or $TOOLGRAD_EDGE_ENGINE when no model is named): decode on a
        # llama-server; the prompt, grammar and parsing stay here and no model file is loaded.
        self._remote = remote_engine(engine, model)
        if self._remote is not None:
            local = [name for name, value in (("draft_model", draft_model), ("grammar_engine", grammar_engine))
                     if value is not None]
            if local:
                raise ModelLoadError(
                    f"{' and '.join(local)} apply to a local model, but this runtime decodes on the llama-server at "
                    f"{self._remote.info.url} (engine, or $TOOLGRAD_EDGE_ENGINE), which samples with its own "
                    f"GBNF grammar support; drop {' and '.join(local)} or decode locally with a model.")
            self._init_remote(self._remote)
            return
        self.model_path = resolve_model(model)
        self.info = read_gguf_info(self.model_path)
        check_supported(self.info)
        self.model_name = self.info.metadata.get("general.name") or self.model_path.stem
        self.backend = backend_name()
        self.n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        self.n_threads = n_threads or os.cpu_count() or 1
        trained_ctx = self.info.context_length or DEFAULT_CTX
        self.n_ctx = int(n_ctx or min(trained_ctx, DEFAULT_CTX))
        if self.n_ctx < 64:
            raise ModelLoadError(f"n_ctx must be at least 64, got {self.n_ctx}.")
        self._lock = threading.Lock()
        self._session = self._draft = self._llg_tokenizer = None
        self._owner: object | None = None  # the request whose tokens the KV cache holds
        # fast_forward=False keeps jump-forward off (kept for older callers);
        # speculative=False turns off every multi-token step.
        self.fast_forward = fast_forward
        self.speculative = speculative
        self.grammar_engine = resolve_engine(grammar_engine)
        self._session = LlamaSession(self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                     n_gpu_layers=self.n_gpu_layers, verbose=verbose,
                                     output_head=OutputHead.from_gguf(self.model_path, self.info.tensors))
        self.n_vocab = self._session.n_vocab
        self._bos = self._session.bos
        self._control = {
            "<bos>": self._bos,
            START_OF_TURN: self._single_token(START_OF_TURN),
            END_OF_TURN: self._single_token(END_OF_TURN),
        }
        # Letters any free text allows: where one is allowed, the grammar allows too many tokens
        # for a pass without the output layer, and no mask is computed to find that out.
        self._text_probes = [ids[0] for ids in map(self._session.tokenize, "eatn") if len(ids) == 1]
        self._model_id = model_identity(self.model_path)
        self._llg_tokenizer = None
        if self.grammar_engine == "llguidance":
            vocab = self._session.vocab
            eos = {llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab), self._control[END_OF_TURN]}
            token_file = cache_root() / "llguidance" / f"{self._model_id[:32]}-{llama_cpp.__version__}.tokens"
            self._llg_tokenizer = LlguidanceTokenizer(vocab, sorted(t for t in eos if t >= 0), token_file)
        self._draft = None
        if draft_model is not None:
            try:
                self._draft = DraftModel(draft_model, self, verbose=verbose)
            except BaseException:
                self.close()
                raise
        prefix_root = Path(cache_dir) if cache_dir is not None else prefix_cache_dir()
        # prefix_cache=False keeps nothing between calls (the KV cache itself
        # still serves a repeated prefix within this object).
        self.prefix_cache = (PrefixCache(prefix_root) if prefix_cache
                             else PrefixCache(None, ram_entries=0))
        self._cache_settings = f"ctx={self.n_ctx};swa_full=1;llama_cpp={llama_cpp.__version__}"

    def _init_remote(self, remote) -> None:
        info = remote.info
        self.model_path = Path(info.model or "llama-server")
        self.model_name = self.model_path.stem
        self.backend = f"llama-server at {info.url}"
        self.engine_info = info
        self.n_ctx = info.n_ctx
        self.n_threads = self.n_gpu_layers = 0
        self.speculative = self.fast_forward = False
        self.grammar_engine = "llama-server"
        self._lock = threading.Lock()
        self._session = self._draft = self._llg_tokenizer = None
        self._closed = False  # _session is always None here, so close() records itself in this flag

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._llg_tokenizer is not None:
                self._llg_tokenizer.close()  # it reads the vocabulary freed below
            for owner in ("_draft", "_session"):
                obj = getattr(self, owner, None)
                if obj is not None:
                    setattr(self, owner, None)
                    obj.close()

    def __enter__(self) -> "ToolRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> LlamaSession:
        if self._remote is not None:
            self._require_remote_open()
            raise GenerationError(f"this ToolRuntime decodes on llama-server at {self.engine_info.url}: "
                                  "it holds no local model session (tokens, KV cache).")
        if self._session is None:
            raise GenerationError("this ToolRuntime is closed.")
        return self._session

    def _require_remote_open(self) -> None:
        if self._closed:
            raise GenerationError(f"this ToolRuntime (over llama-server at {self.engine_info.url}) is closed; "
                                  "open a new one to make more calls.")

    @property
    def concurrency(self) -> int:
        """How many requests this runtime serves at once: llama-server's slots, or 1 in process."""
        if self._remote is not None:
            return max(1, int(self.engine_info.total_slots or 1))
        return 1

    @property
    def session(self) -> LlamaSession:
        """The model session (tokens, decode with logits, rewind); for measurements such as bench_compare."""
        return self._require_open()

    def clear_kv_cache(self) -> None:
        """Forget what the KV cache holds (the next call evaluates its whole prompt, bar the prefix cache)."""
        with self._lock:
            self._require_open().clear()
            self._owner = None

    # -- tokens -------------------------------------------------------------
    def _single_token(self, text: str) -> int:
        ids = self._session.tokenize(text, special=True)
        if len(ids) != 1:
            raise ModelLoadError(
                f"{self.model_path}: the vocabulary has no single {text} token; "
                "this is not a Gemma 3 chat vocabulary (re-convert with the model's tokenizer files)."
            )
        return ids[0]

    def tokenize_segments(self, segments: Iterable[Segment]) -> list[int]:
        session = self._require_open()
        tokens: list[int] = []
        for seg in segments:
            if seg.control:
                tokens.append(self._control[seg.text])
            elif seg.tokens and self._spells(seg.tokens, seg.text):
                # A model answer as it was decoded: its own tokens re-create the KV cache exactly.
                tokens += seg.tokens
            elif seg.text:
                tokens += session.tokenize(seg.text)
        return tokens

    def _spells(self, tokens: Sequence[int], text: str) -> bool:
        """Whether these token ids decode to exactly this text (ids from elsewhere are checked, not trusted)."""
        session = self._require_open()
        if not all(0 <= t < self.n_vocab for t in tokens):
            return False
        try:
            return b"".join(session.piece(t) for t in tokens).decode("utf-8") == text
        except UnicodeDecodeError:
            return False

    # -- requests -----------------------------------------------------------
    def _prepare(self, query_or_messages, tools, tool_choice, parallel, syntax, constrained, grammar):
        if syntax not in ("python", "json"):
            raise SchemaError(f"syntax must be 'python' or 'json', got {syntax!r}.")
        tool_list: list[Tool] = load_tools(tools) if tools else []
        if isinstance(tool_choice, str) and tool_choice not in TOOL_CHOICES:
            names = [t.name for t in tool_list]
            if tool_choice not in names:
                raise SchemaError(
                    f"tool_choice {tool_choice!r} names no given tool; expected auto, required, none "
                    f"or one of: {', '.join(names) or '(no tools given)'}."
                )
        if not tool_list and tool_choice not in ("none", "auto") and grammar is None:
            raise SchemaError(f"tool_choice {tool_choice!r} needs at least one tool.")
        parts = render_prompt(query_or_messages, tool_list, syntax)
        if grammar is None and constrained and tool_list:
            if self._remote is None and self.grammar_engine == "llguidance":
                # Enforces pattern, bounds, lengths and item counts while decoding; any number of tools.
                grammar = LarkGrammar(build_llg_grammar(tool_list, syntax=syntax, tool_choice=tool_choice,
                                                        parallel=parallel))
            else:
                grammar = build_grammar(tool_list, syntax=syntax, tool_choice=tool_choice, parallel=parallel)
        return tool_list, parts, grammar

    def count_prompt_tokens(self, query_or_messages, tools=None, syntax: str = "python") -> int:
        self._require_open()
        tool_list = load_tools(tools) if tools else []
        parts = render_prompt(query_or_messages, tool_list, syntax)
        return len(self.tokenize_segments(parts.prefix)) + len(self.tokenize_segments(parts.rest))

    def call(self, query_or_messages, tools=None, tool_choice: str = "auto", parallel: bool = True,
             syntax: str = "python", max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop: Sequence[str] | None = None,
             constrained: bool = True, grammar: str | None = None,
             should_stop: Callable[[], bool] | None = None, speculative: bool | None = None) -> CallResult:
        """Answer one request with tool calls (or text). See stream() for the arguments."""
        result = None
        for item in self.stream(query_or_messages, tools, tool_choice=tool_choice, parallel=parallel,
                                syntax=syntax, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, constrained=constrained, grammar=grammar,
                                should_stop=should_stop, speculative=speculative):
            if isinstance(item, CallResult):
                result = item
        assert result is not None
        return result

    def stream(self, query_or_messages, tools=None, tool_choice: str = "auto", parallel: bool = True,
               syntax: str = "python", max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] | None = None,
               constrained: bool = True, grammar: str | None = None,
               should_stop: Callable[[], bool] | None = None,
               speculative: bool | None = None) -> Iterator[str | CallResult]:
        """Yield text deltas as they are decoded, then the final CallResult.

        query_or_messages: a user query, or OpenAI-style messages.
        tools: Tool objects, tool dicts (OpenAI or BFCL form) or a JSON file path.
        tool_choice: auto (calls or text), required, none, or a tool name.
        constrained=False decodes freely and parses the text leniently.
        grammar: a GBNF string that replaces the tool grammar (content only).
        stop: strings that end a text answer; they never cut a tool call.
        should_stop: polled before every step; returning True cancels the request.
        speculative: override the runtime's setting for this request.
        """
        if max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}.")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        grammar_override = grammar is not None
        tool_list, parts, grammar = self._prepare(query_or_messages, tools, tool_choice, parallel, syntax,
                                                  constrained, grammar)
        if self._remote is not None:  # no lock: llama-server's slots run requests side by side
            self._require_remote_open()
            from .engines.llama_server import remote_stream

            def asked_to_stop() -> bool:
                return should_stop is not None and should_stop()

            # close() ends the requests still running: their connections close, so llama-server stops them.
            for item in remote_stream(self._remote, parts, tool_list, grammar, grammar_override, params,
                                      max_tokens, list(stop or []), lambda: self._closed or asked_to_stop(),
                                      syntax, constrained):
                if (isinstance(item, CallResult) and item.finish_reason == "cancelled" and self._closed
                        and not asked_to_stop()):
                    raise GenerationError(f"this ToolRuntime (over llama-server at {self.engine_info.url}) was "
                                          "closed during the request.")
                yield item
            return
        spec = self.speculative if speculative is None else speculative
        yield from self._generate(parts, tool_list, grammar, grammar_override, params, max_tokens,
                              list(stop or []), should_stop, syntax, constrained, spec)

    # -- the decode loop -------------------------------------------------------
    def _evaluate_prompt(self, prefix: list[int], prompt: list[int]) -> tuple[int, np.ndarray]:
        """Bring the KV cache to hold `prompt`; return (tokens reused, logits after the prompt).

        The tool prefix is always in the layout of a restore (kept, restored, or
        evaluated and reloaded: LlamaSession.evaluate_prefix) and the rest is
        always decoded after it in the same batches, so the tokens a request
        gets do not depend on what the caches held before.
        """
        session = self._session
        if session.restored_prefix(prefix):
            session.rewind(len(prefix))
        else:
            key = prefix_key(self._model_id, prefix, self._cache_settings)
            state = self.prefix_cache.get(key)
            if state is None or not session.load_state(state, prefix):
                if state is not None:
                    self.prefix_cache.discard(key)
                state = session.evaluate_prefix(prefix)
                if self.prefix_cache.enabled:
                    self.prefix_cache.put(key, state)
                return 0, session.decode(prompt[len(prefix):], 1)[0]
        return len(prefix), session.decode(prompt[len(prefix):], 1)[0]

    def _matcher(self, grammar: str, tools: list[Tool], syntax: str, grammar_override: bool):
        session = self._session
        if self.grammar_engine == "llguidance":
            return LlguidanceMatcher(self._llg_tokenizer.get(), llg_grammar(grammar), self.n_vocab,
                                     probes=self._text_probes)
        forced_text = None
        if tools and not grammar_override and syntax == "python":
            names = [t.name for t in tools]
            forced_text = functools.partial(_forced_name_text, names=names)
        return LlamaGrammarMatcher(session.vocab, grammar, self.n_vocab, tokenize=session.tokenize,
                                   piece=session.piece, forced_text=forced_text)

    def _generate(self, parts: PromptParts, tools: list[Tool], grammar: str | None, grammar_override: bool,
                  params: SamplingParams, max_tokens: int, stop: list[str],
                  should_stop: Callable[[], bool] | None, syntax: str, constrained: bool, speculative: bool):
        t0 = time.perf_counter()
        prefix = self.tokenize_segments(parts.prefix)
        prompt = prefix + self.tokenize_segments(parts.rest)
        if len(prompt) + max_tokens > self.n_ctx:
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {max_tokens}, "
                f"which exceeds the context of {self.n_ctx} tokens; shorten the request, "
                "lower max_tokens, or raise n_ctx."
            )
        me = object()
        gate = None
        with self._lock:
            session = self._require_open()
            self._owner = me
            reused, logits = self._evaluate_prompt(prefix, prompt)
            if grammar:
                gate = self._matcher(grammar, tools, syntax, grammar_override)
        ttft = time.perf_counter() - t0
        drafter = None
        if speculative:
            # Prompt lookup copies from the conversation after the tool definitions, and from the output.
            drafter = (self._draft.drafter() if self._draft is not None
                       else PromptLookupDrafter(start=len(prefix)))
        decoder = StepDecoder(session, TokenChooser(params), gate, logits, list(prompt),
                              jump_forward=speculative and self.fast_forward, drafter=drafter,
                              narrow=speculative and session.narrow)
        # Stop strings end text answers only: inside a call list they would cut a call in half.
        stops = [s for s in stop if s]
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0
        n_generated = 0
        generated: list[int] = []
        finish = "length"
        stop_hit = False
        try:
            while n_generated < max_tokens:
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
                with self._lock:
                    if self._session is None:
                        raise GenerationError("this ToolRuntime was closed during the request.")
                    if self._owner is not me:
                        # Another request used the cache while our consumer held a delta.
                        session.sync(decoder.kv_tokens)
                        if self._draft is not None:
                            self._draft.invalidate()
                        self._owner = me
                    tokens = decoder.step(max_tokens - n_generated)
                n_generated += len(tokens)
                generated += tokens
                for token in tokens:
                    text += utf8.decode(session.piece(token))
                if decoder.done:
                    finish = "stop"
                live_stops = stops if stops and not _in_call(text, tools, grammar_override) else None
                if live_stops:
                    cut = _find_stop(text, live_stops, emitted)
                    if cut is not None:
                        text = text[:cut]
                        finish = "stop"
                        stop_hit = True
                        break
                hold = max((len(s) for s in live_stops), default=1) - 1 if live_stops else 0
                safe = len(text) - hold
                if safe > emitted:
                    delta = text[emitted:safe]
                    emitted = safe
                    yield delta  # no lock is held here
                if decoder.done:
                    break
            if not stop_hit:
                text += utf8.decode(b"", final=True)
        finally:
            if gate is not None:
                with self._lock:
                    gate.close()
        if len(text) > emitted:
            yield text[emitted:]
        t_end = time.perf_counter()
        result = result_from_text(text, tools, grammar_override, constrained, finish, syntax)
        result.token_ids = generated
        result.usage = Usage(prompt_tokens=len(prompt), completion_tokens=n_generated, cached_tokens=reused)
        result.timings = Timings(ttft_s=ttft, decode_s=t_end - t0 - ttft, total_s=t_end - t0)
        stats = decoder.stats
        if gate is not None:
            stats.full_masks = gate.full_masks
        result.stats = {**stats.to_dict(n_generated), "speculative": bool(speculative),
                        "grammar_engine": self.grammar_engine if gate is not None else None}
        yield result

def result_from_text(text: str, tools: list[Tool], grammar_override: bool, constrained: bool,
                     finish: str, syntax: str) -> CallResult:
    """The CallResult for decoded text: validated calls, or the text (with parse_error when it is neither)."""
    if grammar_override or not tools:
        return CallResult([], text, text, finish)
    try:
        calls = parse_calls(text, tools, syntax=syntax)
    except (ToolCallError, SchemaError) as exc:
        if finish == "length":
            # Cut at max_tokens in the middle of a call list: keep the calls that were complete.
            try:
                complete = CallStreamParser(tools, syntax).feed(text)
            except (ToolCallError, SchemaError):
                complete = []
            if complete:
                return CallResult(complete, None, text, finish, parse_error=str(exc))
        # A keyword checked only after generation failed (e.g. a number out of
        # bounds): the text comes back with the reason, as a normal finish.
        return CallResult([], text if text.strip() else None, text, finish, parse_error=str(exc))
    if calls:
        return CallResult(calls, None, text, "tool_calls" if finish == "stop" else finish)
    return CallResult([], text.strip() or None, text, finish)


class DraftModel:
    """A smaller model with the same vocabulary that drafts greedily for the target.

    On real hardware the Gemma 3 270M drafting for ToolGrad 4B. Its drafts are
    grammar-checked and verified by the target like any other (decoding.py),
    so it changes speed, never the output.
    """

    MAX_DRAFT = 4

    def __init__(self, path: str | os.PathLike, target: "ToolRuntime", verbose: bool = False):
        self.path = resolve_model(path)
        check_supported(read_gguf_info(self.path))
        self.session = LlamaSession(self.path, n_ctx=target.n_ctx, n_threads=target.n_threads,
                                    n_gpu_layers=target.n_gpu_layers, verbose=verbose)
        target_session = target._session
        mismatch = None
        if self.session.n_vocab != target_session.n_vocab:
            mismatch = f"{self.session.n_vocab} tokens against {target_session.n_vocab}"
        else:
            for token in itertools.chain(range(0, min(4096, target_session.n_vocab)),
                                         range(4096, target_session.n_vocab, 509)):
                if self.session.piece(token) != target_session.piece(token):
                    mismatch = f"token {token} is {self.session.piece(token)!r} against {target_session.piece(token)!r}"
                    break
        if mismatch:
            self.session.close()
            raise ModelLoadError(f"draft model {self.path} does not share the vocabulary of {target.model_path} "
                                 f"({mismatch}); a draft model must use the same tokenizer.")

    def drafter(self) -> "_DraftModelDrafter":
        return _DraftModelDrafter(self.session, self.MAX_DRAFT)

    def invalidate(self) -> None:
        pass  # each proposal re-syncs the draft cache with the target's tokens

    def close(self) -> None:
        self.session.close()


class _DraftModelDrafter:
    def __init__(self, session: LlamaSession, max_draft: int):
        self.session = session
        self.max_draft = max_draft

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        k = min(k, self.max_draft)
        if k <= 0 or not context:
            return []
        session = self.session
        common = min(common_prefix(session.tokens, context), len(context) - 1)
        session.rewind(common)
        logits = session.decode(context[common:], 1)[0]
        draft = []
        while True:
            token = int(np.argmax(logits))
            if session.is_eog(token):
                break
            draft.append(token)
            if len(draft) >= k:
                break
            logits = session.decode([token], 1)[0]
        return draft


def _forced_name_text(text: str, names: list[str]) -> str:
    return forced_name_suffix(text, names)


def _in_call(text: str, tools: list[Tool], grammar_override: bool) -> bool:
    """Whether the output so far is a call list (both syntaxes open one with '[')."""
    return bool(tools) and not grammar_override and text.lstrip()[:1] == "["


def _find_stop(text: str, stop: list[str], emitted: int) -> int | None:
    if not stop:
        return None
    start = max(0, emitted - max(len(s) for s in stop))
    best = None
    for s in stop:
        if not s:
            continue
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
