"""SIGTERM handling: a clean exit everywhere, a checkpoint first inside the training loop.

Cluster schedulers (SLURM preemption, Kubernetes eviction) and the DeepSpeed launcher stop a
job with SIGTERM and, after a grace period (the DeepSpeed launcher: 30 s), SIGKILL. Python's
default for SIGTERM is to die on the spot: no ``finally`` blocks (temporary files of atomic
writes stay behind) and no message.

* :func:`raise_on_sigterm` (called by ``train.py`` and ``pgen``) turns SIGTERM into a
  :class:`Terminated` exception: ``finally`` blocks run, the entry point prints one
  ``error:`` line and exits with status 143 (128 + SIGTERM), like the shell reports a
  process killed by it.
* :class:`DeferredTermination` (the training loop) only records the signal; the trainer
  checks it at each step boundary on every rank, writes a resumable checkpoint and then
  raises :class:`Terminated`, so ``--resume auto`` continues from the step it stopped at.
  Repeated SIGTERMs are only counted: a scheduler signals the whole process tree and the
  DeepSpeed launcher forwards its own copy to each rank, so every rank gets two at once.
  What ends a stuck step is the launcher's / scheduler's SIGKILL, or Ctrl-C.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

EXIT_STATUS = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Terminated(BaseException):
    """The process received SIGTERM.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that ``except Exception`` clauses
    around retries or optional features do not swallow a stop request. ``checkpoint`` is the
    resumable checkpoint written before stopping (None when the stop was immediate).
    """

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated("terminated by SIGTERM")


def _can_install() -> bool:
    # signal.signal works only in the main thread of the main interpreter
    return threading.current_thread() is threading.main_thread()


def raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated`; returns the previous handler (None outside the main thread).

    Callers that return to other code (``train.main`` called from Python) restore it with
    :func:`restore_sigterm`.
    """
    if not _can_install():
        return None
    return signal.signal(signal.SIGTERM, _raise)


def restore_sigterm(previous: Any) -> None:
    """Put back the handler :func:`raise_on_sigterm` returned (no-op for None)."""
    if previous is not None and _can_install():
        signal.signal(signal.SIGTERM, previous)


class DeferredTermination:
    """Context manager: while inside, SIGTERM sets :attr:`requested` instead of stopping.

    :attr:`signals` counts them (see the module docstring for why a repeat does not stop at
    once). Outside the main thread the handler cannot be installed and :attr:`requested`
    stays False. The previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.signals = 0
        self._previous: Any = None
        self._installed = False

    @property
    def requested(self) -> bool:
        """True once SIGTERM arrived inside the block."""
        return self.signals > 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def __enter__(self) -> "DeferredTermination":
        if _can_install():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
