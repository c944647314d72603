"""Python functions as tools: a JSON schema from the signature, arguments checked before the call.

The schema comes from the type hints through pydantic's JSON-schema generation
(Literal/Enum -> enum, Optional, defaults, list/dict/TypedDict/dataclass/
pydantic models, dates) and the parameter descriptions from the docstring
(Google, NumPy or reST, read by docstring-parser). Before the function runs,
pydantic validates the model's arguments and converts them to the annotated
types (an enum member, a nested model, a ``datetime.date``).

pydantic and docstring-parser are the ``functions`` extra and imported here
only when a function tool is built.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ToolSourceError

MISSING_EXTRA = ("Python function tools need pydantic and docstring-parser: "
                 "pip install 'toolgrad-edge[functions]'")

# The attribute @tool leaves on a function.
_MARK = "__toolgrad_tool__"


def _imports():
    try:
        import docstring_parser
        import pydantic
    except ImportError:
        raise ToolSourceError(MISSING_EXTRA) from None
    return pydantic, docstring_parser


@dataclass
class FunctionTool:
    """A Python callable with the JSON schema of its arguments."""

    fn: Callable
    name: str
    description: str
    parameters: dict
    read_only: bool = False
    is_async: bool = False
    _model: Any = field(default=None, repr=False)

    @property
    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def validate(self, arguments: dict) -> dict:
        """The keyword arguments for the function, converted to its annotated types.

        Raises ValueError with pydantic's account of what is wrong.
        """
        pydantic, _ = _imports()
        try:
            parsed = self._model.model_validate(arguments or {})
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}"
                                 for e in exc.errors())
            raise ValueError(f"invalid arguments for {self.name}: {problems}") from None
        # Attribute access keeps nested models, enums and dates as objects.
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         read_only: bool = False):
    """Mark a function as a tool; ``read_only=True`` lets it run without asking.

    Usable bare (``@tool``) or with options (``@tool(read_only=True)``). The
    function itself is returned unchanged, so it can still be called directly.
    """
    def mark(f: Callable) -> Callable:
        setattr(f, _MARK, {"name": name, "description": description, "read_only": read_only})
        return f

    return mark(fn) if fn is not None else mark


def function_tool(fn: Callable) -> FunctionTool:
    """Build the FunctionTool of a callable (decorated with @tool or plain)."""
    if isinstance(fn, FunctionTool):
        return fn
    if not callable(fn):
        raise ToolSourceError(f"expected a Python function as a tool, found {type(fn).__name__}: {fn!r:.80}")
    pydantic, docstring_parser = _imports()
    options = getattr(fn, _MARK, None) or {}
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    name = options.get("name") or getattr(fn, "__name__", None) or type(fn).__name__
    where = f"Python tool {name!r} ({getattr(fn, '__module__', '?')})"
    try:
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target, include_extras=True)
    except (TypeError, ValueError, NameError) as exc:
        raise ToolSourceError(f"{where}: cannot read its signature and type hints ({exc}).") from None
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    param_docs = {p.arg_name: p.description for p in doc.params if p.description}

    fields: dict[str, tuple[Any, Any]] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolSourceError(f"{where}: *{param.name} / **{param.name} parameters cannot be described "
                                  "to the model; give every parameter a name and a type.")
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, pydantic.Field(default, description=param_docs.get(param.name)))
    try:
        model = pydantic.create_model(f"{name}_arguments", **fields)
        schema = model.model_json_schema()
    except (pydantic.PydanticUserError, pydantic.errors.PydanticSchemaGenerationError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ToolSourceError(f"{where}: its type hints have no JSON schema ({reason}).") from None
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    description = options.get("description") or "\n\n".join(
        part for part in (doc.short_description, doc.long_description) if part) or ""
    return FunctionTool(fn=fn, name=name, description=description, parameters=schema,
                        read_only=bool(options.get("read_only")),
                        is_async=inspect.iscoroutinefunction(target), _model=model)


def result_text(value: Any) -> str:
    """A function's return value as the text the model reads: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    import json

    try:
        from pydantic_core import to_jsonable_python

        value = to_jsonable_python(value)
    except Exception:  # noqa: BLE001 - what pydantic cannot convert is shown with str()
        return str(value)
    return json.dumps(value, ensure_ascii=False)
