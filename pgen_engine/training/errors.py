"""Errors shared by the training stages, and which exceptions are user-facing.

``train.py`` prints user-facing errors (bad input, non-finite training) as one line and
exits non-zero; anything else keeps its traceback.
"""
from __future__ import annotations


class NonFiniteError(RuntimeError):
    """Loss, gradient norm or reward became NaN/Inf; training stopped without writing a checkpoint."""


def is_user_error(e: BaseException) -> bool:
    """True for errors whose message already says what to fix."""
    from pgen_engine.data.dataset import DataError
    from pgen_engine.models.janus_config import CheckpointError

    from .checkpoints import ResumeError
    from .sft_data import DataPrepError

    return isinstance(e, (DataPrepError, DataError, CheckpointError, ResumeError, NonFiniteError,
                          FileNotFoundError))
