"""``toolgrad-edge build-server``: llama.cpp's llama-server, from the llama.cpp this install runs."""

from __future__ import annotations

import click


@click.command("build-server")
@click.option("--jobs", "-j", type=click.IntRange(1), default=None, help="Parallel compile jobs (default: CPUs).")
def build_server(jobs):
    """Build llama-server from llama-cpp-python's sources once, and print its path.

    The server decodes with the same llama.cpp (kernels, tokenizer, chat
    template) as the in-process engine, for `serve --engine URL` and
    `ToolRuntime(engine=URL)` when one machine is not enough. It needs cmake
    and a C++ compiler, downloads the llama-cpp-python source distribution of
    the installed version, and takes many minutes on 2 cores; later runs print
    the cached path at once. On a CPU with AMX it builds without llama.cpp's
    AMX kernels, which crash there (docs/engines.md).

    \b
    Examples:
      toolgrad-edge build-server
      server="$(toolgrad-edge build-server)" && "$server" -m model.gguf --port 8080 --swa-full
    """
    from ..engines.server_build import ENV_BINARY, build_llama_server

    binary = build_llama_server(jobs)
    click.echo(str(binary))
    click.echo(f"export {ENV_BINARY}={binary}   # for the real-server tests and benchmarks/engines.py", err=True)
