"""Options shared by several commands, defined once."""

from __future__ import annotations

import functools

import click

model_option = click.option(
    "--model", "-m", "model", type=click.Path(dir_okay=False), default=None,
    help="GGUF file. Default: $TOOLGRAD_EDGE_MODEL, a ToolGrad GGUF in the cache, else Gemma 3 270M. "
         "Given here, it is decoded in this process even when $TOOLGRAD_EDGE_ENGINE is set.",
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


ENGINE_AND_MODEL = ("--model and --engine both given: --engine runs on a remote llama-server, which uses its "
                    "own model; drop one of them.")


def check_engine_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from ..engines.llama_server import is_engine_url

        if not is_engine_url(value):
            raise click.BadParameter(f"expected http://HOST:PORT of a llama-server, got {value!r}.")
    return value


def engine_option(command):
    """--engine URL: decode on a llama-server. Refused together with --model.

    The command gets it as its ``engine`` argument and passes it down to
    every ToolRuntime it opens (``ToolRuntime(engine=...)``).
    """

    @functools.wraps(command)
    def run(*args, engine: str | None = None, **kwargs):
        if engine is not None and kwargs.get("model") is not None:
            raise click.UsageError(ENGINE_AND_MODEL, click.get_current_context())
        return command(*args, engine=engine, **kwargs)

    return click.option(
        "--engine", "engine", metavar="URL", default=None, callback=check_engine_url,
        help="Decode on the llama-server at URL (http://HOST:PORT) instead of a local model; "
             "$TOOLGRAD_EDGE_ENGINE sets a default, which a --model given here overrides. "
             "--engine and --model together are an error.",
    )(run)


class _QuietAliasOption(click.Option):
    """An option whose first name is shown in --help; the others (old spellings) still work."""

    def get_help_record(self, ctx: click.Context):
        names = self.opts
        self.opts = names[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names


class ContextLength(click.ParamType):
    """``auto`` or a number of tokens (at least 256)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return value
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor a number of tokens", param, ctx)
        if n < 256:
            self.fail(f"{n} is below the smallest context, 256 tokens", param, ctx)
        return n


n_ctx_option = click.option(
    "--n-ctx", "--ctx", "n_ctx", cls=_QuietAliasOption, type=ContextLength(), default="auto", show_default=True,
    help="Context size in tokens, or auto: the longest of 8192/4096/2048/1024/512 (at most the model's) for "
         "which weights, KV cache and compute fit the available RAM (`toolgrad-edge doctor` shows the choice).",
)
kv_type_option = click.option(
    "--kv-type", type=click.Choice(["auto", "f16", "q8_0"]), default="auto", show_default=True,
    help="KV cache type. auto: f16, or q8_0 (with flash attention, about half the bytes) where f16 does not fit.",
)
swa_full_option = click.option(
    "--swa-full/--no-swa-full", default=None,
    help="Keep every position of the sliding-window layers (prefix reuse at any point relies on it), or only "
         "their window (on ToolGrad 4B at 8k the KV cache drops from 1.14 to 0.35 GB). Default: kept, unless "
         "dropping it is what lets a longer context fit in RAM (`toolgrad-edge doctor` says which).",
)
threads_help = "CPU threads (default: the physical cores this process may use; `toolgrad-edge doctor` says why)."


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
