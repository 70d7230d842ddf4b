"""Checking a value against a JSON Schema: the subset that schema-guided decoding supports.

Tool arguments are checked here before any tool runs. Arguments decoded under the
schema (lmforge/infer/json_schema.py) always pass; arguments from anywhere else (a
client's own assistant turn, a remote model, a test) may not, and a tool must never see
them. The keywords are the ones `check_schema` accepts, with the same reading: an object
that declares `properties` admits no other keys (the decoder never writes one), integers
are whole numbers (not booleans), and `anyOf` passes when one alternative does.
"""

from __future__ import annotations

import json
from typing import Any

from ..infer.json_schema import check_schema

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def schema_errors(value: Any, schema: Any) -> list[str]:
    """Every way `value` breaks `schema` (an empty list: it is valid). The schema must pass `check_schema`."""
    check_schema(schema)
    errors: list[str] = []
    _check(value, schema, schema, "$", errors)
    return errors


def is_valid(value: Any, schema: Any) -> bool:
    return not schema_errors(value, schema)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or (
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


def _check(value: Any, schema: Any, root: dict, path: str, errors: list[str]) -> None:
    if schema is True or schema == {}:
        return
    while "$ref" in schema:
        _, section, name = schema["$ref"].split("/")
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **root[section][name]}
    if "anyOf" in schema:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        trials = []
        for alt in schema["anyOf"]:
            found: list[str] = []
            _check(value, {**rest, **alt}, root, path, found)
            if not found:
                return
            trials.append(found)
        errors.append(f"{path}: matches none of anyOf ({min(trials, key=len)[0]})")
        return
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: must be {json.dumps(schema['const'])}")
        return
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        errors.append(f"{path}: must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)}")
        return
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(_JSON_TYPES[t](value) for t in allowed):
            errors.append(f"{path}: must be {' or '.join(allowed)}, got {type(value).__name__}")
            return
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required property {name!r}")
        closed = bool(props) or schema.get("additionalProperties", True) is False
        for name, item in value.items():
            if name in props:
                _check(item, props[name], root, f"{path}.{name}", errors)
            elif closed:
                errors.append(f"{path}: unexpected property {name!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: needs at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: allows at most {schema['maxLength']} characters")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: allows at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                _check(item, schema["items"], root, f"{path}[{i}]", errors)
