"""One schema from several: ``$ref`` with siblings, ``allOf``, and a parent's keywords in ``anyOf``.

JSON Schema 2020-12 (what the validator uses) reads all three as "every one
of these schemas applies". A grammar needs one schema per position, so the
compilers merge them here, keyword by keyword, into a schema that allows
exactly the values that satisfy all of them, or fail with MergeError when the
combination cannot be written as one schema. Keywords that are only checked
after generation (a second ``pattern`` or ``multipleOf``) keep the first
schema's value: the validator still sees the schema as written.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Keywords that only describe: no effect on what may be generated.
ANNOTATIONS = frozenset({
    "description", "title", "default", "examples", "example", "$comment", "deprecated",
    "readOnly", "writeOnly", "$schema", "$id", "$anchor", "contentEncoding",
    "contentMediaType", "$defs", "definitions", "nullable",
})
_LOWER = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
# Keywords checked after generation: keep the first value, the validator checks all.
_FIRST_WINS = ("pattern", "multipleOf", "format")
# At most this many alternatives from two anyOf lists multiplied out.
MAX_ALTERNATIVES = 64


class MergeError(ValueError):
    """Schemas that cannot be merged into one; the message says which keyword.

    ``empty``: the schemas contradict each other, so no value satisfies them all
    (an anyOf member that does so can be dropped).
    """

    def __init__(self, pointer: str, message: str, empty: bool = False):
        super().__init__(message)
        self.pointer = pointer
        self.empty = empty


def lookup(root: Any, ref: Any) -> Any:
    """The schema a local ``$ref`` points to, or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in ref[2:].split("/") if ref.startswith("#/") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def flatten(schema: Any, root: dict, refs: tuple[str, ...] = (), ptr: str = "") -> tuple[Any, tuple[str, ...]]:
    """``schema`` without ``$ref`` or ``allOf`` at its top, and the refs followed to get there.

    Subschemas (properties, items, anyOf members) are left as they are; a
    compiler flattens each when it reaches it, with the refs returned here on
    its stack so that a recursive ``$ref`` is caught.
    """
    if not isinstance(schema, dict) or ("$ref" not in schema and "allOf" not in schema):
        return schema, refs
    if "$ref" in schema:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise MergeError(f"{ptr}/$ref", f"only local references ('#/...') are supported, found {ref!r}")
        if ref in refs or ref == "#":
            chain = " -> ".join(refs + (ref,))
            raise MergeError(f"{ptr}/$ref", f"recursive $ref ({chain}) cannot be compiled to a grammar")
        target = lookup(root, ref)
        if target is None:
            raise MergeError(f"{ptr}/$ref", f"$ref {ref!r} points to nothing")
        target, refs = flatten(target, root, refs + (ref,), ref[1:])
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        rest, refs = flatten(rest, root, refs, ptr)
        return merge(target, rest, ptr), refs
    members = schema["allOf"]
    if not isinstance(members, list) or not members:
        raise MergeError(f"{ptr}/allOf", "'allOf' needs a non-empty list of schemas")
    out, refs = flatten({k: v for k, v in schema.items() if k != "allOf"}, root, refs, ptr)
    for i, member in enumerate(members):
        member, refs = flatten(member, root, refs, f"{ptr}/allOf/{i}")
        out = merge(out, member, f"{ptr}/allOf/{i}")
    return out, refs


def merge(a: Any, b: Any, ptr: str = "") -> Any:
    """One schema for "a and b"; neither may have ``$ref`` or ``allOf`` at its top."""
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    if a is False or b is False:
        return False
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise MergeError(ptr, "expected schema objects")
    out = dict(a)
    for key, vb in b.items():
        if key not in out:
            out[key] = vb
            continue
        va = out[key]
        if va == vb or key in ANNOTATIONS or key in _FIRST_WINS:
            continue
        if key == "type":
            out[key] = _types(va, vb, ptr)
        elif key in _LOWER or key in _UPPER:
            if not _is_num(va) or not _is_num(vb):
                raise MergeError(f"{ptr}/{key}", f"{key!r} must be a number")
            out[key] = max(va, vb) if key in _LOWER else min(va, vb)
        elif key == "required":
            out[key] = list(dict.fromkeys(list(va) + list(vb)))
        elif key == "enum":
            out[key] = [v for v in va if any(same_value(v, w) for w in vb)]
            if not out[key]:
                raise MergeError(f"{ptr}/enum", "no enum value is allowed by both schemas", True)
        elif key == "const":
            if not same_value(va, vb):
                raise MergeError(f"{ptr}/const", f"two different constants {va!r} and {vb!r}", True)
        elif key == "uniqueItems":
            out[key] = bool(va) or bool(vb)
        elif key in ("items", "contains", "propertyNames"):
            out[key] = _both(va, vb)
        elif key in ("anyOf", "oneOf"):
            continue  # below
        elif key in ("properties", "additionalProperties"):
            continue  # below
        else:
            raise MergeError(f"{ptr}/{key}", f"the schemas disagree on {key!r} "
                             f"({json.dumps(va)} and {json.dumps(vb)}); only schemas that can "
                             "be merged into one are supported")
    _merge_alternatives(out, a, b, ptr)
    if any(k in a or k in b for k in ("properties", "additionalProperties")):
        _merge_members(out, a, b, ptr)
    return out


