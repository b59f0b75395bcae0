"""Typed parsing of nested YAML data into dataclasses, with one-line dotted-key errors.

:func:`build` turns ``{"train": {"max_steps": 20}}`` into the annotated dataclass tree,
checking every value against its field's annotation (``int``, ``float``, ``bool``,
``str``, ``Literal``, ``Optional``, ``list``, ``tuple``, nested dataclasses). Every problem
raises :class:`ConfigError` with one line naming the source and the dotted key, e.g.
``cfg.yaml: train.max_steps='three': expected int``. :func:`parse_overrides` and
:func:`set_dotted` apply ``section.key=value`` command-line overrides (values parsed as YAML).
The run-config schema itself is :mod:`pgen_engine.config`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pgen_engine.errors import PgenUserError


class ConfigError(PgenUserError, ValueError):
    """An invalid run config; the message is one line naming the source and key."""


# ``Optional[X]`` and ``X | None`` (PEP 604, what ``from __future__ import annotations`` fields give)
_UNIONS = (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNIONS:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple):
        return str(tp).replace("typing.", "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the typed value or raises ConfigError."""
    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}={value!r}: expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        if value is None and type(None) in typing.get_args(tp):
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            if value is None:
                fail()
            return coerce(value, args[0], key, source)
        fail()
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            fail()
        return [coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail()
        return tuple(coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "2e-4" (no dot) as a string; accept numeric text for float fields.
            try:
                return float(value)
            except ValueError:
                fail()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")


def build(cls: type, values: dict, prefix: str, source: str) -> Any:
    """``cls(**values)`` with every value type-checked; ``prefix`` is the dotted key of ``values``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"{source}: unknown key {dotted!r} (known keys here: {', '.join(sorted(fields))})")
        kwargs[k] = coerce(v, hints[k], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# numpy's generators (synthetic data, tokenizer fit) refuse negative seeds and torch's refuse
# seeds past 64 bits; the rank is added to the run seed, hence the margin below 2**64
SEED_RANGE = (0, 2 ** 63 - 1)


def check_seed(key: str, value: int, sep: str = "=") -> None:
    """Refuse a seed that numpy / torch would reject only after data preparation had run. The
    message names ``key`` (a config key, or with ``sep=" "`` a command-line flag) and the value."""
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        raise ConfigError(f"{key}{sep}{value}: expected a seed in [{lo}, 2**63 - 1]")


def check_finite(key: str, value: float, *, positive: bool = False) -> None:
    """Refuse NaN / Inf (and values <= 0 with ``positive``; < 0 without): the optimizer and
    DeepSpeed would take them and turn every weight into NaN, or fail deep in their own code."""
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"{key}={value}: expected a finite number {'> 0' if positive else '>= 0'}")


def set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted="a.b.c"`` (missing sections are created)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: bad override key {dotted!r}: expected section.key=value")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.max_steps=20", ...]`` -> ``[("train.max_steps", 20), ...]`` (values parsed as YAML)."""
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"command line: override {ov!r}: expected key=value (e.g. train.max_steps=20)")
        key, text = ov.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error: plain YAML
    keeps the last one, so a second ``train:`` section silently dropped every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; the keys written after it override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate mapping keys (raises ``yaml.YAMLError`` with the line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | os.PathLike, what: str = "run config") -> Any:
    """``yaml.safe_load`` of the file at ``path``; a file that cannot be read is a ValueError of
    one line naming the file, ``what`` it should be and why (PyYAML's own message spans several
    lines with an excerpt; a non-UTF-8 file would be a bare UnicodeDecodeError)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: unreadable {what} (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}:{where} unreadable {what} (invalid YAML: {getattr(e, 'problem', None) or e})") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable {what} ({e.strerror or e})") from None


def deepcopy(x: Any) -> Any:
    """A copy of nested dicts/lists (leaves shared)."""
    if isinstance(x, dict):
        return {k: deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [deepcopy(v) for v in x]
    return x
