"""The in-process engine: a GGUF model on llama.cpp in this process.

``InProcessEngine`` owns one loaded model and its context (``LlamaSession``,
engines/llama_session.py). A request restores the evaluated tool prefix from the
PrefixCache when it can (or reuses the longest common prefix with what the
KV cache already holds), then decodes with the grammar engine as a
sample-then-check gate and several tokens per forward pass where that is
exact (``StepDecoder``, decoding.py): jump-forward, prompt lookup, or a
``DraftModel``.

Requests may come from several threads; each step of the decode loop holds
the engine's lock, but no lock is held while a piece of text is out, so a
consumer may abandon a stream or start another request at any time (an
interleaved request's KV cache is restored).
"""

from __future__ import annotations

import codecs
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..decoding import PromptLookupDrafter, StepDecoder, TokenChooser
from ..errors import ContextLengthError, GenerationError, ModelLoadError
from ..gguf_info import check_supported, model_shape, read_gguf_info
from ..grammar_engines import LlamaGrammarMatcher, LlguidanceMatcher, LlguidanceTokenizer, llg_grammar, resolve_engine
from ..hardware import plan_defaults
from . import kernel_guard
from ..model_resolution import backend_name, resolve_gpu_layers, resolve_model
from ..paths import llguidance_dir, prefix_cache_dir
from ..prefix_cache import PrefixCache, model_identity, prefix_key
from ..prompt import END_OF_TURN, START_OF_TURN, Segment
from ..results import Timings, Usage
from .base import GBNF_MAX_TOOLS, CompiledTools, EngineDescription, EngineRequest, Generation, compile_calls
from .llama_session import LlamaSession, common_prefix
from .output_head import OutputHead

DEFAULT_CTX = 8192  # the longest context chosen by default (n_ctx="auto"), where the RAM allows it
OUTPUT_ROWS = 16  # logits rows a batch may ask for: a draft's (decoding.MAX_DRAFT) and the token after it
LLAMA_SAMPLER = ("the llama grammar engine",
                 "use the llguidance grammar engine (the default once installed: "
                 "pip install 'toolgrad-edge[llguidance]'), which has no tool limit")


