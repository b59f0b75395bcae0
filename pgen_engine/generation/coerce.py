"""Strict conversion of user arguments for the generation API (Generator, SamplingParams).

``int()`` / ``bool()`` would silently truncate 2.5, parse "3" or treat "False" as true; these
helpers accept exactly the values a caller means (Python / NumPy integers, integer 0-d tensors,
bools for flags) and raise TypeError / ValueError naming the argument otherwise.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def as_int(value, name: str, *, int64: bool = False) -> int:
    """``value`` as a Python int: ints, NumPy integers and integer 0-d tensors pass; bools,
    floats, strings and None raise TypeError; with ``int64``, values outside int64 raise ValueError."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or (isinstance(value, torch.Tensor)
                                                           and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if int64 and not INT64_MIN <= v <= INT64_MAX:
        raise ValueError(f"{name} must fit int64, got {v}")
    return v


def as_flag(value, name: str) -> bool:
    """A bool, NumPy bool, or the integers 0 / 1; anything else (a string, None, 0.5, 2) raises."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a bool (or 0 / 1), got {type(value).__name__} {value!r}") from None
    if v not in (0, 1):
        raise ValueError(f"{name} must be a bool (or 0 / 1), got {v}")
    return bool(v)


def as_float(value, name: str) -> float:
    """A real number as a float; bools and strings raise TypeError (``float("1e3")`` would parse)."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None


def as_positive_int(value, name: str, lo: int = 1, lo_text: str = "") -> int:
    """``value`` as an int >= ``lo`` (NumPy integers too); ValueError naming ``name`` otherwise
    (bools, floats and strings included: the Generator's size arguments always raised ValueError)."""
    try:
        v = as_int(value, name)
    except TypeError:
        v = None
    if v is None or v < lo:
        raise ValueError(f"{name} must be an int >= {lo_text}{lo}, got {value!r}")
    return v
