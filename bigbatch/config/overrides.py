"""Command-line overrides on the recipe tree's own names: `--batch.global_batch=8192`, `--phases.1.steps=2000`.

Each text is parsed to the type its dataclass field declares; an unknown key or a value of the wrong type raises a
ConfigError that names it (with the closest known key as a hint).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from bigbatch.config import ConfigError, PhaseConfig, Recipe


def _parse_value(key: str, text: str, kind: Any) -> Any:
    """Turns the text of an override into the field's declared type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if type(None) in typing.get_args(kind) and text.lower() in ("none", "null", ""):
            return None
        if str in args and args[0] is not str:  # `int | str`: a number, else the text ("auto")
            try:
                return _parse_value(key, text, args[0])
            except ConfigError:
                return text
        return _parse_value(key, text, args[0])
    if origin is tuple:
        args = typing.get_args(kind)
        items = [t.strip() for t in text.split(",") if t.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(key, t, args[0]) for t in items)
        if len(items) != len(args):
            raise ConfigError(f"--{key}={text!r} needs {len(args)} comma-separated values.")
        return tuple(_parse_value(key, t, a) for t, a in zip(items, args))
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            value = float(text)
            if value != int(value):
                raise ValueError(text)
            return int(value)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key}={text!r} is not a valid {kind.__name__}; give e.g. --{key}=1.") from None
    return text


def unknown_key(key: str, known: list[str]) -> ConfigError:
    """The error for a key the tree does not have, with the closest known key as a hint."""
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    extra = f"; did you mean --{hint[0]}?" if hint else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown recipe key --{key}{extra}")


def all_keys(recipe: Recipe) -> list[str]:
    """Every key an override may name, `phases.<i>.<field>` for each phase the recipe has."""
    keys = ["name"]
    for section in dataclasses.fields(recipe):
        value = getattr(recipe, section.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
    for i, _ in enumerate(recipe.phases, start=1):
        keys += [f"phases.{i}.{f.name}" for f in dataclasses.fields(PhaseConfig)]
    return keys


def apply_overrides(recipe: Recipe, overrides: dict[str, str]) -> Recipe:
    """Returns a new recipe with `{"batch.global_batch": "8192", ...}` applied; unknown keys raise with a hint."""
    known = all_keys(recipe)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in known:
            raise unknown_key(key, known)
        if "." not in key:
            top[key] = text
            continue
        section, name = key.split(".", 1)
        if section == "phases":  # phases.<i>.<field>, 1-based like the phases after the first
            index, name = name.split(".", 1)
            kind = typing.get_type_hints(PhaseConfig)[name]
        else:
            kind = typing.get_type_hints(type(getattr(recipe, section)))[name]
            index = ""
        sections.setdefault(section + (f".{index}" if index else ""), {})[name] = _parse_value(key, text, kind)
    phases = list(recipe.phases)
    for section in [s for s in sections if s.startswith("phases.")]:
        i = int(section.split(".")[1]) - 1
        phases[i] = dataclasses.replace(phases[i], **sections.pop(section))
    changes = {s: dataclasses.replace(getattr(recipe, s), **v) for s, v in sections.items()}
    return dataclasses.replace(recipe, **top, **changes, phases=tuple(phases))


def parse_override_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Splits `--a.b=c` / `--a.b c` overrides from the rest; returns (overrides, leftover args)."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0] or arg.startswith("--name"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args):
                key, value = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg} has no value; write {arg}=<value>.")
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return overrides, rest
