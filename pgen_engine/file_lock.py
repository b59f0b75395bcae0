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
from typing import Iterator

# the file system has no (working) flock: go on unlocked rather than fail the run
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing, parents too) inside the block.

    ``what`` names the work for the one line printed when another process holds the lock and
    this one waits (e.g. ``"data preparation in runs/work"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish {what} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKING:
                raise
            print(f"warning: {path}: cannot lock ({e.strerror}); {what} runs unlocked", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
