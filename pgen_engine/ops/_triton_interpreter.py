"""Triton's CPU interpreter (``TRITON_INTERPRET=1``) with NumPy >= 2.4: loop bounds loaded at run time.

The interpreter keeps every scalar as a 1-element NumPy array and, in Triton 3.6, turns one into a
Python int for ``range(...)`` with ``int(array)``. NumPy 2.4 refuses that for arrays with a
dimension ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel whose
loop bound is loaded from memory (the attention, decode, sampling and log-prob kernels) failed under
the interpreter; newer Triton squeezes the array first. Compiled kernels (GPU) never run this code.

:func:`apply` fixes the interpreter's ``tensor.__index__`` the same way, only where it is needed
(feature detection: NumPy refuses, and the interpreter has the patch hook it is fixed through).
"""
from __future__ import annotations

import inspect

import numpy as np


def numpy_refuses_sized_int() -> bool:
    """True when ``int()`` of a 1-element array with a dimension raises (NumPy >= 2.4)."""
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def _index(self) -> int:
    return int(np.asarray(self.handle.data).reshape(()))


def apply() -> bool:
    """Make the interpreter's scalar ``__index__`` squeeze its array; True when it was patched (once)."""
    if not numpy_refuses_sized_int():
        return False
    try:
        from triton.runtime import interpreter  # late import: Triton is optional; its interpreter loads on demand
    except Exception:  # noqa: BLE001 - no Triton, or a layout without the interpreter: nothing to fix
        return False
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_pgen_index_fixed", False):
        return False
    if list(inspect.signature(orig).parameters) != ["tensor", "scope"]:  # a layout this fix does not know
        return False

    def patch_lang_tensor(tensor, scope):
        out = orig(tensor, scope)
        # set through the same scope, so the interpreter restores the original after the launch
        scope.set_attr(tensor, "__index__", _index)
        return out

    patch_lang_tensor._pgen_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
