"""Engines under the runtime: where the forward passes happen.

``base`` says what the runtime needs from an engine (``Engine``: an
``EngineRequest`` in, text pieces and a ``Generation`` out) and what the
decode loop needs from a model session (``DecodeSession``). ``inprocess`` is the
in-process engine (a GGUF on llama.cpp: ``LlamaSession`` in ``llama_session``,
the decode loop, the prefix cache, a draft model), and ``batched`` the same for
several requests at once in one context; ``llama_server`` decodes
on a llama-server. A new back-end is a new file with an ``Engine`` class:
pass an instance as ``ToolRuntime(engine=...)``, or give it a spelling in
``open_engine``.
"""

from __future__ import annotations

import os

from ..errors import GenerationError
from .base import CompiledTools, Engine, EngineDescription, EngineRequest, Generation, StopStrings


def open_engine(engine=None, model: str | os.PathLike | None = None, *, draft_model=None, grammar_engine=None,
                parallel: int | str = 1, **local_options) -> Engine:
    """The engine for ``ToolRuntime(model, engine=...)``.

    ``engine``: an Engine object (used as it is), "http://HOST:PORT" or a
    LlamaServerEngine (decode on that llama-server), "inprocess", or None:
    then $TOOLGRAD_EDGE_ENGINE applies unless a model file is named. The
    other options configure the in-process engine; a remote one refuses
    those that only a local model can honour.
    """
    from .llama_server import LlamaServerEngine, remote_engine

    if engine is not None and not isinstance(engine, (str, LlamaServerEngine)):
        return engine  # already built with its own options
    remote = remote_engine(engine, model)
    if remote is not None:
        remote.refuse_local_options(draft_model=draft_model, grammar_engine=grammar_engine)
        if parallel not in (1, "auto"):
            remote.close()
            raise GenerationError(f"parallel={parallel} sets how many requests the in-process engine decodes at "
                                  "once; a llama-server batches with its own slots (its --parallel/-np).")
        return remote
    if parallel != 1:
        from .batched import open_batched

        return open_batched(model, parallel, draft_model=draft_model, grammar_engine=grammar_engine,
                            **local_options)
    from .inprocess import InProcessEngine

    return InProcessEngine(model, draft_model=draft_model, grammar_engine=grammar_engine, **local_options)


__all__ = ["CompiledTools", "Engine", "EngineDescription", "EngineRequest", "Generation", "StopStrings", "open_engine"]
