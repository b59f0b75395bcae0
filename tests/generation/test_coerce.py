"""Strict argument conversion of the Generator and SamplingParams."""
import numpy as np
import pytest
import torch

from pgen_engine.generation.coerce import as_flag, as_float, as_int


@pytest.mark.parametrize("v", [3, np.int32(3), np.int64(3), torch.tensor(3)])
def test_integers_pass(v):
    assert as_int(v, "x") == 3 and type(as_int(v, "x")) is int


@pytest.mark.parametrize("v", [2.5, 3.0, "3", b"3", None, True, np.bool_(True), torch.tensor(True), torch.tensor(1.0)])
def test_non_integers_are_refused_not_truncated(v):
    with pytest.raises(TypeError, match="x must be an integer"):
        as_int(v, "x")


def test_int64_range():
    assert as_int(2 ** 70, "x") == 2 ** 70
    assert as_int(-(2 ** 63), "x", int64=True) == -(2 ** 63)
    with pytest.raises(ValueError, match="fit int64"):
        as_int(2 ** 63, "x", int64=True)


def test_flags_and_floats():
    assert as_flag(np.bool_(False), "f") is False and as_flag(1, "f") is True
    with pytest.raises(TypeError):
        as_flag("False", "f")
    with pytest.raises(ValueError):
        as_flag(2, "f")
    assert as_float(np.float32(0.5), "p") == 0.5 and as_float(2, "p") == 2.0
    for bad in ("1e3", True, None):
        with pytest.raises(TypeError, match="p must be a number"):
            as_float(bad, "p")
