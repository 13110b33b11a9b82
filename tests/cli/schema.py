"""A small JSON Schema checker for docs/cli-schema.json (the keywords it uses: type, const, enum,
required, properties, additionalProperties, items, minItems, maxItems, minimum, maximum, oneOf,
$ref to #/$defs), so the tests validate the CLI's documents without a new dependency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "cli-schema.json"

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
_KNOWN = {
    "$schema", "$id", "$defs", "$ref", "title", "description", "type", "const", "enum",
    "required", "properties", "additionalProperties", "items", "minItems", "maxItems",
    "minimum", "maximum", "oneOf",
}  # fmt: skip


def load() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


def errors(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    unknown = set(schema) - _KNOWN
    assert not unknown, f"schema keyword(s) {unknown} at {at} are not supported by this checker"
    found: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        found += errors(value, root["$defs"][ref.removeprefix("#/$defs/")], root, at)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[n])
            and not (n in ("integer", "number") and value is True)
            and not (n in ("integer", "number") and value is False)
            for n in names
        )
        if not ok:
            return [*found, f"{at}: {value!r} is not of type {names}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{at}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} not in {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{at}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{at}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{at}: missing {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                found += errors(item, props[key], root, f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{at}: unexpected {key!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            found.append(f"{at}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{at}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                found += errors(item, schema["items"], root, f"{at}[{i}]")
    if "oneOf" in schema:
        matching = [alt for alt in schema["oneOf"] if not errors(value, alt, root, at)]
        if len(matching) != 1:
            found.append(f"{at}: matches {len(matching)} of the oneOf alternatives, not exactly 1")
    return found


def validate(document: Any) -> None:
    root = load()
    problems = errors(document, root, root)
    assert not problems, f"{document} violates {SCHEMA_FILE.name}: {problems}"