def _merge_alternatives(out: dict, a: dict, b: dict, ptr: str) -> None:
    lists = [(k, s[k]) for s in (a, b) for k in ("anyOf", "oneOf") if isinstance(s.get(k), list)]
    out.pop("oneOf", None)
    out.pop("anyOf", None)
    if len(lists) == 1:
        # oneOf stays oneOf: its exclusivity is the validator's to check.
        out[lists[0][0]] = lists[0][1]
        return
    combined: list[list] = [[]]
    for _, alts in lists:
        combined = [c + [m] for c in combined for m in alts]
        if len(combined) > MAX_ALTERNATIVES:
            raise MergeError(f"{ptr}/anyOf", f"combining these anyOf/oneOf lists gives more than "
                             f"{MAX_ALTERNATIVES} alternatives")
    if lists:
        out["anyOf"] = [{"allOf": c} for c in combined]


def _merge_members(out: dict, a: dict, b: dict, ptr: str) -> None:
    pa, pb = a.get("properties") or {}, b.get("properties") or {}
    # additionalProperties stays absent (None) when neither schema gives it: the merged
    # object is then closed over the keys both declare (additional_properties), as
    # llama.cpp merges allOf. For the other schema's own keys it allows any value.
    xa, xb = a.get("additionalProperties"), b.get("additionalProperties")
    props: dict = {}
    for name in list(dict.fromkeys(list(pa) + list(pb))):
        sa = pa[name] if name in pa else (True if xa is None else xa)
        sb = pb[name] if name in pb else (True if xb is None else xb)
        props[name] = False if sa is False or sb is False else _both(sa, sb)
    if xa is None or xb is None:
        extra = xb if xa is None else xa
    else:
        extra = False if xa is False or xb is False else _both(xa, xb)
    for name in out.get("required") or []:
        if name not in props:
            props[name] = True if extra is None else extra
        if props[name] is False:
            raise MergeError(f"{ptr}/required", f"{name!r} is required, but another schema "
                             "forbids that key (additionalProperties: false or a false schema)", True)
    out["properties"] = props
    if extra is None:
        out.pop("additionalProperties", None)
    else:
        out["additionalProperties"] = extra


def _both(a: Any, b: Any) -> Any:
    if a is True or a == {} or a == b:
        return b
    if b is True or b == {}:
        return a
    if a is False or b is False:
        return False
    return {"allOf": [a, b]}


def _types(a: Any, b: Any, ptr: str) -> Any:
    ta = a if isinstance(a, list) else [a]
    tb = b if isinstance(b, list) else [b]
    out = []
    for t in ta:
        if t in tb:
            out.append(t)
        elif t == "number" and "integer" in tb or t == "integer" and "number" in tb:
            out.append("integer")
    out = list(dict.fromkeys(out))
    if not out:
        raise MergeError(f"{ptr}/type", f"no value has type {a!r} and type {b!r}", True)
    return out[0] if len(out) == 1 else out


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def same_value(a: Any, b: Any) -> bool:
    """JSON Schema equality: 1 == 1.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def additional_properties(schema: dict) -> Any:
    """The schema every undeclared key of an object must match (``False``: none may appear).

    An object with ``properties`` and no ``additionalProperties`` is closed: it
    takes its declared keys only, as llama.cpp's json-schema-to-grammar (and so
    Ollama) and OpenAI's strict mode read it. ``additionalProperties: true``
    gives back JSON Schema's literal reading. An object without ``properties``
    (``{"type": "object"}``, or ``required`` alone) takes any keys.
    """
    if "additionalProperties" in schema:
        return schema["additionalProperties"]
    return False if "properties" in schema else True


def declared_members(schema: dict) -> dict:
    """The keys an object schema declares, with their schemas: its ``properties``, or, where it
    has none, the keys it requires (any value)."""
    props = schema.get("properties") or {}
    if not props and schema.get("required"):
        return {name: {} for name in schema["required"]}
    return props


def top_level(parameters: dict) -> dict:
    """A tool's parameter schema flattened at its top (``$ref``/``allOf`` merged)."""
    merged, _ = flatten(parameters, parameters)
    return merged if isinstance(merged, dict) else {}


def declared_arguments(parameters: dict) -> list[str]:
    """The argument names a tool declares: the only ones a call may carry."""
    return [name for name, sub in declared_members(top_level(parameters)).items() if sub is not False]
