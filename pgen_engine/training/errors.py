"""Errors of the training stages.

User-facing errors derive from :class:`pgen_engine.errors.PgenUserError`: ``train.py``
prints them as one line and exits non-zero; anything else keeps its traceback.
"""
from __future__ import annotations

from pgen_engine.errors import PgenUserError


class NonFiniteError(PgenUserError, RuntimeError):
    """Loss, gradient norm or reward became NaN/Inf; training stopped without writing a checkpoint."""
