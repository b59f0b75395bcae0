"""Atomic file and directory writes.

Every output the engine produces (checkpoints, caches, images, manifests) goes through
these helpers so that a crash or an error never leaves a half-written file in place of a
good one: data is written to a temporary sibling and renamed over the target.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# safetensors reports a failed write as SafetensorError("Error while serializing: I/O error: File too large
# (os error 27)"): not an OSError, so the CLIs showed a traceback for a full disk
_SAFETENSORS_IO = re.compile(r"I/O error: (.*?) \(os error (\d+)\)")


def _io_failure(e: BaseException, target: Path, tmp: Path) -> OSError | None:
    """``e`` (raised while writing ``target`` through its temporary ``tmp``) as an OSError naming
    ``target``, or None when it is no I/O failure. A bare ``[Errno 28] No space left on device``
    (a failed ``write``/``flush``, numpy, safetensors) did not say which output could not be
    written, and one naming the hidden temporary named a file that no longer exists."""
    if isinstance(e, OSError):
        def final(name) -> str | None:  # e.g. tmp/model.safetensors -> target/model.safetensors
            name = os.fspath(name)
            inside = name == str(tmp) or name.startswith(str(tmp) + os.sep)
            return str(target) + name[len(str(tmp)):] if inside else None

        if e.filename is None:
            where = str(target)
            return OSError(e.errno, e.strerror or str(e), where) if e.errno is not None else OSError(f"{where}: {e}")
        first, second = final(e.filename), None if e.filename2 is None else final(e.filename2)
        if (first or second) and e.errno is not None:  # a copy into the temporary names both files
            first, second = first or e.filename, second or e.filename2
            if second is not None and os.fspath(second) == str(target) == first:
                # the temporary renamed onto the target (a folder there): "'out' -> 'out'" named it twice
                return OSError(e.errno, e.strerror, first)
            return OSError(e.errno, e.strerror, first, None, second)
        return e
    if type(e).__name__ == "SafetensorError":
        m = _SAFETENSORS_IO.search(str(e))
        if m:
            return OSError(int(m.group(2)), m.group(1), str(target))
    return None


def _raise_named(e: BaseException, target: Path, tmp: Path) -> None:
    named = _io_failure(e, target, tmp)
    if named is not None and named is not e:
        raise named from e


def _make_parent(target: Path) -> None:
    """``mkdir -p`` of ``target``'s folder; one that runs through a file (``notes.txt/out.json``) said
    only ``[Errno 17] File exists: 'notes.txt'`` / ``[Errno 20] Not a directory``, not which output
    could not be written nor why."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        why = folder_problem(target.parent) or "is not a folder"
        raise NotADirectoryError(f"{target}: cannot be written: its folder {target.parent} {why}") from None


def _cannot_write(e: OSError, target: Path) -> OSError:
    """The failure to create ``target``'s temporary sibling, as an OSError naming ``target`` and its folder."""
    if e.errno is None:
        return e
    return OSError(e.errno, f"{e.strerror} (creating a file in {target.parent or '.'})", str(target))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched; an I/O
    failure (a full disk, ``ulimit -f``) is raised as an OSError naming ``path``.
    """
    target = Path(path)
    _make_parent(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:  # named the random temporary ("Permission denied: './.out.json.k2j3.tmp'")
        raise _cannot_write(e, target) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        _raise_named(e, target, tmp_path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialise ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used as an output folder, or None when it is a folder or
    ``mkdir -p`` can create it. Checked before a run starts: ``mkdir`` would fail only later, with
    ``[Errno 17] File exists`` / ``[Errno 20] Not a directory`` and no word of which setting is wrong."""
    target = Path(path)
    if target.exists():
        return None if target.is_dir() else "exists and is not a folder"
    for parent in target.absolute().parents:  # the nearest existing ancestor decides whether mkdir -p can work
        if parent.exists():
            if not parent.is_dir():
                return f"cannot be created: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot be created: {parent} is not writable"
            return None
    return None


def _check_not_file(target: Path) -> None:
    """A folder output never replaces a file: a mistyped output path must not delete the user's file."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder (expected a new or existing output folder); "
                              "not replacing a file with a folder")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; swap it into place on success.

    An existing ``path`` is replaced only after the new directory is complete: it is
    first renamed aside, the new one renamed in, then the old one deleted. On an
    exception (also one while swapping it in) the temporary directory is removed and
    ``path`` is untouched; an I/O failure is raised as an OSError naming ``path``.
    """
    target = Path(path)
    _check_not_file(target)
    _make_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise _cannot_write(e, target) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700 folders
        replace_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_named(e, target, tmp)
        raise


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the complete folder ``new`` at ``target`` (same filesystem), replacing any old one.

    The old folder is renamed aside first and deleted only after ``new`` is in place, so
    ``target`` is never missing half its files; when ``new`` cannot be moved in, the old
    folder is moved back before the error is raised.
    """
    new, target = Path(new), Path(target)
    _check_not_file(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:  # the good old folder back where it was, not left under a hidden name
            os.replace(old, target)
        raise
    if old is not None:
        remove_tree(old)


def _allow_and_retry(func, path, _exc_info) -> None:
    """rmtree's error handler: a read-only folder (``chmod 555`` on an old cache or checkpoint) kept
    its files, and the replaced folder stayed behind as a hidden ``.<name>.XXXX.old`` copy. The
    folder gets its owner's write bit and the removal is retried once; other failures are ignored."""
    try:
        parent = os.path.dirname(path)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(path)
    except OSError:
        pass


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` and everything in it, read-only sub-folders included; best effort."""
    shutil.rmtree(path, onerror=_allow_and_retry)  # onexc from Python 3.12; onerror still works there


def allocate_file(path: str | os.PathLike, nbytes: int) -> None:
    """Create ``path`` as ``nbytes`` zero bytes whose disk blocks are reserved now.

    For files later written through a memory map (the token and vision-feature caches): into
    a sparse file, a disk that fills up part-way is a SIGBUS that kills the process with no
    message and no clean-up, and numpy's own creation fails with a bare ``[Errno 27] File too
    large`` naming no file. Reserved blocks make a full disk an OSError naming ``path`` here,
    before any work is done.
    """
    try:
        with open(path, "wb") as f:
            fallocate = getattr(os, "posix_fallocate", None)
            try:
                if fallocate is None:
                    raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
                fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                f.truncate(nbytes)  # a file system without fallocate: a sparse file as before
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
