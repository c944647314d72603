"""ToolRuntime: tool calls from a GGUF model on llama.cpp.

One object owns one loaded model and its context. A call renders ToolGrad's
prompt, restores the evaluated tool prefix from the PrefixCache when it can,
decodes with the sample-then-check grammar gate (decoding.py), and parses the
text into validated ToolCalls.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .decoding import GrammarGate, SamplingParams, TokenChooser, choose_constrained
from .errors import ContextLengthError, GenerationError, ModelLoadError, SchemaError, ToolCallError
from .gguf_info import check_supported, read_gguf_info
from .grammars import CallStreamParser, Tool, ToolCall, build_grammar, forced_name_suffix, load_tools, parse_calls
from .model_resolution import backend_name, resolve_gpu_layers, resolve_model
from .paths import prefix_cache_dir
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

    def to_dict(self) -> dict:
        return {
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "content": self.content,
            "finish_reason": self.finish_reason,
            "usage": asdict(self.usage),
            "timings": asdict(self.timings),
        }


@contextmanager
def _quiet_stderr(enabled: bool):
    """Silence llama.cpp's C-level logging on fd 2 while loading (unless verbose)."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class ToolRuntime:
    """A loaded model that answers requests with tool calls.

    Use as a context manager, or call close(): the llama.cpp model and context
    are freed then. Not thread-safe; calls are serialised by an internal lock.
    """

    def __init__(self, model: str | os.PathLike | None = None, n_gpu_layers: int | str = "auto",
                 n_threads: int | None = None, n_ctx: int | None = None,
                 cache_dir: str | os.PathLike | None = None, verbose: bool = False,
                 prefix_cache: bool = True, fast_forward: bool = True):
        import llama_cpp

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
        # Feed forced tool-name tokens in one batch instead of sampling them.
        self.fast_forward = fast_forward
        self.last_stats: dict[str, int] = {}
        with _quiet_stderr(not verbose):
            try:
                self._llm = llama_cpp.Llama(
                    model_path=str(self.model_path), n_ctx=self.n_ctx, n_batch=512,
                    n_gpu_layers=self.n_gpu_layers, n_threads=self.n_threads,
                    n_threads_batch=self.n_threads, logits_all=False,
                    # The full-size sliding-window cache lets a saved prefix be
                    # restored and extended; the default would drop old positions.
                    swa_full=True, verbose=verbose,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelLoadError(f"{self.model_path}: llama.cpp could not load the model ({exc}).") from None
        self._ctx = self._llm._ctx.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        self.n_vocab = self._llm.n_vocab()
        self._bos = self._llm.token_bos()
        self._control = {
            "<bos>": self._bos,
            START_OF_TURN: self._single_token(START_OF_TURN),
            END_OF_TURN: self._single_token(END_OF_TURN),
        }
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._model_id = model_identity(self.model_path)
        cache_root = Path(cache_dir) if cache_dir is not None else prefix_cache_dir()
        # prefix_cache=False keeps nothing between calls (the KV cache itself
        # still serves a repeated prefix within this object).
        self.prefix_cache = (PrefixCache(cache_root) if prefix_cache
                             else PrefixCache(None, ram_entries=0))
        self._cache_settings = f"ctx={self.n_ctx};swa_full=1;llama_cpp={llama_cpp.__version__}"

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            self._llm = None
            llm.close()

    def __enter__(self) -> "ToolRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self):
        if self._llm is None:
            raise GenerationError("this ToolRuntime is closed.")
        return self._llm

    # -- tokens -------------------------------------------------------------
    def _single_token(self, text: str) -> int:
        ids = self._llm.tokenize(text.encode(), add_bos=False, special=True)
        if len(ids) != 1:
            raise ModelLoadError(
                f"{self.model_path}: the vocabulary has no single {text} token; "
                "this is not a Gemma 3 chat vocabulary (re-convert with the model's tokenizer files)."
            )
        return ids[0]

    def tokenize_segments(self, segments: Iterable[Segment]) -> list[int]:
        tokens: list[int] = []
        for seg in segments:
            if seg.control:
                tokens.append(self._control[seg.text])
            elif seg.text:
                tokens += self._llm.tokenize(seg.text.encode("utf-8"), add_bos=False, special=False)
        return tokens

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import llama_cpp

            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
            piece = self._piece_buf.raw[:n] if n > 0 else b""
            self._pieces[token] = piece
        return piece

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

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
             should_stop: Callable[[], bool] | None = None) -> CallResult:
        """Answer one request with tool calls (or text). See stream() for the arguments."""
        result = None
        for item in self.stream(query_or_messages, tools, tool_choice=tool_choice, parallel=parallel,
                                syntax=syntax, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, constrained=constrained, grammar=grammar,
                                should_stop=should_stop):
            if isinstance(item, CallResult):
                result = item
        assert result is not None
        return result

    def stream(self, query_or_messages, tools=None, tool_choice: str = "auto", parallel: bool = True,
               syntax: str = "python", max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] | None = None,
               constrained: bool = True, grammar: str | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str | CallResult]:
        """Yield text deltas as they are decoded, then the final CallResult.

        query_or_messages: a user query, or OpenAI-style messages.
        tools: Tool objects, tool dicts (OpenAI or BFCL form) or a JSON file path.
        tool_choice: auto (calls or text), required, none, or a tool name.
        constrained=False decodes freely and parses the text leniently.
        grammar: a GBNF string that replaces the tool grammar (content only).
        should_stop: polled every token; returning True cancels the request.
        """
        if max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}.")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        grammar_override = grammar is not None
        tool_list, parts, grammar = self._prepare(query_or_messages, tools, tool_choice, parallel, syntax,
                                                  constrained, grammar)
        with self._lock:
            self._require_open()
            yield from self._generate(parts, tool_list, grammar, grammar_override, params, max_tokens,
                                      list(stop or []), should_stop, syntax, constrained)

    # -- the decode loop -------------------------------------------------------
    def _evaluate_prompt(self, prefix: list[int], prompt: list[int]) -> int:
        """Bring the KV cache to hold `prompt`; return how many tokens were reused."""
        import llama_cpp

        llm = self._llm
        have = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for a, b in zip(have, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # evaluate at least one token for logits
        reused = common
        if common < len(prefix):
            key = prefix_key(self._model_id, prefix, self._cache_settings)
            state = self.prefix_cache.get(key)
            restored = False
            if state is not None:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
                buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
                if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(state), 0) == len(state):
                    llm.input_ids[: len(prefix)] = prefix
                    llm.n_tokens = len(prefix)
                    reused = len(prefix)
                    restored = True
                else:
                    self.prefix_cache.discard(key)
                    llm.n_tokens = 0
            if not restored:
                llm.n_tokens = common
                llm.eval(prefix[common:])
                if self.prefix_cache.enabled:
                    size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
                    buf = (ctypes.c_uint8 * size)()
                    n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, 0)
                    if n > 0:
                        self.prefix_cache.put(key, bytes(buf)[:n])
        else:
            llm.n_tokens = common
        llm.eval(prompt[llm.n_tokens:])
        return reused

    def _logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _generate(self, parts: PromptParts, tools: list[Tool], grammar: str | None, grammar_override: bool,
                  params: SamplingParams, max_tokens: int, stop: list[str],
                  should_stop: Callable[[], bool] | None, syntax: str, constrained: bool):
        t0 = time.perf_counter()
        prefix = self.tokenize_segments(parts.prefix)
        prompt = prefix + self.tokenize_segments(parts.rest)
        if len(prompt) + max_tokens > self.n_ctx:
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {max_tokens}, "
                f"which exceeds the context of {self.n_ctx} tokens; shorten the request, "
                "lower max_tokens, or raise n_ctx."
            )
        gate = GrammarGate(self._vocab, grammar, self.n_vocab) if grammar else None
        chooser = TokenChooser(params)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0
        hold = max((len(s) for s in stop), default=1) - 1
        names = ([t.name for t in tools] if gate is not None and self.fast_forward and not grammar_override
                 and syntax == "python" else None)
        n_forced = 0
        finish = "length"
        stop_hit = False
        n_generated = 0
        ttft = None
        try:
            reused = self._evaluate_prompt(prefix, prompt)
            while n_generated < max_tokens:
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
                token = choose_constrained(chooser, self._logits(), gate)
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if self._is_eog(token):
                    finish = "stop"
                    break
                if gate is not None:
                    gate.accept(token)
                n_generated += 1
                text += decoder.decode(self._piece(token))
                batch = [token]
                if names and n_generated < max_tokens:
                    for forced in self._forced_tokens(text, names, gate, max_tokens - n_generated):
                        batch.append(forced)
                        n_generated += 1
                        text += decoder.decode(self._piece(forced))
                    n_forced += len(batch) - 1
                cut = _find_stop(text, stop, emitted)
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
                    stop_hit = True
                    break
                safe = len(text) - hold if stop else len(text)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                self._llm.eval(batch)
            if not stop_hit:
                text += decoder.decode(b"", final=True)
        except GeneratorExit:
            raise  # the consumer stopped at a yield: the KV cache is consistent
        except BaseException:
            # The KV cache may hold a half-evaluated batch: forget what it holds.
            self._llm.n_tokens = 0
            raise
        finally:
            self.last_stats = {"forced_tokens": n_forced, "full_masks": gate.full_masks if gate else 0}
            if gate is not None:
                gate.close()
        if len(text) > emitted:
            yield text[emitted:]
        t_end = time.perf_counter()
        ttft = ttft if ttft is not None else t_end - t0
        result = self._finish(text, tools, grammar_override, constrained, finish, syntax)
        result.usage = Usage(prompt_tokens=len(prompt), completion_tokens=n_generated, cached_tokens=reused)
        result.timings = Timings(ttft_s=ttft, decode_s=t_end - t0 - ttft, total_s=t_end - t0)
        yield result

    def _forced_tokens(self, text: str, names: list[str], gate: GrammarGate, budget: int) -> list[int]:
        """Tokens of a tool name's forced remainder that the grammar accepts (accepted into it)."""
        forced = forced_name_suffix(text, names)
        if not forced:
            return []
        accepted = []
        for token in self._llm.tokenize(forced.encode("utf-8"), add_bos=False, special=False)[:budget]:
            if not gate.allows(token):
                break
            gate.accept(token)
            accepted.append(token)
        return accepted

    def _finish(self, text: str, tools: list[Tool], grammar_override: bool, constrained: bool,
                finish: str, syntax: str) -> CallResult:
        if grammar_override or not tools:
            return CallResult([], text, text, finish)
        try:
            calls = parse_calls(text, tools, syntax=syntax)
        except (ToolCallError, SchemaError) as exc:
            if constrained and finish == "stop":
                raise GenerationError(f"constrained output failed to parse ({exc}); output was {text!r:.200}") from None
            if finish == "length":
                # Cut at max_tokens in the middle of a call list: keep the calls that were complete.
                try:
                    complete = CallStreamParser(tools, syntax).feed(text)
                except (ToolCallError, SchemaError):
                    complete = []
                if complete:
                    return CallResult(complete, None, text, finish, parse_error=str(exc))
            return CallResult([], text if text.strip() else None, text, finish, parse_error=str(exc))
        if calls:
            return CallResult(calls, None, text, "tool_calls" if finish == "stop" else finish)
        return CallResult([], text.strip() or None, text, finish)


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
