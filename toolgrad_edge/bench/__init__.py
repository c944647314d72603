"""Measurements behind `toolgrad-edge bench`, above the runtime.

``measure``: one GGUF file's speed (free, constrained, stepwise decoding and
llama-cpp-python's own grammar path, medians after a warm-up), in a child
process per file (``python -m toolgrad_edge.bench.measure``); ``compare``:
several files side by side, with quality against the highest-precision one;
``remote``: the same tool-call workload over a llama-server; ``agreement``:
the bench's requests alone and N at once on the batched engine, token by token.
"""
