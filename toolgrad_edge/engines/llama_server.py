"""llama.cpp's llama-server as an engine: the same prompt, grammar and parsing, decoded elsewhere.

The prompt is rendered here and sent as token ids to the server's native
``/completion`` endpoint: control markers by id, text tokenized by the
server's ``/tokenize`` without special tokens, so user text that spells
``<end_of_turn>`` stays text and cannot close a turn. The tools' GBNF grammar
goes in ``grammar``; ``cache_prompt`` lets a slot keep the evaluated tool
prefix between requests. The answer comes back as text (streamed as SSE when
asked) and is parsed and validated by the caller, as for in-process decoding.

Standard library only. Every wait is bounded: connecting (``timeout``, 10 s
by default) and the silence between two pieces of an answer
(``read_timeout``). Reading happens on a helper thread, so ``should_stop``
is polled even while the server is silent; cancelling closes the connection,
which makes llama-server drop the generation.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from ..errors import ContextLengthError, GenerationError, ModelLoadError
from ..results import Timings, Usage
from .base import GBNF_MAX_TOOLS, CompiledTools, EngineDescription, EngineRequest, Generation, compile_calls

if TYPE_CHECKING:
    from ..decoding import SamplingParams
    from ..prompt import Segment

DEFAULT_TIMEOUT_S = 10.0  # connecting, /props, /tokenize: a dead server is reported within this
DEFAULT_READ_TIMEOUT_S = 120.0  # longest silence while a request waits for a slot, prefills or decodes
POLL_S = 0.05  # how often should_stop is polled while waiting
ENV_ENGINE = "TOOLGRAD_EDGE_ENGINE"
ENV_API_KEY = "TOOLGRAD_EDGE_ENGINE_API_KEY"  # for a llama-server started with --api-key

# Gemma 3's control tokens, by the ids every Gemma 3 vocabulary gives them.
GEMMA3_CONTROL_IDS = {"<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
GEMMA3_MIN_VOCAB = 262144

# llama-server's sampler defaults differ from this project's (min_p 0.05,
# top_k 40, top_p 0.95, repeat penalty in older builds): pin every sampler
# the in-process decoder does not use to "off", so both decode the same way.
NEUTRAL_SAMPLING = {
    "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0,
}
# llama-server's stop_type -> the runtime's finish_reason.
FINISH = {"eos": "stop", "word": "stop", "limit": "length"}


def is_engine_url(engine: str | None) -> bool:
    return isinstance(engine, str) and engine.startswith(("http://", "https://"))


def remote_engine(engine, model=None) -> "LlamaServerEngine | None":
    """The engine a ToolRuntime should use: a connected LlamaServerEngine, or None for in-process.

    ``engine`` is a URL, a LlamaServerEngine (to set its timeouts), "inprocess",
    or None: then $TOOLGRAD_EDGE_ENGINE applies, unless a model file was named.
    """
    from_env = engine is None and model is None
    if from_env:
        engine = os.environ.get(ENV_ENGINE) or None
    if engine is None or engine == "inprocess":
        return None
    if isinstance(engine, LlamaServerEngine):
        if engine.info is None:
            engine.connect()
        return engine
    if is_engine_url(engine):
        return LlamaServerEngine(engine)
    where = f"${ENV_ENGINE}={engine!r}" if from_env else f"engine {engine!r}"
    raise GenerationError(f"{where}: expected http://HOST:PORT of a llama-server, or 'inprocess'.")


@dataclass
class ServerInfo:
    url: str
    model: str  # the model path or alias the server reports
    n_ctx: int  # context of one slot
    n_vocab: int | None
    total_slots: int | None
    build: str | None
    control_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class Completion:
    """The final record of one remote generation (after its text deltas)."""

    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    stopping_word: str = ""
    server_timings: dict = field(default_factory=dict)


class LlamaServerEngine:
    """A client of one llama-server; safe to share between threads (one connection per request).

    As a ToolRuntime's engine (``execute``) it decodes the runtime's prompt
    with the runtime's GBNF grammar; ``close()`` ends the requests still
    running (their connections close, so llama-server stops them) and refuses
    new ones. ``generate`` is the plain client underneath.
    """

    grammar_engine = "llama-server"
    grammar_format = "gbnf"
    # Nothing of these runs here: the server decodes one token per step as it sees fit.
    speculative = fast_forward = False
    n_threads = n_gpu_layers = 0

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S, read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                 connect: bool = True, api_key: str | None = None):
        self.url = _normalize_url(url)
        api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._base_path = parts.path.rstrip("/")
        if timeout <= 0 or read_timeout <= 0:
            raise GenerationError(f"timeouts must be > 0 s, got timeout={timeout} read_timeout={read_timeout}.")
        self.timeout = float(timeout)
        self.read_timeout = float(read_timeout)
        self.info: ServerInfo | None = None
        self._control: dict[str, int] = {}
        self._text_cache: OrderedDict[str, list[int]] = OrderedDict()  # the tool prefix is long and repeats
        self._cache_lock = threading.Lock()
        self._closed = False
        if connect:
            self.connect()

    # -- connecting -------------------------------------------------------------
    def connect(self) -> ServerInfo:
        """Ask the server what it serves; refuse anything that is not a Gemma 3 vocabulary."""
        props = self._get_json("/props")
        models = self._get_json("/v1/models", optional=True) or {}
        settings = props.get("default_generation_settings") or {}
        meta = {}
        model = str(props.get("model_path") or "")
        data = models.get("data") if isinstance(models, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            meta = data[0].get("meta") or {}
            model = model or str(data[0].get("id") or "")
        n_vocab = meta.get("n_vocab")
        control = {name: self.tokenize(name, special=True) for name in GEMMA3_CONTROL_IDS}
        wrong = {name: ids for name, ids in control.items() if ids != [GEMMA3_CONTROL_IDS[name]]}
        if wrong or (isinstance(n_vocab, int) and n_vocab < GEMMA3_MIN_VOCAB):
            found = ", ".join(f"{name} -> {ids}" for name, ids in (wrong or control).items())
            raise ModelLoadError(
                f"llama-server at {self.url} serves {model or 'a model'} (n_vocab {n_vocab}), which is not a Gemma 3 "
                f"vocabulary: expected <bos>=2, <start_of_turn>=105, <end_of_turn>=106 and n_vocab >= "
                f"{GEMMA3_MIN_VOCAB}, found {found}. Start llama-server with a ToolGrad or Gemma 3 GGUF."
            )
        self._control = {name: ids[0] for name, ids in control.items()}
        n_ctx = settings.get("n_ctx") or meta.get("n_ctx_train") or 0
        self.info = ServerInfo(url=self.url, model=model, n_ctx=int(n_ctx), n_vocab=n_vocab,
                               total_slots=props.get("total_slots"), build=props.get("build_info"),
                               control_ids=dict(self._control))
        return self.info

    @property
    def n_ctx(self) -> int:
        return self.info.n_ctx if self.info else 0

    # -- as a ToolRuntime's engine ------------------------------------------------
    @property
    def engine_info(self) -> ServerInfo:
        return self.info if self.info is not None else self.connect()

    @property
    def model_path(self) -> Path:
        return Path(self.engine_info.model or "llama-server")

    @property
    def model_name(self) -> str:
        return self.model_path.stem

    @property
    def backend(self) -> str:
        return f"llama-server at {self.url}"

    @property
    def concurrency(self) -> int:
        """llama-server's slots: requests decode side by side there."""
        return max(1, int(self.engine_info.total_slots or 1))

    @property
    def session(self):
        self._require_open()
        raise GenerationError(f"this ToolRuntime decodes on llama-server at {self.url}: "
                              "it holds no local model session (tokens, KV cache).")

    def clear_kv_cache(self) -> None:
        self.session  # noqa: B018 - raises: the KV caches are the server's slots'

    def describe(self) -> EngineDescription:
        return EngineDescription(
            model_name=self.model_name, model_path=self.model_path, backend=self.backend, n_ctx=self.n_ctx,
            grammar_engine=self.grammar_engine, grammar_format=self.grammar_format, max_tools=GBNF_MAX_TOOLS,
            concurrency=self.concurrency, speculative=False, server=self.engine_info)

    def compile_calls(self, tools, *, syntax: str, tool_choice: str, parallel: bool) -> CompiledTools:
        return compile_calls(self.grammar_format, tools, syntax=syntax, tool_choice=tool_choice, parallel=parallel,
                             gbnf_sampler=(f"llama-server at {self.url}",
                                           "serve a local model (no --engine) with the llguidance grammar engine, "
                                           "which has no tool limit"))

    def refuse_local_options(self, **options) -> None:
        """Refuse options that only a local model can honour (draft_model, grammar_engine), naming them."""
        local = [name for name, value in options.items() if value is not None]
        if local:
            raise ModelLoadError(
                f"{' and '.join(local)} apply to a local model, but this runtime decodes on the llama-server at "
                f"{self.url} (engine, or ${ENV_ENGINE}), which samples with its own "
                f"GBNF grammar support; drop {' and '.join(local)} or decode locally with a model.")

    def _require_open(self) -> None:
        if self._closed:
            raise GenerationError(f"this ToolRuntime (over llama-server at {self.url}) is closed; "
                                  "open a new one to make more calls.")

    def close(self) -> None:
        """Refuse new requests; those still running see it within POLL_S and close their connections."""
        self._closed = True

    def __enter__(self) -> "LlamaServerEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokens -------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """The server's tokenization of ``text`` (no BOS; control tokens only if ``special``)."""
        if not text:
            return []
        if not special:
            with self._cache_lock:
                cached = self._text_cache.get(text)
                if cached is not None:
                    self._text_cache.move_to_end(text)
                    return list(cached)
        answer = self._post_json("/tokenize", {"content": text, "add_special": False, "parse_special": special})
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise GenerationError(f"llama-server at {self.url}: /tokenize answered {str(answer)[:120]!r}, "
                                  "expected {\"tokens\": [ids]}.")
        if not special:
            with self._cache_lock:
                self._text_cache[text] = list(tokens)
                while len(self._text_cache) > 64:
                    self._text_cache.popitem(last=False)
        return tokens

    def tokenize_segments(self, segments: Sequence["Segment"]) -> list[int]:
        """Control segments by id, text segments through /tokenize without specials."""
        if not self._control:
            self.connect()
        tokens: list[int] = []
        for seg in segments:
            if seg.control:
                try:
                    tokens.append(self._control[seg.text])
                except KeyError:
                    raise GenerationError(f"no token id known for control marker {seg.text!r}.") from None
            elif seg.text:
                tokens += self.tokenize(seg.text, special=False)
        return tokens

    # -- generation ---------------------------------------------------------------
    def request_body(self, prompt: list[int], grammar: str | None, params: "SamplingParams | None",
                     max_tokens: int, stop: Sequence[str] = (), stream: bool = False) -> dict:
        temperature = float(params.temperature) if params else 0.0
        body: dict = {
            "prompt": list(prompt),
            "n_predict": int(max_tokens),
            "cache_prompt": True,
            "stream": bool(stream),
            "stop": list(stop),
            "temperature": temperature,
            # Greedy either way; top_k 1 spares the server a softmax over 262k candidates per token.
            "top_k": 1 if temperature == 0 else int(params.top_k),
            "top_p": float(params.top_p) if params else 1.0,
            "seed": params.seed if params is not None and params.seed is not None else -1,
            **NEUTRAL_SAMPLING,
        }
        if grammar:
            body["grammar"] = grammar
        return body

    def generate(self, prompt: Sequence[int] | Sequence["Segment"], grammar: str | None = None,
                 params: "SamplingParams | None" = None, max_tokens: int = 256, stop: Sequence[str] = (),
                 should_stop: Callable[[], bool] | None = None, stream: bool = True) -> Iterator[str | Completion]:
        """Yield text deltas (when ``stream``), then one Completion.

        ``prompt`` is token ids, or Segments to tokenize here. Raises
        GenerationError, naming the URL, for an unreachable server, an HTTP
        error, a stream that ends early or a silence longer than read_timeout.
        """
        if max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}.")
        tokens = _as_tokens(self, prompt)
        if not tokens:
            raise GenerationError("the prompt is empty.")
        if self.info is None:
            self.connect()
        if self.info.n_ctx and len(tokens) + max_tokens > self.info.n_ctx:
            raise ContextLengthError(
                f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}, which exceeds the "
                f"{self.info.n_ctx}-token context of a slot of llama-server at {self.url}; shorten the request, "
                "lower max_tokens, or start llama-server with a larger --ctx-size (it is shared by --parallel slots)."
            )
        body = self.request_body(tokens, grammar, params, max_tokens, stop, stream)
        t0 = time.perf_counter()
        exchange = _Exchange(self, "/completion", body, stream=stream)
        text = ""
        ttft = None
        final: dict | None = None
        try:
            for event in exchange.events(should_stop):
                if event is None:  # cancelled: the connection is closed, the server drops the request
                    yield Completion(text, "cancelled", prompt_tokens=len(tokens), ttft_s=ttft or 0.0,
                                     total_s=time.perf_counter() - t0)
                    return
                content = event.get("content") or ""
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text += content
                    if stream:
                        yield content
                if event.get("stop") is True:
                    final = event
                    break
        finally:
            exchange.close()
        if final is None:
            raise GenerationError(f"llama-server at {self.url}: the answer ended before the completion finished "
                                  f"({len(text)} characters in); the server may have crashed or been stopped.")
        total = time.perf_counter() - t0
        timings = final.get("timings") if isinstance(final.get("timings"), dict) else {}
        finish = FINISH.get(final.get("stop_type"), "stop")
        if final.get("truncated"):
            finish = "length"
        yield Completion(
            text=text, finish_reason=finish,
            prompt_tokens=int(final.get("tokens_evaluated") or len(tokens)),
            completion_tokens=int(final.get("tokens_predicted") or 0),
            cached_tokens=int(timings.get("cache_n") or 0),
            ttft_s=ttft if ttft is not None else total, total_s=total,
            stopping_word=str(final.get("stopping_word") or ""), server_timings=timings,
        )

    def execute(self, request: EngineRequest) -> Iterator[str | Generation]:
        """ToolRuntime's request over llama-server: text pieces, then the Generation.

        Stop strings follow the in-process rules (they end text answers, never a
        call list), so they are matched here; a hit closes the request. No lock:
        llama-server's slots run requests side by side.
        """
        self._require_open()
        should_stop = request.should_stop
        stops = request.stop
        t0 = time.perf_counter()
        prompt = self.tokenize_segments(tuple(request.prompt.prefix) + tuple(request.prompt.rest))
        text = ""
        emitted = 0
        stop_hit = False
        first_piece = None
        completion: Completion | None = None

        def asked_to_stop() -> bool:
            return should_stop is not None and bool(should_stop())

        def cancelled() -> bool:
            return stop_hit or self._closed or asked_to_stop()

        for item in self.generate(prompt, request.grammar, request.params, request.max_tokens, (), cancelled,
                                  stream=True):
            if isinstance(item, Completion):
                completion = item
                break
            if first_piece is None:
                first_piece = time.perf_counter()
            text += item
            cut = stops.find(text, emitted)
            if cut is not None:
                text = text[:cut]
                stop_hit = True
                continue  # the next poll of cancelled() closes the request
            hold = stops.hold(text)
            if len(text) - hold > emitted:
                yield text[emitted:len(text) - hold]
                emitted = len(text) - hold
        assert completion is not None
        if completion.finish_reason == "cancelled" and self._closed and not stop_hit and not asked_to_stop():
            raise GenerationError(f"this ToolRuntime (over llama-server at {self.url}) was "
                                  "closed during the request.")
        if len(text) > emitted:
            yield text[emitted:]
        finish = "stop" if stop_hit else completion.finish_reason
        total = time.perf_counter() - t0
        # As the caller sees it: from the call (tokenizing through /tokenize included) to the first piece.
        ttft = first_piece - t0 if first_piece is not None else total
        yield Generation(
            text=text, finish=finish,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion.completion_tokens,
                        cached_tokens=completion.cached_tokens),
            timings=Timings(ttft_s=ttft, decode_s=total - ttft, total_s=total),
        )

    # -- HTTP -----------------------------------------------------------------------
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise GenerationError(f"cannot reach llama-server at {self.url}: {_reason(exc)}.") from None
        return conn

    def _get_json(self, path: str, optional: bool = False):
        return self._roundtrip("GET", path, None, optional)

    def _post_json(self, path: str, body: dict):
        return self._roundtrip("POST", path, body, False)

    def _roundtrip(self, method: str, path: str, body: dict | None, optional: bool):
        conn = self._connection(self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, self._base_path + path, body=payload, headers={**headers, **self._auth})
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise GenerationError(f"llama-server at {self.url}{path}: {_reason(exc)}.") from None
        finally:
            conn.close()
        if response.status == 404 and optional:
            return None
        if response.status != 200:
            raise _http_error(self.url, path, response.status, raw)
        try:
            return json.loads(raw)
        except ValueError:
            raise GenerationError(f"llama-server at {self.url}{path}: the answer is not JSON "
                                  f"({raw[:80]!r}); is this a llama-server?") from None


