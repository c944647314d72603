"""The tool model: tool definitions in the forms users have, normalised once.

Two input forms are accepted, as a JSON file or as already-loaded data:

* OpenAI tools: ``{"type": "function", "function": {"name", "description", "parameters"}}``
* bare function objects as BFCL writes them: ``{"name", "description", "parameters"}``

BFCL's parameter docs use type names beyond JSON Schema (``dict``, ``float``,
``tuple``, ``any``) and a few habits that JSON Schema reads differently from
what the author meant; :func:`normalize_schema` turns them into plain JSON
Schema so that the grammar compiler and the validator see one language.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable

import jsonschema

from ..errors import SchemaError

# What a tool must pass to load, beyond the shape of its schema. The GBNF
# compiler adds "every argument can be expressed" (gbnf.check_tool) when
# grammars/ is imported: the tool model stays below the compilers, and
# load_tools still refuses what no grammar could constrain.
TOOL_CHECKS: list[Callable[["Tool", str], None]] = []

# Deepest nesting of lists and objects in one tool definition. Real schemas stay
# far below it; a deeper one is refused before anything recurses over it.
MAX_DEPTH = 64

# A call name: dotted identifiers (``math.factorial``), hyphens allowed as in
# OpenAI's function names. The python call syntax needs the name to be a word.
CALL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*")
MAX_NAME_LENGTH = 128

# BFCL type name -> JSON Schema type (None: any JSON value).
BFCL_TYPES: dict[str, str | None] = {
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "any": None,
}

JSON_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")

# Keywords holding one subschema / a list of subschemas / a name -> subschema map.
SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames",
                 "if", "then", "else", "unevaluatedItems", "unevaluatedProperties",
                 "additionalItems")
SUBSCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties",
                 "dependentSchemas")


@dataclass(frozen=True)
class Tool:
    """One callable tool.

    ``parameters`` is the normalised JSON Schema of the arguments (an object
    schema); ``spec`` is the function dict exactly as the user gave it (BFCL
    types kept), which is what the prompt shows the model.
    """

    name: str
    description: str
    parameters: dict = field(hash=False)
    spec: dict = field(hash=False, repr=False)


def load_tools(source: Any) -> list[Tool]:
    """Read tool definitions from a JSON file path or already-loaded data.

    ``source`` is a path, a list of tool dicts (OpenAI or bare function form),
    a list of :class:`Tool`, or a single tool dict. Raises SchemaError naming
    the file, the tool and the JSON pointer at fault.
    """
    where = ""
    if isinstance(source, (str, os.PathLike)):
        where = f"{os.fspath(source)}: "
        try:
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise SchemaError(f"{where}cannot read tools file ({exc.strerror or exc}).") from None
        except UnicodeDecodeError as exc:
            raise SchemaError(
                f"{where}not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start}). Expected a JSON list of tool definitions."
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(
                f"{where}malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}. "
                "Expected a JSON list of tool definitions."
            ) from None
        except RecursionError:
            raise SchemaError(f"{where}JSON nested too deeply to read; tool definitions nest "
                              f"at most {MAX_DEPTH} levels.") from None
    else:
        data = source
    if isinstance(data, Tool):
        data = [data]
    if isinstance(data, dict):
        # {"tools": [...]} as in an OpenAI request body, or one tool on its own.
        data = data["tools"] if isinstance(data.get("tools"), list) else [data]
    if not isinstance(data, (list, tuple)):
        raise SchemaError(
            f"{where}expected a list of tool definitions, found {type(data).__name__}."
        )
    tools = [_tool_from(item, i, where) for i, item in enumerate(data)]
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise SchemaError(
                f"{where}duplicate tool name {tool.name!r} (tools {seen[tool.name]} and {i}). "
                "Tool names must be unique."
            )
        seen[tool.name] = i
    return tools


def _tool_from(item: Any, index: int, where: str) -> Tool:
    if isinstance(item, Tool):
        return item
    if isinstance(item, dict):
        # The runtime passes the same tool dicts on every request; normalising
        # and checking a schema costs milliseconds, so do it once per tool.
        try:
            key = json.dumps(item)
        except (TypeError, ValueError):
            key = None
        except RecursionError:
            _check_depth(item, index, where)
            raise
        if key is not None:
            name, description, parameters = _cached_tool(key, index, where)
            # A fresh schema for every caller, and the caller's own spec: a
            # caller that edits its Tool must not change what others get.
            spec = item["function"] if isinstance(item.get("function"), dict) else item
            return Tool(name, description, json.loads(parameters), spec)
    return _make_tool(item, index, where)


@lru_cache(maxsize=4096)
def _cached_tool(key: str, index: int, where: str) -> tuple[str, str, str]:
    tool = _make_tool(json.loads(key), index, where)
    return tool.name, tool.description, json.dumps(tool.parameters)


def json_depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar: 0), without recursion."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break  # deep enough to refuse; no need to measure the rest
        todo.extend((child, depth + 1) for child in children)
    return deepest


def _check_depth(item: dict, index: int, where: str) -> None:
    depth = json_depth(item)
    if depth > MAX_DEPTH:
        spec = item.get("function") if isinstance(item.get("function"), dict) else item
        name = spec.get("name")
        label = f"tool {name!r}" if isinstance(name, str) else f"tool {index}"
        raise SchemaError(f"{where}{label}: the definition nests lists and objects more than "
                          f"{MAX_DEPTH} levels deep (found at least {depth}); flatten the schema.")


def _make_tool(item: Any, index: int, where: str) -> Tool:
    if not isinstance(item, dict):
        raise SchemaError(f"{where}tool {index}: expected an object, found {type(item).__name__}.")
    if item.get("type") == "function" or "function" in item:
        spec = item.get("function")
        if not isinstance(spec, dict):
            raise SchemaError(
                f"{where}tool {index}: OpenAI form needs a \"function\" object, "
                f"found {type(spec).__name__}."
            )
    else:
        spec = item
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{where}tool {index}: missing \"name\" (a non-empty string).")
    label = f"{where}tool {name!r}"
    if len(name) > MAX_NAME_LENGTH or not CALL_NAME.fullmatch(name):
        raise SchemaError(
            f"{label}: {name!r} is not a valid call name. Expected letters, digits, '_' and '-' "
            f"(dotted parts allowed, as in 'math.factorial'), starting with a letter or '_', "
            f"at most {MAX_NAME_LENGTH} characters."
        )
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise SchemaError(f"{label}: \"description\" must be a string.")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise SchemaError(f"{label}: \"parameters\" must be a JSON Schema object, "
                          f"found {type(parameters).__name__}.")
    _check_depth(item, index, where)
    normal = normalize_schema(parameters, label)
    if normal.get("type", "object") != "object" or "anyOf" in normal or "oneOf" in normal:
        raise SchemaError(f"{label}: \"parameters\" must be an object schema "
                          f"(\"type\": \"object\" or \"dict\"), found {parameters.get('type')!r}.")
    normal.setdefault("type", "object")
    normal.setdefault("properties", {})
    tool = Tool(name=name, description=description, parameters=normal, spec=spec)
    for check in TOOL_CHECKS:
        check(tool, where)
    return tool


def normalize_schema(schema: dict, label: str = "schema", bfcl: bool | None = None) -> dict:
    """Plain JSON Schema from a BFCL or JSON Schema parameter schema.

    Always: OpenAPI's ``nullable: true`` becomes a ``null`` alternative.
    Only for BFCL function docs (``bfcl``; None: when the schema uses one of
    BFCL's type names ``dict``, ``float``, ``tuple``, ``any``), what BFCL's
    authors meant (see docs/grammars.md):

    * types ``dict``/``float``/``tuple``/``any`` -> ``object``/``number``/``array``/any;
    * BFCL's ``optional`` annotation is dropped;
    * an ``enum`` whose values do not fit the declared type (``"type":
      "boolean", "enum": ["True", "False", "dontcare"]``) means "the type, or
      one of these values";
    * an ``enum`` of scalars on an array constrains its items;
    * a property that is not required and defaults to ``null`` accepts ``null``.

    A JSON Schema tool keeps its schema as written, so the calls the grammar
    allows validate against it. Raises SchemaError for schemas jsonschema
    itself rejects and for schemas nested more than MAX_DEPTH levels.
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"{label}: expected a JSON Schema object, found {type(schema).__name__}.")
    depth = json_depth(schema)
    if depth > MAX_DEPTH:
        raise SchemaError(f"{label}: the schema nests lists and objects more than {MAX_DEPTH} "
                          f"levels deep (found at least {depth}); flatten the schema.")
    if bfcl is None:
        bfcl = uses_bfcl_types(schema)
    out = _normalize(copy.deepcopy(schema), label, "", bfcl)
    error = jsonschema.exceptions.best_match(_meta_validator().iter_errors(out))
    if error is not None:
        pointer = "/" + "/".join(str(p) for p in error.path) if error.path else ""
        raise SchemaError(f"{label}: invalid JSON Schema at {pointer or '/'}: {error.message}")
    return out


