"""ToolGrad's trained prompt: BFCL's default prompting format in Gemma 3 turns.

ToolGrad was fine-tuned and scored with BFCL's default system prompt for
prompting models (the "expert in composing functions" text, then the tools as
``json.dumps(functions, indent=4)``), which Gemma receives as a prefix of the
first user turn because Gemma has no system role.

The prompt is returned in two parts: ``prefix`` depends only on the tools
(and any system message), so its evaluated state can be cached and reused for
every request with the same tools; ``turns`` holds the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .errors import GenerationError
from .grammars import Tool, ToolCall, render_calls

# BFCL's default system prompt for prompting models, as ToolGrad was trained on
# it (bfcl_eval/constants/default_prompts.py, _DEFAULT_SYSTEM_PROMPT).
CALL_FORMAT = {
    "python": "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]",
    "json": '[{"name": "func_name1", "arguments": {"params_name1": "params_value1", "params_name2": "params_value2"}}, {"name": "func_name2", "arguments": {}}]',
}
SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out. If the given question lacks the parameters required "
    "by the function, also point it out.\n"
    "You should only return the function calls in your response.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of {call_format}\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "At each turn, you should try your best to complete the tasks requested by the user within the current turn. "
    "Continue to output functions to call until you have fulfilled the user's request to the best of your ability. "
    "Once you have no more functions to call, the system will consider the current turn complete and proceed to "
    "the next turn or task.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n{functions}\n"
)

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Segment:
    """A piece of prompt: control tokens by name, or plain text tokenized without specials.

    Keeping user text apart from control tokens means a user who types
    ``<end_of_turn>`` cannot close the turn: it is tokenized as text.
    """

    text: str
    control: bool = False
    # The token ids of `text` when they are known (a model answer as it was
    # decoded, which need not be the canonical tokenization of its text): a
    # tokenizer that honours them re-creates the KV cache's tokens exactly.
    tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PromptParts:
    prefix: tuple[Segment, ...]  # depends only on tools + system text: cacheable
    rest: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.prefix + self.rest)


def system_prompt(tools: Sequence[Tool], syntax: str = "python") -> str:
    functions = json.dumps([t.spec for t in tools], indent=4)
    return SYSTEM_PROMPT.format(call_format=CALL_FORMAT[syntax], functions=functions)


def normalize_messages(query_or_messages: str | Iterable[dict]) -> list[dict]:
    """Accept a plain query or OpenAI-style messages; check roles and content types."""
    if isinstance(query_or_messages, str):
        return [{"role": "user", "content": query_or_messages}]
    messages = list(query_or_messages)
    if not messages:
        raise GenerationError("messages is empty: give at least one user message.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise GenerationError(
                f"messages[{i}]: expected a dict with role one of {', '.join(ROLES)}, got {message!r:.80}."
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise GenerationError(f"messages[{i}].content: expected a string or a list of text parts.")
    return messages


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # OpenAI content parts: keep the text ones.
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _assistant_text(message: dict, syntax: str) -> str:
    raw = message.get("raw_text")
    if isinstance(raw, str) and raw.strip():
        # The model's own text, as it was decoded: rendered unchanged, the next
        # request's tokens match the KV cache up to the end of this answer.
        return raw
    text = _content_text(message.get("content")).strip()
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise GenerationError(f"assistant tool call {function.get('name')!r}: arguments are not valid JSON ({exc}).") from None
        calls.append(ToolCall(name=function.get("name", ""), arguments=arguments))
    if calls:
        rendered = render_calls(calls, syntax)
        text = f"{text}\n{rendered}" if text else rendered
    return text


def _raw_tokens(message: dict, text: str) -> tuple[int, ...] | None:
    """The token ids of an assistant answer, when the message carries them with its raw text."""
    tokens = message.get("raw_tokens")
    if text != message.get("raw_text") or not isinstance(tokens, (list, tuple)) or not tokens:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        return None
    return tuple(tokens)


def _tool_text(message: dict) -> str:
    name = message.get("name") or message.get("tool_call_id") or "tool"
    return f"Result of {name}: {_content_text(message.get('content')).strip()}"


def render_prompt(query_or_messages: str | Iterable[dict], tools: Sequence[Tool], syntax: str = "python",
                  include_tools: bool = True) -> PromptParts:
    """Render messages into Gemma 3 turns with ToolGrad's system prompt.

    ``<bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n``.
    Tool results become user turns (Gemma has no tool role), and consecutive
    user-side turns are merged, as BFCL does, so roles alternate.
    """
    messages = normalize_messages(query_or_messages)
    system_parts = [_content_text(m.get("content")).strip() for m in messages if m["role"] == "system"]
    if tools and include_tools:
        system_parts.insert(0, system_prompt(tools, syntax).strip())
    system = "\n\n".join(p for p in system_parts if p)

    turns: list[tuple[str, str, tuple[int, ...] | None]] = []  # (gemma role, text, its tokens if known)
    for message in messages:
        role = message["role"]
        tokens = None
        if role == "system":
            continue
        if role == "assistant":
            gemma_role, text = "model", _assistant_text(message, syntax)
            tokens = _raw_tokens(message, text)
        elif role == "tool":
            gemma_role, text = "user", _tool_text(message)
        else:
            gemma_role, text = "user", _content_text(message.get("content")).strip()
        if turns and turns[-1][0] == gemma_role:
            turns[-1] = (gemma_role, turns[-1][1] + "\n\n" + text, None)
        else:
            turns.append((gemma_role, text, tokens))
    if not turns or turns[0][0] != "user":
        raise GenerationError("messages: the conversation must start with a user message (after any system message).")
    if turns[-1][0] != "user":
        raise GenerationError("messages: the last message must be from the user or a tool result, so the model answers it.")

    prefix = [Segment(BOS, True), Segment(START_OF_TURN, True), Segment("user\n")]
    if system:
        prefix.append(Segment(system + "\n\n"))
    rest: list[Segment] = []
    for i, (role, text, tokens) in enumerate(turns):
        if i > 0:
            rest += [Segment(START_OF_TURN, True), Segment(role + "\n")]
        rest += [Segment(text, tokens=tokens), Segment(END_OF_TURN, True), Segment("\n")]
    rest += [Segment(START_OF_TURN, True), Segment("model\n")]
    return PromptParts(tuple(prefix), tuple(rest))
