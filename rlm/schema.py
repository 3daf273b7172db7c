"""Typed answers: the schema a final answer must match (`completion(..., schema=...)`), checked on the host.

A schema is a pydantic model class (pydantic is optional: imported only when a class is given)
or a dict JSON schema. For a dict, the subset of JSON Schema in `_KEYWORDS` is validated, with
no new dependency; any other keyword (`$ref`, `anyOf`, `pattern`...) is refused when the call is
made, with the advice to pass a pydantic model instead.

The answer the worker sends is text: JSON, or the `str()` of a dict or list FINAL_VAR gave
(Python literal syntax, read with `ast.literal_eval`, which evaluates no code). A failure is
text for the root model's next turn, never an exception.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from rlm.errors import ConfigError

__all__ = ["AnswerSchema", "answer_schema"]

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,), "number": (int, float),
    "boolean": (bool,), "null": (type(None),),
}
# The keywords validated, and those that only annotate (accepted, ignored).
_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
})
# what each keyword holds, by its JSON name
_SHAPES = {
    "properties": (dict, "an object"), "required": (list, "a list"), "enum": (list, "a list"),
    "type": ((str, list), "a type name or a list of them"),
}
_ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "default", "examples"})
_FENCED = re.compile(r"\A```[a-zA-Z]*\n(.*)\n```\Z", re.DOTALL)


class AnswerSchema:
    """What a final answer must be: `check(text)` gives the validated value, or the error to show."""

    def __init__(self, schema: Any) -> None:
        self.model: Any = None
        if isinstance(schema, dict):
            _check_schema(schema, "schema")
            self.json_schema = schema
        elif isinstance(schema, type) and _is_pydantic_model(schema):
            self.model = schema
            self.json_schema = schema.model_json_schema()
        else:
            raise ConfigError(f"schema must be a pydantic model class or a dict JSON schema, got {schema!r:.200}")
        try:
            self._text = json.dumps(self.json_schema, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"schema: a JSON schema must be JSON itself ({exc})") from None

    def describe(self) -> str:
        """The schema as compact JSON, for the model's prompt."""
        return self._text

    def check(self, answer: str) -> tuple[Any, str | None]:
        """(validated value, None), or (None, why the answer does not match)."""
        try:
            value = _parse(answer)
        except ValueError as exc:
            return None, str(exc)
        if self.model is not None:
            from pydantic import ValidationError

            try:
                return self.model.model_validate(value), None
            except ValidationError as exc:
                return None, "\n".join(
                    f"{'.'.join(map(str, error['loc'])) or '$'}: {error['msg']}" for error in exc.errors()
                )
        problem = _validate(value, self.json_schema, "$")
        return (value, None) if problem is None else (None, problem)


def answer_schema(schema: Any) -> AnswerSchema | None:
    """An `AnswerSchema` for `schema`, None for None (a bad one raises ConfigError)."""
    return None if schema is None else AnswerSchema(schema)


def _is_pydantic_model(cls: type) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:
        raise ConfigError(
            "a schema given as a class must be a pydantic model, and pydantic is not installed: "
            "pip install pydantic, or pass a dict JSON schema"
        ) from None
    return issubclass(cls, BaseModel)


def _parse(answer: str) -> Any:
    text = answer.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:  # FINAL_VAR of a dict or list arrives as its str(): Python literal syntax
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(
            "the answer is not JSON (nor a Python dict/list literal); give FINAL_VAR a dict or list, "
            "or FINAL a JSON text"
        ) from None


def _check_schema(schema: Any, where: str) -> None:
    """Refuse what this validator would not check, so that nothing is silently accepted."""
    if not isinstance(schema, dict):
        raise ConfigError(f"{where} must be a JSON schema object (a dict), got {schema!r}")
    unknown = sorted(set(schema) - _KEYWORDS - _ANNOTATIONS)
    if unknown:
        raise ConfigError(
            f"{where}: JSON schema keywords {unknown} are not supported by the built-in validator (it checks "
            f"{', '.join(sorted(_KEYWORDS))}); pass a pydantic model class as schema= instead"
        )
    for key, (kinds, what) in _SHAPES.items():
        if key in schema and not isinstance(schema[key], kinds):
            raise ConfigError(f"{where}: {key!r} must be {what}, got {schema[key]!r:.100}")
    types = schema.get("type")
    for name in [types] if isinstance(types, str) else (types or []):
        if name not in _TYPES:
            raise ConfigError(f"{where}: unknown type {name!r}; use one of {', '.join(_TYPES)}")
    for name, sub in (schema.get("properties") or {}).items():
        _check_schema(sub, f"{where}.properties.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _check_schema(schema[key], f"{where}.{key}")


def _validate(value: Any, schema: dict, where: str) -> str | None:
    """The first way `value` fails `schema` (a path and a reason), or None."""
    if "const" in schema and value != schema["const"]:
        return f"{where}: must be {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: must be one of {schema['enum']!r}, got {value!r}"
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, name) for name in names):
            return f"{where}: must be of type {' or '.join(names)}, got {type(value).__name__} {_short(value)}"
    if isinstance(value, dict):
        return _validate_object(value, schema, where)
    if isinstance(value, list):
        return _validate_array(value, schema, where)
    if isinstance(value, str):
        return _bounds(len(value), schema, "minLength", "maxLength", where, "characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _bounds(value, schema, "minimum", "maximum", where, "")
    return None


def _validate_object(value: dict, schema: dict, where: str) -> str | None:
    missing = [name for name in schema.get("required", []) if name not in value]
    if missing:
        return f"{where}: missing required field(s) {missing}"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            problem = _validate(item, properties[name], f"{where}.{name}")
        elif extra is False:
            problem = f"{where}: unexpected field {name!r} (allowed: {sorted(properties)})"
        elif isinstance(extra, dict):
            problem = _validate(item, extra, f"{where}.{name}")
        else:
            problem = None
        if problem is not None:
            return problem
    return None


def _validate_array(value: list, schema: dict, where: str) -> str | None:
    problem = _bounds(len(value), schema, "minItems", "maxItems", where, "items")
    if problem is not None or not isinstance(schema.get("items"), dict):
        return problem
    for index, item in enumerate(value):
        problem = _validate(item, schema["items"], f"{where}[{index}]")
        if problem is not None:
            return problem
    return None


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name not in ("boolean",):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])


def _bounds(size: float, schema: dict, low: str, high: str, where: str, unit: str) -> str | None:
    """`size` (a number, or a length in `unit`) against the schema's bounds `low` and `high`."""
    what = f"{size} {unit}" if unit else f"{size}"
    if low in schema and size < schema[low]:
        return f"{where}: {what} is below {low} {schema[low]}"
    if high in schema and size > schema[high]:
        return f"{where}: {what} is above {high} {schema[high]}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
