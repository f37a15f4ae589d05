"""Study presets are Python files (``configs/*.py``) that define ``CONFIG``, a frozen dataclass.

``load_config(path, overrides)`` imports the file and applies command-line overrides ``section.field=value``
(nested dataclasses, values parsed as Python literals, tuples from comma lists), refusing unknown fields and
values of the wrong type with a message that lists what exists.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import typing
from typing import Any, Sequence


class ConfigError(ValueError):
    pass


class StudyConfigError(ValueError):
    """A config value that cannot work, or a run folder that holds another config. The message names the field
    (or folder) and what to do."""


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> Any:
    p = pathlib.Path(path)
    if not p.exists():
        here = pathlib.Path(__file__).resolve().parent.parent / "configs"
        alt = here / p.name if p.suffix else here / f"{p.name}.py"
        if alt.exists():
            p = alt
        else:
            avail = sorted(x.stem for x in here.glob("*.py")) if here.is_dir() else []
            raise ConfigError(f"config file {path} not found; presets: {', '.join(avail) or 'none'}")
    spec = importlib.util.spec_from_file_location(f"jaxpoison_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise ConfigError(f"{p}: could not be loaded ({type(e).__name__}: {e})") from e
    if not hasattr(mod, "CONFIG"):
        raise ConfigError(f"{p} defines no CONFIG")
    cfg = mod.CONFIG
    for o in overrides:
        cfg = apply_override(cfg, o)
    return cfg


def _tuple_elem(hint: Any) -> type:
    """The element type of a ``tuple[X, ...]`` / ``Tuple[X, ...]`` hint (``str`` when it says nothing)."""
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if typing.get_origin(hint) is typing.Union:      # Optional[tuple[...]]
        for a in args:
            if typing.get_origin(a) is tuple:
                return _tuple_elem(a)
        return str
    return args[0] if args and args[0] in (int, float, str, bool) else str


def _parse(raw: str, current: Any, hint: Any) -> Any:
    if isinstance(current, bool) or hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true/false, got {raw!r}")
    if isinstance(current, tuple):
        if raw.startswith("("):
            return tuple(ast.literal_eval(raw))
        items = [x.strip() for x in raw.split(",") if x.strip()]
        elem = type(current[0]) if current else _tuple_elem(hint)
        return tuple(_parse(x, elem() if elem in (int, float, str) else None, elem) for x in items)
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        val = raw
    if isinstance(current, float) and isinstance(val, int):
        val = float(val)
    union = tuple(a for a in typing.get_args(hint) if isinstance(a, type)) if typing.get_origin(hint) is typing.Union \
        else ()                                      # e.g. int | str (a mesh size or 'auto')
    if current is not None and not isinstance(current, tuple) and not isinstance(val, (type(current),) + union):
        raise ConfigError(f"expected a {type(current).__name__}, got {raw!r}")
    return val


def apply_override(cfg: Any, override: str) -> Any:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    return _set(cfg, parts, raw.strip(), key)


def _set(obj: Any, parts: list, raw: str, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{full}: {type(obj).__name__} has no fields to set")
    names = {f.name: f for f in dataclasses.fields(obj)}
    if parts[0] not in names:
        raise ConfigError(f"unknown config field {full!r}: {type(obj).__name__} has {', '.join(names)}")
    cur = getattr(obj, parts[0])
    if len(parts) > 1:
        return dataclasses.replace(obj, **{parts[0]: _set(cur, parts[1:], raw, full)})
    hints = typing.get_type_hints(type(obj))
    try:
        val = _parse(raw, cur, hints.get(parts[0]))
        return dataclasses.replace(obj, **{parts[0]: val})
    except ConfigError as e:
        raise ConfigError(f"{full}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{full}={raw}: {e}") from None


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def dataclass_from_dict(cls, d: dict):
    """A (nested, frozen) config dataclass from its JSON form: lists back to tuples, unknown keys ignored."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints.get(f.name)
        kw[f.name] = dataclass_from_dict(t, v) if dataclasses.is_dataclass(t) and isinstance(v, dict) else _tuplify(v)
    return cls(**kw)
