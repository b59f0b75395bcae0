"""Errors of the training stages.

User-facing errors derive from :class:`pgen_engine.errors.PgenUserError`: ``train.py``
prints them as one line and exits non-zero; anything else keeps its traceback.
"""
from __future__ import annotations

import math

from pgen_engine.errors import PgenUserError

from .distributed import all_ranks_true


class NonFiniteError(PgenUserError, RuntimeError):
    """Loss, gradient norm or reward became NaN/Inf; training stopped without writing a checkpoint."""


def stop_if_not_finite(value: float, what: str, step: int, then: str) -> None:
    """Raise :class:`NonFiniteError` on every rank when ``value`` is not finite on any rank (collective).

    ``then`` ends the message (what happens to checkpoints). A rank whose own value is finite
    says "on another rank" instead of printing its finite value as "not finite".
    """
    if not all_ranks_true(math.isfinite(value)):
        seen = value if not math.isfinite(value) else "on another rank"
        raise NonFiniteError(f"step {step}: {what} is not finite ({seen}) — {then}")
