"""Loading recipes: YAML files (with `base:` chains), `--set` overrides, type coercion into the schema
(schema.py), and back to YAML / dicts.

A recipe may start from another (`base: other.yaml`, resolved relative to the file, else a shipped recipe of
that name: `base: cifar10_edm_ddpmpp`) and override keys; `--set a.b=c` overrides are applied last, their
values parsed as YAML. Errors name the key path and the valid choices and exit 2 (`UsageError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import UsageError, choices
from .schema import TAGGED, Recipe

# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict:
    """Read one YAML mapping with the safe loader; missing/malformed files are a UsageError."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"malformed YAML in {p}{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read recipe {p}: {e}") from None
    if data is None:  # an empty file (or comments only) is a mistake, not "all defaults"
        raise UsageError(f"recipe {p} is empty; a recipe needs at least `base:` or the keys it sets "
                         f"(see the shipped recipes: `ddaepp recipes`)")
    if not isinstance(data, dict):
        raise UsageError(f"recipe {p} must be a YAML mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # A different tag replaces the section instead of mixing two schemas' keys.
            tag = TAGGED.get(k, (None,))[0]
            if tag and tag in v and v[tag] != out[k].get(tag):
                out[k] = dict(v)
            else:
                out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_raw(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file with its `base:` chain merged (base first), as a plain dict."""
    p = Path(path).resolve()
    if p in _seen:
        chain = " -> ".join(str(s.name) for s in (*_seen, p))
        raise UsageError(f"recipe base cycle: {chain}")
    data = read_yaml(path)  # messages name the file as the user typed it, not its absolute path
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UsageError(f"{p.name}: base must be a file name, got {base!r}")
    return _merge(load_raw(_find_base(p, base), (*_seen, p)), data)


def shipped_recipes_dir() -> Path:
    """The shipped recipes: `recipes/` of a source checkout, else the copy installed with the package
    (`pip install .` puts them in `ddaepp_cli/recipes/`, see pyproject.toml)."""
    package = Path(__file__).resolve().parents[1]  # ddaepp_cli/
    checkout = package.parent / "recipes"
    return checkout if checkout.is_dir() else package / "recipes"


def _find_base(recipe_file: Path, base: str) -> Path:
    """`base:` relative to the recipe's folder, else a shipped recipe by name (with or without .yaml)."""
    local = recipe_file.parent / base
    if local.is_file():
        return local
    shipped = shipped_recipes_dir()
    for cand in (shipped / base, shipped / f"{base}.yaml"):
        if Path(base).name == base and cand.is_file():
            return cand
    raise UsageError(f"{recipe_file.name}: base {base!r} not found next to it ({local}) nor among the shipped "
                     f"recipes (`ddaepp recipes`)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (['a', 'b'], yaml_value(c))."""
    if "=" not in text:
        raise UsageError(f"--set expects KEY=VALUE with a dotted key, got {text!r}")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UsageError(f"--set {key}: value {raw!r} is not valid YAML") from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UsageError(f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        if parts[0] in TAGGED and len(parts) == 2 and parts[1] == TAGGED[parts[0]][0]:
            # Switching the tag (e.g. --set diffusion.formulation=edm) starts that section afresh.
            node.clear()
        node[parts[-1]] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + choices(typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp` (YAML types), converting lists to tuples."""
    origin = typing.get_origin(tp)
    bad = UsageError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UsageError(f"{path}: {value!r} is not one of {choices(typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except UsageError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UsageError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UsageError(f"{path}: expected a section (mapping), got {value!r}")
        return build_section(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `layer: 9` for DiT block names
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp} at {path}")


def build_section(cls: type, raw: dict, path: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with suggestions."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"unknown key '{where}'{hint}; valid keys: {choices(names)}")
        tp = hints[key]
        if path == "" and key in TAGGED:
            tp = _tagged_schema(key, value)
        kwargs[key] = _coerce(value, tp, where)
    if path == "":
        for key in TAGGED:  # an absent tagged section still gets its default schema
            kwargs.setdefault(key, _tagged_schema(key, {})())
    return cls(**kwargs)


def _tagged_schema(section: str, value: Any) -> type:
    tag, schemas = TAGGED[section]
    if not isinstance(value, dict):
        raise UsageError(f"{section}: expected a section (mapping), got {value!r}")
    name = value.get(tag, next(iter(schemas)))
    if name not in schemas:
        raise UsageError(f"{section}.{tag}: {name!r} is not one of {choices(schemas)}")
    return schemas[name]


def recipe_from_dict(raw: dict) -> Recipe:
    return build_section(Recipe, raw, "")


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (with `base:` inheritance) and apply `--set` overrides."""
    raw = load_raw(path)
    raw.setdefault("name", Path(path).stem)
    return recipe_from_dict(apply_overrides(raw, list(overrides)))


def recipe_to_dict(recipe: Any) -> dict:
    """Plain, YAML/JSON-safe dict of a recipe (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def replace(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A copy of `recipe` with `--set`-style overrides applied and re-validated."""
    return recipe_from_dict(apply_overrides(recipe_to_dict(recipe), overrides))


def diff_recipes(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ, e.g. ['train.lr: 0.0004 -> 0.0002']."""
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            out.append(f"{path}: {x!r} -> {y!r}")

    walk(recipe_to_dict(a), recipe_to_dict(b), "")
    return out
