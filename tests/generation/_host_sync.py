"""Shared trap for "no host synchronisation inside the decode loop" tests."""
from __future__ import annotations

from typing import Callable

import torch

READBACKS = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy")


def forbid_host_reads(monkeypatch, active: Callable[[], bool], where: str) -> None:
    """Make every tensor read-back to Python (``item``, ``bool``, ``tolist``, ...) raise while
    ``active()`` is True."""
    def guard(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            if active():
                raise AssertionError(f"host sync: Tensor.{name} called {where}")
            return orig(self, *a, **k)
        return f

    for name in READBACKS:
        monkeypatch.setattr(torch.Tensor, name, guard(name))
