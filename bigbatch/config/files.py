"""Finding and loading recipes: a name, a `recipes/*.py` path, or a run's `recipe.json`; and where the shipped
`recipes/` and `ds_configs/` folders are.

A name is looked up in the user's own `./recipes` first, then in the shipped ones. A wheel carries the repository's
top-level `recipes/` and `ds_configs/` inside the package (as `bigbatch/recipes`, `bigbatch/ds_configs`, see
pyproject.toml); a checkout has them beside `bigbatch/`.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import json
import typing
from pathlib import Path
from typing import Any, Optional

from bigbatch.config import ConfigError, PhaseConfig, Recipe
from bigbatch.config.overrides import all_keys, apply_overrides, unknown_key


def shipped_dir(folder: str) -> Path:
    """`recipes` or `ds_configs` as this installation ships them: inside the installed package, else the checkout's."""
    # Path(str(...)): pip unpacks wheels, so the resource is a real directory that spec_from_file_location can read
    installed = Path(str(importlib.resources.files("bigbatch") / folder))
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / folder


def shipped_recipes() -> list[str]:
    """The names of the shipped pretraining recipes."""
    return sorted(p.stem for p in shipped_dir("recipes").glob("*.py"))


def find_recipe(name: str) -> Path:
    """`tiny` (./recipes/tiny.py, else the shipped one), a path to a .py, or a run directory's `recipe.json`."""
    candidates = [Path(name)]
    if not name.endswith((".py", ".json")):
        candidates += [Path("recipes") / f"{name}.py", shipped_dir("recipes") / f"{name}.py"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = shipped_recipes()
    hint = difflib.get_close_matches(Path(name).stem, shipped, n=1)
    extra = f"did you mean {hint[0]!r}? " if hint else ""
    raise ConfigError(f"recipe {name!r} not found; {extra}shipped recipes: {', '.join(shipped)}.")


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuilds a recipe from `recipe.json` (as written into a run directory); unknown keys raise."""
    known = all_keys(Recipe())
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Recipe)
    for section, value in data.items():
        if section not in hints:
            raise unknown_key(section, known)
        if section == "phases":
            kwargs[section] = tuple(PhaseConfig(**p) for p in value)
            continue
        if not isinstance(value, dict):
            kwargs[section] = value
            continue
        cls = hints[section]
        types_ = typing.get_type_hints(cls)
        fields: dict[str, Any] = {}
        for name, v in value.items():
            if name not in types_:
                raise unknown_key(f"{section}.{name}", known)
            fields[name] = tuple(v) if isinstance(v, list) else v
        kwargs[section] = cls(**fields)
    return Recipe(**kwargs)


def load_recipe_file(path: Path) -> Recipe:
    """A recipe is a Python file defining `RECIPE`, or a `recipe.json` written by an earlier run."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"recipe file {path} is not valid JSON ({err}); fix or regenerate it.") from None
        data = data.get("recipe", data)
        return recipe_from_dict(data)
    spec = importlib.util.spec_from_file_location(f"bigbatch_recipe_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe file {path} defines no RECIPE = bigbatch.config.Recipe(...); add one.")
    return recipe


def load_recipe(name: str, overrides: Optional[dict[str, str]] = None) -> Recipe:
    """The recipe `name` (see find_recipe) with `overrides` applied, validated."""
    recipe = load_recipe_file(find_recipe(name))
    return apply_overrides(recipe, overrides or {}).validate()
