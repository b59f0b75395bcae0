"""The base class of user-facing errors.

A :class:`PgenUserError` carries a message that already says what to fix (a bad config
key, a missing file, a run that stopped on a non-finite loss). The command-line entry
points (``train.py``, ``pgen``) catch it, print ``error: <first line>`` to stderr and exit
non-zero; any other exception keeps its traceback, because it is a bug.
"""
from __future__ import annotations


class PgenUserError(Exception):
    """An error whose one-line message tells the user what to fix."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
