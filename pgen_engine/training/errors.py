"""Which exceptions are user-facing (bad input, non-finite training) rather than bugs.

``train.py`` prints these as one line and exits non-zero; anything else keeps its traceback.
"""
from __future__ import annotations


def is_user_error(e: BaseException) -> bool:
    """True for errors whose message already says what to fix."""
    from pgen_engine.data.dataset import DataError
    from pgen_engine.models.janus_config import CheckpointError

    from .checkpoints import ResumeError
    from .sft import NonFiniteError
    from .sft_data import DataPrepError

    return isinstance(e, (DataPrepError, DataError, CheckpointError, ResumeError, NonFiniteError,
                          FileNotFoundError))
