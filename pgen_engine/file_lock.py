"""An exclusive lock between processes that prepare the same files (POSIX ``flock``).

Runs launched side by side (one per seed, say) commonly share ``data.work_dir`` and
``data.dataset_dir``. Without a lock each one fits the image tokenizer itself (the VQ fit is
time-budgeted, so two fits differ) and the last rename wins: runs that already built their
token cache and initial model with the other tokenizer then evaluate and generate with the
wrong codes, and a second run finding a half-generated synthetic dataset refuses it. With
the lock, the second process waits and then reuses what the first one made.

The kernel drops an ``flock`` when its holder exits, crashed or not, so a lock file left on
disk is never stale. Where the file system cannot lock (some network / FUSE mounts), the
work goes on unlocked after one warning line.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

# the file system has no (working) flock: go on unlocked rather than fail the run
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _try_lock(fh: BinaryIO, path: Path, what: str) -> bool:
    """Take an exclusive ``flock`` on the open file ``fh`` without waiting: False when another
    process holds it; True when taken, or when the file system cannot lock (after one warning)."""
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NO_LOCKING:
            raise
        print(f"warning: {path}: cannot lock ({e.strerror}); {what} runs unlocked", file=sys.stderr, flush=True)
    return True


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing, parents too) inside the block.

    ``what`` names the work for the one line printed when another process holds the lock and
    this one waits (e.g. ``"data preparation in runs/work"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if not _try_lock(fh, path, what):
            print(f"waiting for another process to finish {what} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def hold(path: str | os.PathLike, what: str) -> BinaryIO | None:
    """Take an exclusive lock on ``path`` (created if missing) without waiting, and keep it until
    the returned file is closed (or the process ends); None when another process holds it.

    For work that must not wait its turn, e.g. a second training run in an ``output_dir`` that
    a running one uses.
    """
    path = Path(path)
    fh = open(path, "a+b")
    try:
        if _try_lock(fh, path, what):
            return fh
    except BaseException:
        fh.close()
        raise
    fh.close()
    return None
