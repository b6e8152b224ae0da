"""The configuration reference (``docs/config.md``) and JSON schema, generated from the pydantic
models in ``ray_align.config`` so that the documentation cannot drift from what is validated.

``ray-align config --reference`` prints the Markdown, ``ray-align config --schema`` the JSON
schema; ``tests/unit/test_config_reference.py`` fails when the checked-in file is not current.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from ray_align.config import Config

REGENERATE = ".venv/bin/ray-align config --reference > docs/config.md"
REFERENCE_PATH = "docs/config.md"


def json_schema() -> str:
    """The JSON schema of a config file, as text."""
    return json.dumps(Config.model_json_schema(), indent=2) + "\n"


# --- types ------------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (``M``, ``M | None``, ``list[M]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_list_of_models(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list and bool(_models_in(annotation))


def _type_name(annotation: Any) -> str:
    """A type as a YAML writer thinks of it: ``int``, ``str | null``, ``bfloat16 | float16``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"map {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Ge, ">=", "ge"), (annotated_types.Gt, ">", "gt"),
           (annotated_types.Le, "<=", "le"), (annotated_types.Lt, "<", "lt"),
           (annotated_types.MinLen, "at least", "min_length"))


def _constraints(field: FieldInfo) -> str:
    """Bounds a value must meet, e.g. ``>= 1``; ``at least 1`` item for lists."""
    parts = []
    for item in field.metadata:
        for kind, word, attr in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{word} {getattr(item, attr)}")
    return ", ".join(parts)


# --- values -----------------------------------------------------------------------------------


def _value(value: Any) -> str:
    """A default as it would be written in YAML (flow style)."""
    data = to_jsonable_python(value)
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "true" if data else "false"
    if isinstance(data, str):
        return json.dumps(data) if data == "" or ":" in data or data != data.strip() else data
    if isinstance(data, list):
        return "[" + ", ".join(_value(v) for v in data) + "]"
    if isinstance(data, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in data.items()) + "}"
    return str(data)


_MISSING = object()


def _default(field: FieldInfo) -> Any:
    """The field's default value, or ``_MISSING`` when the field is required."""
    if field.is_required():
        return _MISSING
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


# --- text -------------------------------------------------------------------------------------


def _prose(text: str | None) -> str:
    """Docstring or description text on one line, reST ``literals`` as Markdown code."""
    if not text:
        return ""
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(text.split()))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


# --- the reference ----------------------------------------------------------------------------


def _rows(model: type[BaseModel], prefix: str, instance: BaseModel | None) -> list[str]:
    """One table row per field of ``model`` under the dotted ``prefix``, nested models expanded
    right after their own row. ``instance`` is the default the parent gives this section (its
    fields' defaults can differ from the class's, e.g. ``analyze.sampling.max_tokens``)."""
    execution = getattr(model, "EXECUTION", frozenset())
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = _default(field)
        if instance is not None:
            default = getattr(instance, name)
        models = _models_in(field.annotation)
        kind = _type_name(field.annotation)
        bounds = _constraints(field)
        if bounds:
            kind = f"{kind} ({bounds})"
        description = _prose(field.description)
        if not description and models and len(models) == 1:
            description = _prose(models[0].__doc__)
        if name in execution:
            description = (description + " " if description else "") + (
                "Execution setting: changing it never redoes a finished stage.")
        shown = "required" if default is _MISSING else _code(_value(default))
        if models and isinstance(default, BaseModel):
            shown = "(below)"
        rows.append(f"| {_code(key)} | {_cell(kind)} | {shown} | {_cell(description)} |")
        if len(models) == 1:
            nested_prefix = f"{key}[]." if _is_list_of_models(field.annotation) else f"{key}."
            nested = default if isinstance(default, BaseModel) else None
            rows.extend(_rows(models[0], nested_prefix, nested))
    return rows


_HEADER = "| key | type | default | description |\n| --- | --- | --- | --- |"


def reference() -> str:
    """``docs/config.md``: the top-level keys, then one table per section in the schema's order."""
    parts = [
        "# Configuration reference",
        "",
        f"Generated from `ray_align/config.py` by `{REGENERATE}`; do not edit by hand.",
        "",
        "A config is one YAML file; every key below can also be set on the command line as a "
        "dotted override (`train.epochs=2`). Unknown keys and wrong types fail before Ray starts, "
        "naming the key. `list of` keys marked `[]` take a list of such sections; a section whose "
        "default is `null` is off until set, and its own keys marked `required` are needed only "
        "then.",
    ]
    top = [(n, f) for n, f in Config.model_fields.items() if not _models_in(f.annotation)]
    sections = [(n, f) for n, f in Config.model_fields.items() if _models_in(f.annotation)]
    if top:
        parts += ["", "## Top level", "", _HEADER]
        for name, field in top:
            default = _default(field)
            shown = "required" if default is _MISSING else _code(_value(default))
            kind = _type_name(field.annotation)
            parts.append(f"| {_code(name)} | {_cell(kind)} | {shown} | "
                         f"{_cell(_prose(field.description))} |")
    for name, field in sections:
        (model,) = _models_in(field.annotation)
        default = _default(field)
        lines = ["", f"## `{name}`", ""]
        about = " ".join(filter(None, [_prose(field.description), _prose(model.__doc__)]))
        if about:
            lines += [about, ""]
        if default is _MISSING:
            lines += ["Required.", ""]
        elif default is None:
            lines += ["Default: `null` (off).", ""]
        lines.append(_HEADER)
        lines += _rows(model, f"{name}.", default if isinstance(default, BaseModel) else None)
        parts += lines
    return "\n".join(parts) + "\n"
