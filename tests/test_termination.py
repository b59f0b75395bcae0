"""SIGTERM handling (pgen_engine/termination.py): immediate vs deferred, handlers restored."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pgen_engine.termination import EXIT_STATUS, DeferredTermination, Terminated, raise_on_sigterm, restore_sigterm


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode boundary


def test_raise_on_sigterm_raises_terminated_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    previous = raise_on_sigterm()
    try:
        with pytest.raises(Terminated, match="SIGTERM") as info:
            _sigterm_self()
        assert info.value.checkpoint is None
        assert not isinstance(info.value, Exception)  # `except Exception` must not swallow a stop
    finally:
        restore_sigterm(previous)
    assert signal.getsignal(signal.SIGTERM) is before
    assert EXIT_STATUS == 143


def test_deferred_termination_records_repeats_without_raising_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with DeferredTermination() as term:
        assert not term.requested
        _sigterm_self()
        _sigterm_self()  # the launcher's forwarded copy: counted, not raised
        assert term.requested and term.signals == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_termination_outside_the_main_thread_is_inert():
    import threading  # late import: only this test needs a thread

    seen = {}

    def body():
        with DeferredTermination() as term:
            seen["requested"] = term.requested
        seen["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"requested": False, "handler": before}
