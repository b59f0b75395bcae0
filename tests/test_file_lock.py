"""The inter-process lock of pgen_engine/file_lock.py: waits for a holder, survives its crash."""
from __future__ import annotations

import errno
import fcntl
import subprocess
import sys
import time

import pytest

from pgen_engine import file_lock
from pgen_engine.file_lock import exclusive

HOLD = """
import sys, time
from pgen_engine.file_lock import exclusive
with exclusive(sys.argv[1], "a test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def _holder(lock, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_waits_for_the_holder_and_says_so(tmp_path, capsys):
    lock = tmp_path / "sub" / ".lock"  # parents are created
    holder = _holder(lock, 1.0)
    t0 = time.monotonic()
    with exclusive(lock, "the work"):
        waited = time.monotonic() - t0
        assert holder.stdout.readline().strip() == "released"  # printed before this process got the lock
    holder.wait()
    assert waited > 0.3
    assert f"waiting for another process to finish the work (lock {lock})" in capsys.readouterr().err


def test_a_killed_holder_releases_the_lock(tmp_path):
    lock = tmp_path / ".lock"
    holder = _holder(lock, 60.0)
    holder.kill()
    holder.wait()
    t0 = time.monotonic()
    with exclusive(lock, "the work"):
        assert time.monotonic() - t0 < 5


def test_a_file_system_without_flock_goes_on_unlocked_with_one_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with exclusive(tmp_path / ".lock", "the work"):
        ran.append(True)
    assert ran == [True]
    assert "warning:" in capsys.readouterr().err


def test_other_lock_errors_are_raised(tmp_path, monkeypatch):
    def denied(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", denied)
    with pytest.raises(OSError, match="Input/output"):
        with exclusive(tmp_path / ".lock", "the work"):
            pass


def test_hold_does_not_wait_and_keeps_the_lock_until_closed(tmp_path):
    path = tmp_path / "run.lock"
    code = ("import sys, time; from pgen_engine import file_lock; fh = file_lock.hold(sys.argv[1], 'x'); "
            "print('held' if fh else 'busy', flush=True); time.sleep(30 if fh else 0)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert file_lock.hold(path, "x") is None  # no wait: the other process holds it
    finally:
        holder.kill()
        holder.wait()
    fh = file_lock.hold(path, "x")  # the kernel dropped the dead holder's lock
    assert fh is not None
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "busy"
    fh.close()
    other = subprocess.run([sys.executable, "-c", code.replace("30 if fh", "0 if fh"), str(path)],
                           capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "held"
