"""What the runtime needs from an engine, at two levels.

``Engine`` is the request level, the only one ``ToolRuntime`` sees: an
``EngineRequest`` (the rendered prompt, the grammar, sampling, a budget and a
stop test) goes in; ``execute`` yields the decoded text in pieces, then one
``Generation`` (tokens, finish, usage, timings, stats). An engine owns what
it loads or connects to: ``close()`` frees it, and a closed engine refuses
requests. A new back-end is a new file with a class like these; ``open_engine``
(engines/__init__.py) picks one from ``ToolRuntime(engine=...)``.

``DecodeSession`` is the level below, inside the in-process engine: a
sequence of tokens in a KV cache. The decode loop (decoding.py) appends
tokens, asks for logits at chosen positions of the last batch, and rewinds
the cache after a rejected draft. Keeping the tokens held by the cache
explicit lets a caller check whether someone else used the session in
between and bring it back (``sync``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from ..decoding import SamplingParams
from ..errors import TooManyToolsError
from ..grammar_engines import LarkGrammar
from ..grammars import Tool, build_grammar, build_llg_grammar
from ..prompt import PromptParts, Segment
from ..results import Timings, Usage

# More tools than this make a GBNF grammar whose full-vocabulary masks cost too
# much per token in llama.cpp's grammar sampler. Only engines that decode with
# that sampler refuse more; the grammar itself (toolgrad-edge grammar, vLLM) has no limit.
GBNF_MAX_TOOLS = 256

# The call grammar, by the form an engine takes (Engine.grammar_format).
CALL_GRAMMARS: dict[str, Callable[..., Any]] = {
    "gbnf": build_grammar,  # llama.cpp's GBNF sampler, llama-server, vLLM
    # llguidance's Lark: enforces pattern, bounds, lengths and item counts while decoding; any number of tools.
    "lark": lambda tools, **options: LarkGrammar(build_llg_grammar(tools, **options)),
}


@dataclass(frozen=True)
class EngineDescription:
    """What an engine planned and holds, as callers (info, doctor, the server, bench) may ask of it."""

    model_name: str
    model_path: Path  # the GGUF file, or the model a llama-server reports
    backend: str  # what decodes, in words: "CPU", "Metal", "llama-server at URL"
    n_ctx: int  # the context one request may fill
    grammar_engine: str  # llguidance | llama | llama-server
    grammar_format: str  # the grammar execute takes: "lark" or "gbnf"
    max_tools: int | None  # tools one request's call grammar may hold (None: no limit but the context)
    concurrency: int  # requests decoded at once
    speculative: bool
    n_threads: int | None = None  # None: not this process's to choose (a llama-server's)
    n_gpu_layers: int = 0
    kv_type: str | None = None
    swa_full: bool | None = None
    gguf: Any = None  # gguf_info.GGUFInfo of a local model file, else None
    plan: Any = None  # hardware.DefaultsPlan: threads, context and kernels, each with its reason
    server: Any = None  # llama_server.ServerInfo of a remote engine


@dataclass(frozen=True)
class CompiledTools:
    """A request's tools, loaded and compiled once into the call grammar of one engine."""

    tools: list[Tool]
    grammar: Any  # in the engine's grammar_format
    syntax: str
    tool_choice: str
    parallel: bool


def compile_calls(grammar_format: str, tools: list[Tool], *, syntax: str, tool_choice: str, parallel: bool,
                  gbnf_sampler: tuple[str, str] | None = None) -> CompiledTools:
    """The call grammar for ``tools`` in ``grammar_format``.

    ``gbnf_sampler``: (the engine, in words; the way out) for engines that decode with llama.cpp's GBNF
    sampler, which refuse more than GBNF_MAX_TOOLS tools before any work.
    """
    if gbnf_sampler is not None:
        check_gbnf_tools(len(tools), *gbnf_sampler)
    grammar = CALL_GRAMMARS[grammar_format](tools, syntax=syntax, tool_choice=tool_choice, parallel=parallel)
    return CompiledTools(tools, grammar, syntax, tool_choice, parallel)


class StopStrings:
    """Stop strings that end a text answer; inside a call list they would cut a call in half, so they wait.

    ``calls`` says whether the answer may be a call list (tools given, no
    grammar override): then text that starts with '[' (both call syntaxes
    open a list with it) is not tested.
    """

    def __init__(self, stop: Sequence[str] = (), calls: bool = False):
        self.strings = [s for s in stop if s]
        self.calls = calls

    def live(self, text: str) -> list[str]:
        """The strings to look for in ``text`` so far (none inside a call list)."""
        if not self.strings or (self.calls and text.lstrip()[:1] == "["):
            return []
        return self.strings

    def find(self, text: str, emitted: int) -> int | None:
        """Where the first live stop string starts (text after it is cut), or None.

        Only text from ``emitted`` minus the longest string on is searched: what
        was shown before held no stop string.
        """
        live = self.live(text)
        if not live:
            return None
        start = max(0, emitted - max(len(s) for s in live))
        best = None
        for s in live:
            i = text.find(s, start)
            if i != -1 and (best is None or i < best):
                best = i
        return best

    def hold(self, text: str) -> int:
        """How many trailing characters to keep back: they may be the start of a stop string."""
        live = self.live(text)
        return max(len(s) for s in live) - 1 if live else 0


