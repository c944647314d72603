"""Options shared by several commands, defined once."""

from __future__ import annotations

import os

import click

model_option = click.option(
    "--model", "-m", "model", type=click.Path(dir_okay=False), default=None,
    help="GGUF file. Default: $TOOLGRAD_EDGE_MODEL, a ToolGrad GGUF in the cache, else Gemma 3 270M.",
)
tools_option = click.option(
    "--tools", "-t", "tools_file", type=click.Path(dir_okay=False), required=True,
    help="JSON file with a list of tools (OpenAI or BFCL function format).",
)
tool_choice_option = click.option(
    "--tool-choice", default="auto", show_default=True, metavar="auto|required|none|NAME",
    help="auto: calls or text; required: at least one call; none: text only; NAME: only that tool.",
)
parallel_option = click.option(
    "--parallel/--no-parallel", default=True, show_default=True,
    help="Allow several calls in one answer.",
)
syntax_option = click.option(
    "--syntax", type=click.Choice(["python", "json"]), default="python", show_default=True,
    help="Call syntax the model writes: ToolGrad's python call list, or JSON.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _use_engine(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Handed to ToolRuntime through $TOOLGRAD_EDGE_ENGINE, which every command's runtime reads.
    if value is not None:
        from ..engines.llama_server import ENV_ENGINE, is_engine_url

        if not is_engine_url(value):
            raise click.BadParameter(f"expected http://HOST:PORT of a llama-server, got {value!r}.")
        os.environ[ENV_ENGINE] = value


engine_option = click.option(
    "--engine", metavar="URL", default=None, expose_value=False, callback=_use_engine,
    help="Decode on the llama-server at URL (http://HOST:PORT) instead of a local model "
         "(or set $TOOLGRAD_EDGE_ENGINE). A --model given too wins.",
)


class _QuietAliasOption(click.Option):
    """An option whose first name is shown in --help; the others (old spellings) still work."""

    def get_help_record(self, ctx: click.Context):
        names = self.opts
        self.opts = names[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names


n_ctx_option = click.option(
    "--n-ctx", "--ctx", "n_ctx", cls=_QuietAliasOption, type=click.IntRange(256), default=None,
    help="Context size in tokens (default: min(model, 8192)).",
)


class SeedType(click.ParamType):
    """Any 64-bit integer, signed or not (-1 included), taken modulo 2**64 as the sampler wants."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            seed = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if not -(2**63) <= seed < 2**64:
            self.fail(f"{seed} is not a 64-bit integer (from -2**63 to 2**64 - 1)", param, ctx)
        return seed % 2**64


class PromptText(click.ParamType):
    """Text that can go into a prompt: valid Unicode.

    Bytes that are not UTF-8 reach Python as lone surrogates (U+DC80-U+DCFF),
    which would fail later, deep in tokenization; they are refused here.
    """

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            what = (f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF
                    else f"lone surrogate U+{ord(char):04X}")
            self.fail(f"is not valid UTF-8 text ({what} at character {exc.start}); "
                      "re-encode it as UTF-8", param, ctx)
        return value


seed_option = click.option("--seed", type=SeedType(), default=None,
                           help="Sampling seed (with --temperature > 0): any 64-bit integer, -1 included.")
PROMPT_TEXT = PromptText()
