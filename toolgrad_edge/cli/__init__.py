"""The ``toolgrad-edge`` command.

Commands are imported only when run, so ``toolgrad-edge --help`` stays fast
and a command's heavy imports (llama.cpp, FastAPI) cost nothing to the others.
Each command lives in its own module and keeps its logic in its room.
"""

from __future__ import annotations

import importlib
import sys

import click

from ..errors import ToolgradEdgeError
from .stopping import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, stop_on_signals

# Commands that stop on SIGTERM/SIGINT their own way (uvicorn's shutdown); the others unwind (cli/stopping.py).
HANDLES_ITS_OWN_SIGNALS = {"serve"}

# name -> (module under toolgrad_edge.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "call": ("runtime_cmds", "call", "Turn one request into tool calls."),
    "ask": ("assistant_cmds", "ask", "Answer one question, running the tools it calls."),
    "chat": ("assistant_cmds", "chat", "Interactive assistant whose tool calls run."),
    "info": ("runtime_cmds", "info", "Describe a GGUF model file."),
    "doctor": ("doctor_cmd", "doctor", "Check the install and self-test the model here."),
    "bench": ("bench_cmd", "bench", "Measure decode/prefill speed and quality."),
    "grammar": ("grammar_cmd", "grammar", "Print the GBNF grammar for a tools file."),
    "convert": ("convert_cmd", "convert", "Convert safetensors (folder or hub id) to GGUF."),
    "quantize": ("convert_cmd", "quantize", "Quantize a GGUF with llama.cpp's quantizer."),
    "serve": ("serve_cmd", "serve", "OpenAI-compatible local server."),
    "build-server": ("build_server_cmd", "build_server", "Build llama.cpp's llama-server for this install."),
    "cache": ("cache_cmd", "cache", "List the caches and their sizes; clean them."),
    "eval": ("eval_cmd", "eval_group", "Accuracy evaluations (BFCL)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            with stop_on_signals(_command_name(ctx) not in HANDLES_ITS_OWN_SIGNALS):
                return super().invoke(ctx)
        except ToolgradEdgeError as exc:
            # One clear line and exit 1: users never see a traceback.
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            click.echo("Terminated.", err=True)
            sys.exit(EXIT_TERMINATED)


def _command_name(ctx: click.Context) -> str | None:
    # The subcommand's name is the first argument click has not parsed yet (protected_args before click 8.2).
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", None) or []
    args = [*protected, *ctx.args]
    return args[0] if args else None


@click.group(cls=LazyGroup)
@click.version_option(package_name="toolgrad-edge")
def main() -> None:
    """Tool calling with ToolGrad / Gemma 3 on llama.cpp, on-device.

    \b
    Examples:
      toolgrad-edge call "Weather in Paris?" --tools tools.json
      toolgrad-edge convert zhongyi-zhou/toolgrad-4b --quant Q4_K_M
      toolgrad-edge serve --port 8080
    """
