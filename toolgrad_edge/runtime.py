"""ToolRuntime: tool calls from a GGUF model, decoded by an engine.

A request renders ToolGrad's prompt, builds the call grammar in the form the
engine takes, has the engine decode (engines/: in this process on llama.cpp,
or on a llama-server), and parses the text into validated ToolCalls. The
runtime never asks which engine it holds: everything that differs between
them (loading, KV and prefix caches, speculation, concurrency, closing)
belongs to the engine.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable, Iterator, Sequence

from .decoding import SamplingParams
from .engines import CompiledTools, Engine, EngineDescription, EngineRequest, Generation, StopStrings, open_engine
from .engines.base import CALL_GRAMMARS  # noqa: F401 - importable from here, as before
from .engines.inprocess import DEFAULT_CTX, OUTPUT_ROWS, DraftModel  # noqa: F401 - importable from here, as before
from .errors import GenerationError, SchemaError
from .grammars import Tool, forced_name_suffix, load_tools
from .prompt import Segment, render_prompt
from .results import (  # noqa: F401 - the runtime's results and events
    AnswerReader, CallDone, CallResult, Decoded, Event, Final, TextDelta, Timings, Usage, result_from_text,
)

TOOL_CHOICES = ("auto", "required", "none")


class ToolRuntime:
    """A model that answers requests with tool calls, decoded by an engine.

    Use as a context manager, or call close(): the engine's model and
    context (or its connections) are freed then. Calls may come from several
    threads, and a consumer may abandon a stream or call the runtime again at
    any time.

    engine: None (in this process, or $TOOLGRAD_EDGE_ENGINE when no model is
    named: the CLI passes its --engine here), "inprocess", "http://HOST:PORT" of a llama-server (the prompt,
    grammar and parsing stay here and no model file is loaded), or an Engine
    object. The other options configure the in-process engine
    (engines/inprocess.py): speculative=False turns off every multi-token step
    (jump-forward, prompt lookup, the draft model) so that each forward pass
    yields one token; grammar_engine: "llguidance" (default; falls back to
    "llama" with a note when the package is missing) or "llama" (llama.cpp's
    GBNF sampler).
    """

    def __init__(self, model: str | os.PathLike | None = None, n_gpu_layers: int | str = "auto",
                 n_threads: int | None = None, n_ctx: int | None = None,
                 cache_dir: str | os.PathLike | None = None, verbose: bool = False,
                 prefix_cache: bool = True, fast_forward: bool = True, speculative: bool = True,
                 grammar_engine: str | None = None, draft_model: str | os.PathLike | None = None,
                 engine: str | Engine | None = None, kv_type: str = "auto", swa_full: bool | str | None = "auto",
                 parallel: int | str = 1):
        # parallel: requests decoded at once in one context (engines/batched.py); "auto" chooses from this machine.
        self.engine: Engine = open_engine(
            engine, model, n_gpu_layers=n_gpu_layers, n_threads=n_threads, n_ctx=n_ctx, cache_dir=cache_dir,
            verbose=verbose, prefix_cache=prefix_cache, fast_forward=fast_forward, speculative=speculative,
            grammar_engine=grammar_engine, draft_model=draft_model, kv_type=kv_type, swa_full=swa_full,
            parallel=parallel)

    # -- the engine's facts ------------------------------------------------------
    @property
    def model_path(self):
        return self.engine.model_path

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def grammar_engine(self) -> str:
        return self.engine.grammar_engine

    @property
    def speculative(self) -> bool:
        return self.engine.speculative

    @property
    def concurrency(self) -> int:
        """How many requests this runtime serves at once: llama-server's slots, or 1 in process."""
        return self.engine.concurrency

    @property
    def session(self):
        """The model session (tokens, decode with logits, rewind); for measurements such as bench.compare."""
        return self.engine.session

    def describe(self) -> EngineDescription:
        """What the engine planned: model, context, threads, KV type, grammar format, limits, concurrency."""
        return self.engine.describe()

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.close()

    def __enter__(self) -> "ToolRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clear_kv_cache(self) -> None:
        """Forget what the KV cache holds (the next call evaluates its whole prompt, bar the prefix cache)."""
        self.engine.clear_kv_cache()

    def tokenize_segments(self, segments: Iterable[Segment]) -> list[int]:
        return self.engine.tokenize_segments(list(segments))

    # -- requests -----------------------------------------------------------
    def compile_tools(self, tools, tool_choice: str = "auto", parallel: bool = True,
                      syntax: str = "python") -> CompiledTools:
        """Load ``tools`` and compile their call grammar in the engine's form, once: pass the result as a
        request's ``tools``. A bad schema, a tool choice naming no tool, or more tools than the engine
        takes raise SchemaError here, before any work (the server checks requests with it)."""
        if syntax not in ("python", "json"):
            raise SchemaError(f"syntax must be 'python' or 'json', got {syntax!r}.")
        tool_list: list[Tool] = load_tools(tools) if tools else []
        _check_tool_choice(tool_choice, tool_list)
        if not tool_list:
            return CompiledTools([], None, syntax, tool_choice, parallel)
        return self.engine.compile_calls(tool_list, syntax=syntax, tool_choice=tool_choice, parallel=parallel)

    def _compiled(self, tools, tool_choice, parallel, syntax, constrained) -> CompiledTools:
        if isinstance(tools, CompiledTools):
            asked = (syntax, tool_choice, parallel)
            if (tools.syntax, tools.tool_choice, tools.parallel) != asked:
                raise SchemaError(f"tools were compiled for (syntax, tool_choice, parallel) = "
                                  f"{(tools.syntax, tools.tool_choice, tools.parallel)}, not {asked}.")
            return tools
        if not constrained:
            tool_list = load_tools(tools) if tools else []
            _check_tool_choice(tool_choice, tool_list)
            return CompiledTools(tool_list, None, syntax, tool_choice, parallel)
        return self.compile_tools(tools, tool_choice, parallel, syntax)

    def count_prompt_tokens(self, query_or_messages, tools=None, syntax: str = "python") -> int:
        tool_list = tools.tools if isinstance(tools, CompiledTools) else (load_tools(tools) if tools else [])
        parts = render_prompt(query_or_messages, tool_list, syntax)
        return len(self.tokenize_segments(parts.prefix)) + len(self.tokenize_segments(parts.rest))

    def call(self, query_or_messages, tools=None, tool_choice: str = "auto", parallel: bool = True,
             syntax: str = "python", max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop: Sequence[str] | None = None,
             constrained: bool = True, grammar: str | None = None,
             should_stop: Callable[[], bool] | None = None, speculative: bool | None = None) -> CallResult:
        """Answer one request with tool calls (or text): the Final event's result. See stream() for the arguments."""
        for event in self.stream(query_or_messages, tools, tool_choice=tool_choice, parallel=parallel,
                                 syntax=syntax, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop, constrained=constrained, grammar=grammar,
                                 should_stop=should_stop, speculative=speculative):
            if isinstance(event, Final):
                return event.result
        raise GenerationError("the engine ended without a final record.")  # an engine's bug, said plainly

    def stream(self, query_or_messages, tools=None, tool_choice: str = "auto", parallel: bool = True,
               syntax: str = "python", max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] | None = None,
               constrained: bool = True, grammar: str | None = None,
               should_stop: Callable[[], bool] | None = None,
               speculative: bool | None = None) -> Iterator[Event]:
        """Yield the answer as events (results.py): Decoded pieces as the engine decodes them, TextDelta
        (the answer's text) and CallDone (one complete, validated call) as they become known, then one
        Final with the CallResult, built from the same parse.

        query_or_messages: a user query, or OpenAI-style messages.
        tools: Tool objects, tool dicts (OpenAI or BFCL form), a JSON file path, or compile_tools()'s result.
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
        compiled = self._compiled(tools, tool_choice, parallel, syntax, constrained and not grammar_override)
        if not grammar_override:
            grammar = compiled.grammar if constrained else None
        tool_list = compiled.tools
        if not tool_list and tool_choice not in ("none", "auto") and not grammar_override:
            raise SchemaError(f"tool_choice {tool_choice!r} needs at least one tool.")
        parts = render_prompt(query_or_messages, tool_list, syntax)
        calls = bool(tool_list) and not grammar_override
        request = EngineRequest(
            prompt=parts, grammar=grammar, params=params, max_tokens=max_tokens,
            # Stop strings end text answers only: inside a call list they would cut a call in half.
            stop=StopStrings(stop or [], calls=calls), should_stop=should_stop,
            forced_text=(functools.partial(forced_name_suffix, names=[t.name for t in tool_list])
                         if calls and syntax == "python" else None),
            speculative=speculative)
        reader = AnswerReader(tool_list, syntax, calls=calls)
        for item in self.engine.execute(request):
            if isinstance(item, Generation):
                events, result = reader.finish(item.finish)
                yield from events
                result.token_ids = item.tokens
                result.usage = item.usage
                result.timings = item.timings
                result.stats = item.stats
                yield Final(result)
            else:
                yield from reader.feed(item)


def _check_tool_choice(tool_choice, tool_list: list[Tool]) -> None:
    if isinstance(tool_choice, str) and tool_choice not in TOOL_CHOICES:
        names = [t.name for t in tool_list]
        if tool_choice not in names:
            raise SchemaError(
                f"tool_choice {tool_choice!r} names no given tool; expected auto, required, none "
                f"or one of: {', '.join(names) or '(no tools given)'}."
            )