class InProcessEngine:
    """A loaded model that decodes requests in this process.

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
                 kv_type: str = "auto", swa_full: bool | str | None = "auto"):
        import llama_cpp

        self.model_path = resolve_model(model)
        self.info = read_gguf_info(self.model_path)
        check_supported(self.info)
        self.model_name = self.info.metadata.get("general.name") or self.model_path.stem
        self.backend = backend_name()
        self.n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        if n_ctx not in (None, "auto") and int(n_ctx) < 64:
            raise ModelLoadError(f"n_ctx must be at least 64, got {n_ctx}.")
        # Threads, context length and KV cache type chosen from this machine (each with its reason).
        self.hardware = self.plan(self.info, n_gpu_layers=self.n_gpu_layers, n_threads=n_threads, n_ctx=n_ctx,
                                  kv_type=kv_type, swa_full=swa_full, n_outputs=self.output_rows,
                                  cap=self.context_cap)
        self.n_threads = self.hardware.threads
        self.n_ctx = self.hardware.context.n_ctx
        self.kv_type = self.hardware.context.kv_type
        self.swa_full = self.hardware.context.swa_full
        self._lock = threading.Lock()
        self._session = self._draft = self._llg_tokenizer = None
        self._owner: object | None = None  # the request whose tokens the KV cache holds
        # fast_forward=False keeps jump-forward off (kept for older callers);
        # speculative=False turns off every multi-token step.
        self.fast_forward = fast_forward
        self.speculative = speculative
        self.grammar_engine = resolve_engine(grammar_engine)
        self.grammar_format = "lark" if self.grammar_engine == "llguidance" else "gbnf"
        self._session = self._open_session(self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                           n_gpu_layers=self.n_gpu_layers, verbose=verbose,
                                           output_head=OutputHead.from_gguf(self.model_path, self.info.tensors),
                                           kv_type=self.kv_type, swa_full=self.swa_full,
                                           n_outputs_max=self.output_rows)
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
            token_file = llguidance_dir() / f"{self._model_id[:32]}-{llama_cpp.__version__}.tokens"
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
        self._cache_settings = (f"ctx={self.n_ctx};swa_full={int(self.swa_full)};kv={self.kv_type};"
                                f"llama_cpp={llama_cpp.__version__}")

    # What a subclass (engines/batched.py) plans and opens differently: logits rows, context cap, session.
    output_rows = OUTPUT_ROWS
    context_cap = DEFAULT_CTX

    def _open_session(self, model_path, **options) -> LlamaSession:
        return LlamaSession(model_path, **options)

    @classmethod
    def plan(cls, info, n_gpu_layers: int = 0, n_threads: int | None = None, n_ctx: int | str | None = None,
             kv_type: str = "auto", swa_full: bool | str | None = "auto", n_outputs: int | None = None,
             cap: int | None = None):
        """The threads, context and KV cache this engine chooses for a GGUF on this machine (``info`` shows it
        without loading the model). n_outputs, cap: the logits rows and context cap, where an engine's own
        differ from the class's (the batched engine's grow with its sequences)."""
        return plan_defaults(model_shape(info), kernel_guard.detect_kernel_plan(), n_threads=n_threads,
                             n_ctx=n_ctx or "auto", kv_type=kv_type, swa_full=swa_full,
                             n_outputs=n_outputs or cls.output_rows, cap=cap or cls.context_cap,
                             n_gpu_layers=n_gpu_layers)

    def describe(self) -> EngineDescription:
        return EngineDescription(
            model_name=self.model_name, model_path=self.model_path, backend=self.backend, n_ctx=self.n_ctx,
            grammar_engine=self.grammar_engine, grammar_format=self.grammar_format,
            max_tools=None if self.grammar_format == "lark" else GBNF_MAX_TOOLS, concurrency=self.concurrency,
            speculative=self.speculative, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers,
            kv_type=self.kv_type, swa_full=self.swa_full, gguf=self.info, plan=self.hardware)

    def compile_calls(self, tools, *, syntax: str, tool_choice: str, parallel: bool) -> CompiledTools:
        return compile_calls(self.grammar_format, tools, syntax=syntax, tool_choice=tool_choice, parallel=parallel,
                             gbnf_sampler=LLAMA_SAMPLER if self.grammar_format == "gbnf" else None)

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._llg_tokenizer is not None:
                self._llg_tokenizer.close()  # it reads the vocabulary freed below
            for owner in ("_draft", "_session"):
                obj = getattr(self, owner, None)
                if obj is not None:
                    setattr(self, owner, None)
                    obj.close()

    def _require_open(self) -> LlamaSession:
        if self._session is None:
            raise GenerationError("this ToolRuntime is closed.")
        return self._session

    @property
    def concurrency(self) -> int:
        """One request decodes at a time (the others wait for the lock between steps)."""
        return 1

    @property
    def session(self) -> LlamaSession:
        """The model session (tokens, decode with logits, rewind); for measurements such as bench.compare."""
        return self._require_open()

    def clear_kv_cache(self) -> None:
        """Forget what the KV cache holds (the next request evaluates its whole prompt, bar the prefix cache)."""
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

    def _matcher(self, grammar: str, forced_text=None):
        """The grammar engine's matcher for one request (``forced_text``: lookahead for the GBNF one)."""
        session = self._session
        if self.grammar_engine == "llguidance":
            return LlguidanceMatcher(self._llg_tokenizer.get(), llg_grammar(grammar), self.n_vocab,
                                     probes=self._text_probes)
        return LlamaGrammarMatcher(session.vocab, grammar, self.n_vocab, tokenize=session.tokenize,
                                   piece=session.piece, forced_text=forced_text)

    context_note = ""  # how the context is shared, for the error below (engines/batched.py)

    def _request_tokens(self, request: EngineRequest) -> tuple[list[int], list[int]]:
        """The request's tool prefix and whole prompt as tokens, once checked against the engine's limits."""
        prefix = self.tokenize_segments(request.prompt.prefix)
        prompt = prefix + self.tokenize_segments(request.prompt.rest)
        if len(prompt) + request.max_tokens > self.n_ctx:
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {request.max_tokens}, "
                f"which exceeds the context of {self.n_ctx} tokens{self.context_note}; shorten the request, "
                "lower max_tokens, or raise n_ctx."
            )
        return prefix, prompt

    def execute(self, request: EngineRequest) -> Iterator[str | Generation]:
        max_tokens = request.max_tokens
        should_stop = request.should_stop
        speculative = self.speculative if request.speculative is None else request.speculative
        t0 = time.perf_counter()
        prefix, prompt = self._request_tokens(request)
        me = object()
        gate = None
        with self._lock:
            session = self._require_open()
            self._owner = me
            reused, logits = self._evaluate_prompt(prefix, prompt)
            if request.grammar:
                gate = self._matcher(request.grammar, request.forced_text)
        ttft = time.perf_counter() - t0
        drafter = None
        if speculative:
            # Prompt lookup copies from the conversation after the tool definitions, and from the output.
            drafter = (self._draft.drafter() if self._draft is not None
                       else PromptLookupDrafter(start=len(prefix)))
        decoder = StepDecoder(session, TokenChooser(request.params), gate, logits, list(prompt),
                              jump_forward=speculative and self.fast_forward, drafter=drafter,
                              narrow=speculative and session.narrow)
        stops = request.stop
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
                cut = stops.find(text, emitted)
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
                    stop_hit = True
                    break
                safe = len(text) - stops.hold(text)
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
        stats = decoder.stats
        if gate is not None:
            stats.full_masks = gate.full_masks
        yield Generation(
            text=text, finish=finish, tokens=generated,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=n_generated, cached_tokens=reused),
            timings=Timings(ttft_s=ttft, decode_s=t_end - t0 - ttft, total_s=t_end - t0),
            stats={**stats.to_dict(n_generated), "speculative": bool(speculative),
                   "grammar_engine": self.grammar_engine if gate is not None else None},
        )


class DraftModel:
    """A smaller model with the same vocabulary that drafts greedily for the target.

    On real hardware the Gemma 3 270M drafting for ToolGrad 4B. Its drafts are
    grammar-checked and verified by the target like any other (decoding.py),
    so it changes speed, never the output.
    """

    MAX_DRAFT = 4

    def __init__(self, path: str | os.PathLike, target: "InProcessEngine", verbose: bool = False):
        self.path = resolve_model(path)
        check_supported(read_gguf_info(self.path))
        self.session = LlamaSession(self.path, n_ctx=target.n_ctx, n_threads=target.n_threads,
                                    n_gpu_layers=target.n_gpu_layers, verbose=verbose, n_outputs_max=OUTPUT_ROWS)
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