class _Exchange:
    """One /completion request whose answer is read on a helper thread.

    The caller waits on a queue in short slices, so it can notice should_stop
    and the read timeout while the socket is silent; close() shuts the socket
    down, which both ends the helper's blocking read and tells llama-server
    the client has gone (it then cancels the generation).
    """

    def __init__(self, engine: LlamaServerEngine, path: str, body: dict, stream: bool):
        self.engine = engine
        self.path = path
        self.stream = stream
        self._events: queue.Queue = queue.Queue()
        self._closed = False
        self._conn = engine._connection(engine.timeout)
        # Held here too: http.client drops conn.sock once the response owns the socket.
        self._sock = self._conn.sock
        try:
            # The helper's reads give up a little after the caller would.
            self._sock.settimeout(engine.read_timeout + 5.0)
            self._conn.request("POST", engine._base_path + path, body=json.dumps(body).encode(),
                               headers={**engine._auth, "Content-Type": "application/json",
                                        "Accept": "text/event-stream" if stream else "application/json"})
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise GenerationError(f"llama-server at {engine.url}{path}: sending the request failed: "
                                  f"{_reason(exc)}.") from None
        self._reader = threading.Thread(target=self._read, name="llama-server-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        put = self._events.put
        try:
            response = self._conn.getresponse()
            if response.status != 200:
                put(("error", _http_error(self.engine.url, self.path, response.status, response.read())))
                return
            if not self.stream:
                put(("data", json.loads(response.read())))
                put(("end", None))
                return
            data_lines: list[str] = []
            while True:
                line = response.readline()
                if not line:
                    break
                line = line.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line:  # an empty line ends one SSE event
                    if data_lines:
                        payload = "\n".join(data_lines)
                        data_lines = []
                        if payload.strip() == "[DONE]":
                            continue
                        put(("data", json.loads(payload)))
                    continue
                if line.startswith(":"):
                    put(("ping", None))  # a comment: the server is alive
                elif line.startswith("data:"):
                    data_lines.append(line[5:].lstrip())
            if data_lines:
                put(("data", json.loads("\n".join(data_lines))))
            put(("end", None))
        except ValueError as exc:
            put(("error", GenerationError(f"llama-server at {self.engine.url}{self.path}: an answer is not "
                                          f"valid JSON ({exc}).")))
        except (OSError, http.client.HTTPException) as exc:
            if not self._closed:
                put(("error", GenerationError(f"llama-server at {self.engine.url}{self.path}: the connection "
                                              f"broke while reading the answer ({_reason(exc)}).")))
        except BaseException as exc:  # never die silently: the caller would wait for the read timeout
            put(("error", GenerationError(f"llama-server at {self.engine.url}{self.path}: {exc!r}.")))

    def events(self, should_stop: Callable[[], bool] | None) -> Iterator[dict | None]:
        """Decoded JSON events; None once when should_stop turned true (the request is then closed)."""
        timeout = self.engine.read_timeout
        last = time.monotonic()
        while True:
            if should_stop is not None and should_stop():
                self.close()
                yield None
                return
            try:
                kind, payload = self._events.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() - last > timeout:
                    self.close()
                    raise GenerationError(
                        f"llama-server at {self.engine.url}{self.path}: no answer for {timeout:g} s "
                        "(raise read_timeout if the server is just busy)."
                    ) from None
                continue
            last = time.monotonic()
            if kind == "error":
                raise payload
            if kind == "end":
                return
            if kind == "data":
                if not isinstance(payload, dict):
                    raise GenerationError(f"llama-server at {self.engine.url}{self.path}: expected a JSON object, "
                                          f"got {str(payload)[:80]!r}.")
                if "error" in payload:
                    raise GenerationError(f"llama-server at {self.engine.url}{self.path} failed while generating: "
                                          f"{_error_message(payload)}.")
                yield payload

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
        self._sock.close()


def _normalize_url(url: str) -> str:
    url = (url or "").strip()
    if not url:
        raise GenerationError("the engine URL is empty; expected http://HOST:PORT of a llama-server.")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GenerationError(f"engine {url!r}: expected http://HOST:PORT of a llama-server.")
    try:
        parts.port
    except ValueError:
        raise GenerationError(f"engine {url!r}: the port is not a number.") from None
    return url.rstrip("/")


def _as_tokens(engine: LlamaServerEngine, prompt) -> list[int]:
    items = list(prompt)
    if all(isinstance(t, int) for t in items):
        return items
    return engine.tokenize_segments(items)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


def _error_message(payload) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error if error is not None else payload)[:300]


def _http_error(url: str, path: str, status: int, raw: bytes) -> GenerationError:
    try:
        message = _error_message(json.loads(raw))
    except ValueError:
        message = raw[:200].decode("utf-8", errors="replace").strip() or http.client.responses.get(status, "")
    if "context size" in message or "context length" in message:
        return ContextLengthError(f"llama-server at {url}{path}: {message}")
    return GenerationError(f"llama-server at {url}{path} answered HTTP {status}: {message}")