def uses_bfcl_types(schema: Any) -> bool:
    """Whether a schema names one of BFCL's own types (``dict``, ``float``, ``tuple``, ``any``)."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            t = node.get("type")
            if isinstance(t, str) and t in BFCL_TYPES or (
                    isinstance(t, list) and any(isinstance(x, str) and x in BFCL_TYPES for x in t)):
                return True
            todo.extend(v for k, v in node.items() if k not in ("enum", "const", "default", "examples"))
        elif isinstance(node, list):
            todo.extend(node)
    return False


@lru_cache(maxsize=1)
def _meta_validator() -> jsonschema.Draft7Validator:
    # Draft 7's metaschema checks the keywords that matter here as well as
    # 2020-12's, at a fraction of the cost (no $dynamicRef): about 10 ms -> 1 ms a tool.
    cls = jsonschema.Draft7Validator
    return cls(cls.META_SCHEMA)


def _normalize(node: Any, label: str, pointer: str, bfcl: bool) -> Any:
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        raise SchemaError(f"{label}: expected a schema object at {pointer or '/'}, "
                          f"found {type(node).__name__}.")
    if bfcl:
        node.pop("optional", None)
    if "type" in node:
        node["type"] = _normalize_type(node["type"], label, pointer)
        if node["type"] is None:
            del node["type"]
    for key in SUBSCHEMA_ONE:
        if key in node and isinstance(node[key], (dict, bool)):
            node[key] = _normalize(node[key], label, f"{pointer}/{key}", bfcl)
    for key in SUBSCHEMA_LIST:
        if isinstance(node.get(key), list):
            node[key] = [_normalize(s, label, f"{pointer}/{key}/{i}", bfcl)
                         for i, s in enumerate(node[key])]
    if isinstance(node.get("items"), list):  # draft-4 tuple form
        node["items"] = [_normalize(s, label, f"{pointer}/items/{i}", bfcl)
                         for i, s in enumerate(node["items"])]
    for key in SUBSCHEMA_MAP:
        if isinstance(node.get(key), dict):
            node[key] = {k: _normalize(s, label, f"{pointer}/{key}/{_escape(k)}", bfcl)
                         for k, s in node[key].items()}
    if bfcl:
        _fix_enum(node)
        props = node.get("properties")
        if isinstance(props, dict):
            required = node.get("required", [])
            for name, prop in props.items():
                if (isinstance(prop, dict) and "default" in prop and prop["default"] is None
                        and name not in required):
                    _allow_null(prop)
    if "nullable" in node:
        node = _nullable(node)
    return node


def _nullable(node: dict) -> dict:
    """OpenAPI's ``nullable: true`` as JSON Schema: the schema, or null."""
    if node.pop("nullable") is not True:
        return node
    if "type" in node and not any(k in node for k in ("$ref", "allOf", "anyOf", "oneOf", "const")):
        _allow_null(node)
        return node
    if "anyOf" in node and len(node) == 1:
        _allow_null(node)
        return node
    if not any(k in node for k in ("type", "$ref", "allOf", "anyOf", "oneOf", "enum", "const")):
        return node  # any value already
    keep = ("description", "title", "default", "examples", "$defs", "definitions")
    outer = {k: node.pop(k) for k in keep if k in node}
    return {**outer, "anyOf": [node, {"type": "null"}]}