@dataclass
class EngineRequest:
    """One generation, in the engine's terms."""

    prompt: PromptParts  # prefix: the tool definitions (cacheable); rest: the conversation
    grammar: str | None  # in the engine's grammar_format (GBNF, or LarkGrammar for "lark"); None: free
    params: SamplingParams
    max_tokens: int
    stop: StopStrings = field(default_factory=StopStrings)
    should_stop: Callable[[], bool] | None = None  # polled between pieces; True cancels
    # Lookahead for GBNF call grammars: the text the grammar forces after this text (a unique tool name's rest).
    forced_text: Callable[[str], str] | None = None
    speculative: bool | None = None  # None: the engine's own setting


@dataclass
class Generation:
    """The final record of a request, after its text pieces."""

    text: str  # everything decoded, cut at a stop string
    finish: str  # stop | length | cancelled
    tokens: list[int] = field(default_factory=list)  # the generated tokens, where the engine knows them
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    stats: dict = field(default_factory=dict)


class Engine(Protocol):
    """A back-end that decodes requests: in this process, or on a server.

    Callers ask it what it is with ``describe()`` and nothing else: no caller
    guesses the engine from the attributes it happens to have.
    """

    model_path: Path
    model_name: str
    backend: str  # what decodes, in words: "CPU", "Metal", "llama-server at URL"
    n_ctx: int  # the context one request may fill
    grammar_engine: str  # llguidance | llama | llama-server
    grammar_format: str  # the grammar execute takes: "lark" (llguidance's) or "gbnf"
    speculative: bool  # several tokens per forward pass where that is exact

    @property
    def concurrency(self) -> int:
        """How many requests the engine decodes at once."""

    def describe(self) -> EngineDescription:
        """The model, context, threads, KV type, grammar format, limits and concurrency this engine planned."""

    def compile_calls(self, tools: list[Tool], *, syntax: str, tool_choice: str, parallel: bool) -> CompiledTools:
        """The call grammar in this engine's form; more tools than it takes is a TooManyToolsError."""

    @property
    def session(self):
        """The local model session (tokens, KV cache), or GenerationError where there is none."""

    def tokenize_segments(self, segments: Sequence[Segment]) -> list[int]: ...

    def clear_kv_cache(self) -> None: ...

    def execute(self, request: EngineRequest) -> Iterator[str | Generation]:
        """Yield decoded text pieces, then one Generation. No lock is held while a piece is out."""

    def close(self) -> None: ...


def check_gbnf_tools(n_tools: int, engine: str, instead: str) -> None:
    """Refuse more tools than llama.cpp's GBNF sampler handles, naming the engine and the way out."""
    if n_tools > GBNF_MAX_TOOLS:
        raise TooManyToolsError(
            f"{n_tools} tools given; {engine} decodes with llama.cpp's GBNF grammar sampler, which supports at "
            f"most {GBNF_MAX_TOOLS} (each one costs masking time on every token). Pass only the tools relevant "
            f"to the request, or {instead}."
        )



class DecodeSession(Protocol):
    n_vocab: int
    n_ctx: int

    @property
    def tokens(self) -> list[int]:
        """The tokens the KV cache holds, in position order (a copy)."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def forward_passes(self) -> int:
        """llama_decode calls so far (one per batch)."""

    def tokenize(self, text: str, special: bool = False) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def decode(self, tokens: Sequence[int], n_logits: int = 1) -> np.ndarray:
        """Append tokens; return the logits of the last ``n_logits`` of them (rows, a copy)."""

    def decode_at(self, tokens: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """Append tokens; return the logits after tokens[i] for each i in ``rows`` (increasing positions)."""

    def decode_narrow(self, tokens: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """Append tokens; return the logits of the tokens ``ids`` for the next position (decode(...)[0][ids]),
        skipping the output layer where the session can."""

    def rewind(self, n_keep: int) -> None:
        """Drop every cached token from position ``n_keep`` on."""

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly ``tokens`` (reusing the common prefix); return the reused count."""

    def save_state(self) -> bytes: ...

    def load_state(self, state: bytes, tokens: Sequence[int]) -> bool: ...

    def close(self) -> None: ...
