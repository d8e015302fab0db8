"""Configs as data: dataclasses with defaults, a YAML file, and command-line overrides.

Precedence (later wins): the dataclass defaults < ``--config FILE`` (YAML) < the command's own options
(``--batch-size 8``) < ``--set key.sub=value`` overrides. Values given with ``--set`` are parsed as YAML
scalars, so ``--set lr=1e-4`` is a float and ``--set groups=[grid,regions]`` a list.

A field that names a choice is typed ``Literal[...]`` (also ``Literal[...] | None`` and
``tuple[Literal[...], ...]``); a value outside it is a :class:`ConfigError` listing the allowed values,
never a silent fallback (:func:`check_choices`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a (nested) dataclass config."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming the key and its source."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    for name, value in kwargs.items():
        _check_choice(f"{where}: {name}", hints[name], value)
    return cls(**kwargs)


def _allowed(hint) -> tuple | None:
    """The values a ``Literal`` hint allows (looking inside ``X | None``); None if it is no choice."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is not type(None) and _allowed(arg) is not None:
                return _allowed(arg)
    return None


def _check_choice(what: str, hint, value) -> None:
    if typing.get_origin(hint) is tuple and isinstance(value, (tuple, list)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            for item in value:
                _check_choice(what, args[0], item)
        return
    allowed = _allowed(hint)
    if allowed is None or value is None or dataclasses.is_dataclass(value):
        return
    if value not in allowed:
        raise ConfigError(f"{what}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_choices(cfg: Any, where: str = "config") -> None:
    """Every ``Literal``-typed field of a (nested) dataclass config holds an allowed value, or ConfigError
    naming the key (``where: section.key``) and listing the allowed values."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{where}.{f.name}" if where else f.name)
        else:
            _check_choice(f"{where}: {f.name}", hints[f.name], value)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _scalar(raw)
    return out


def _scalar(raw: str):
    """A ``--set`` value as YAML, except that ``1e-4`` is a float (YAML 1.1 would read a string)."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(cls: type[T], file: str | Path | None = None, options: dict | None = None,
                overrides: list[str] | None = None) -> T:
    """Resolve a config with the documented precedence: defaults < file < options < overrides.

    ``options`` holds the command's explicit options; ``None`` values mean "not given" and are skipped.
    """
    data = to_dict(cls())
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        from_dict(cls, merge(data, loaded), str(path))  # validate keys early, naming the file
        data = merge(data, loaded)
    if options:
        data = merge(data, _nested({k: v for k, v in options.items() if v is not None}))
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data, "--set")


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def save_config(cfg: Any, path: str | Path, extra: dict | None = None) -> None:
    data = to_dict(cfg)
    if extra:
        data = merge(data, extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