def _normalize_type(value: Any, label: str, pointer: str) -> Any:
    def one(t: Any) -> str | None:
        if not isinstance(t, str):
            raise SchemaError(f"{label}: \"type\" at {pointer or '/'} must be a string, found {t!r}.")
        if t in BFCL_TYPES:
            return BFCL_TYPES[t]
        if t not in JSON_TYPES:
            raise SchemaError(
                f"{label}: unknown type {t!r} at {pointer or '/'}/type. Expected one of "
                f"{', '.join(JSON_TYPES + tuple(BFCL_TYPES))}."
            )
        return t

    if isinstance(value, list):
        types = [one(t) for t in value]
        if None in types:
            return None  # "any" among the alternatives: any value
        return list(dict.fromkeys(types))
    return one(value)


def _fits(value: Any, json_type: str) -> bool:
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer())
    if json_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "null":
        return value is None
    if json_type == "array":
        return isinstance(value, list)
    if json_type == "object":
        return isinstance(value, dict)
    return False


def _fix_enum(node: dict) -> None:
    enum = node.get("enum")
    declared = node.get("type")
    if not isinstance(enum, list) or not enum or declared is None:
        return
    types = declared if isinstance(declared, list) else [declared]
    if all(any(_fits(v, t) for t in types) for v in enum):
        return
    if types == ["array"] and all(not isinstance(v, (list, dict)) for v in enum):
        items = node.get("items")
        items = dict(items) if isinstance(items, dict) else {}
        if "enum" not in items:
            items["enum"] = enum
            node["items"] = items
            del node["enum"]
            return
    # "the type, or one of these values"
    typed = {k: v for k, v in node.items() if k not in ("enum", "description", "default", "title")}
    for key in list(node):
        if key not in ("description", "default", "title"):
            del node[key]
    node["anyOf"] = [typed, {"enum": enum}]


def _allow_null(prop: dict) -> None:
    if "anyOf" in prop:
        if not any(isinstance(s, dict) and s.get("type") == "null" for s in prop["anyOf"]):
            prop["anyOf"].append({"type": "null"})
        return
    t = prop.get("type")
    if t is None:
        return  # any value already
    types = t if isinstance(t, list) else [t]
    if "null" not in types:
        prop["type"] = types + ["null"]
    if isinstance(prop.get("enum"), list) and None not in prop["enum"]:
        prop["enum"] = prop["enum"] + [None]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def as_tools(tools: Iterable[Any]) -> list[Tool]:
    """Tools from Tool objects or raw dicts (the public functions accept both)."""
    if isinstance(tools, (str, os.PathLike)):
        return load_tools(tools)
    return load_tools(list(tools))
