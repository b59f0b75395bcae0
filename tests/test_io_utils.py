"""Atomic writes never leave a half-written file in place of a good one."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pgen_engine.io_utils import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from tests.fs_faults import file_size_limit


def test_atomic_write_replaces(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_keeps_old_on_error(tmp_path):
    f = tmp_path / "a.json"
    atomic_write_json(f, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert f.read_text().strip().startswith("{") and '"x": 1' in f.read_text()
    assert len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_swaps_and_keeps_old_on_error(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("v1")
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("v2")
    assert (d / "w").read_text() == "v2"
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "w").write_text("v3")
            raise ValueError("boom")
    assert (d / "w").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "w").write_text("v")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_folder_outputs_never_replace_a_file(tmp_path):
    from pgen_engine.io_utils import replace_dir
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt: exists and is not a folder"):
        with atomic_dir(f) as tmp:
            (tmp / "w").write_text("x")
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(FileExistsError, match=r"notes\.txt: exists and is not a folder"):
        replace_dir(new, f)
    assert f.read_text() == "keep me" and new.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "notes.txt"]


def test_folder_problem_says_why_a_folder_cannot_be_made(tmp_path):
    from pgen_engine.io_utils import folder_problem

    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert folder_problem(tmp_path) is None and folder_problem(tmp_path / "new" / "deeper") is None
    assert folder_problem(f) == "exists and is not a folder"
    assert folder_problem(f / "a" / "b") == f"cannot be created: {f} is a file, not a folder"




def test_a_failed_write_names_the_output_and_keeps_the_old_one(tmp_path):
    # a full disk used to surface as a bare "[Errno 27] File too large" (no file named), and through
    # safetensors as a SafetensorError (not an OSError: a traceback from every CLI)
    import torch
    from safetensors.torch import save_file

    f, w = tmp_path / "out.json", tmp_path / "w.safetensors"
    atomic_write_json(f, {"x": 1})
    good = f.read_bytes()
    with file_size_limit(4096):
        with pytest.raises(OSError) as info:
            atomic_write_text(f, "y" * 10_000)
        assert info.value.errno == errno.EFBIG and info.value.filename == str(f), info.value
        with pytest.raises(OSError) as info:
            with atomic_path(w) as tmp:
                save_file({"a": torch.zeros(10_000)}, str(tmp))
        assert info.value.errno == errno.EFBIG and info.value.filename == str(w), info.value
        d = tmp_path / "ckpt"
        with pytest.raises(OSError) as info:
            with atomic_dir(d) as tmp:
                (tmp / "big.bin").write_bytes(b"x" * 10_000)
        assert info.value.errno == errno.EFBIG and info.value.filename == str(d), info.value
        with pytest.raises(OSError) as info:  # a named temporary file inside the folder: its final name
            with atomic_dir(d) as tmp:
                save_file({"a": torch.zeros(10_000)}, str(tmp / "model.safetensors"))
        assert info.value.filename == str(d), info.value
    assert f.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporaries left


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    # a failed rename of the new folder into place left the old one under a hidden .old name
    # (the target missing) and the new one as a stray .tmp folder
    import pgen_engine.io_utils as io

    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("v1")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(d) as tmp:
            (tmp / "w").write_text("v2")
    assert (d / "w").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_copy_into_an_atomic_folder_names_its_final_path(tmp_path):
    # a copy into the temporary named it: "[Errno 27] File too large: 'src.bin' -> '.out.k2j3.tmp/src.bin'"
    import shutil

    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10_000)
    with file_size_limit(4096):
        with pytest.raises(OSError) as info:
            with atomic_dir(tmp_path / "out") as tmp:
                shutil.copyfile(src, tmp / "copy.bin")
    e = info.value
    assert e.errno == errno.EFBIG and e.filename == str(src) and e.filename2 == str(tmp_path / "out" / "copy.bin"), e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]


def test_an_output_whose_folder_runs_through_a_file_says_so(tmp_path):
    # used to be a bare "[Errno 17] File exists: '.../notes.txt'", naming neither the output nor the problem
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(NotADirectoryError, match=rf"{f}/out\.json: cannot be written: its folder {f} exists and is "
                                                 "not a folder"):
        atomic_write_json(f / "out.json", {})
    with pytest.raises(NotADirectoryError, match=rf"{f}/a/d: cannot be written: its folder {f}/a cannot be created: "
                                                 rf"{f} is a file, not a folder"):
        with atomic_dir(f / "a" / "d"):
            pass
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_output_in_a_folder_that_refuses_new_files_names_the_output(tmp_path, monkeypatch):
    # a read-only folder made mkstemp/mkdtemp fail naming their random temporary: "Permission denied:
    # './.ds.ap2hwflo.tmp'" (pgen data synth --out ds in a read-only folder)
    import tempfile

    def refused(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.abc123.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError) as info:
        atomic_write_text(tmp_path / "out.txt", "x")
    assert info.value.filename == str(tmp_path / "out.txt") and str(tmp_path) in info.value.strerror
    with pytest.raises(PermissionError) as info:
        with atomic_dir(tmp_path / "ds"):
            pass
    assert info.value.filename == str(tmp_path / "ds"), info.value


def test_a_file_output_where_a_folder_is_names_it_once(tmp_path):
    # "[Errno 21] Is a directory: '.../adir' -> '.../adir'": the temporary's rename, mapped to the output
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomic_write_json(tmp_path / "adir", {})
    assert str(info.value) == f"[Errno 21] Is a directory: '{tmp_path / 'adir'}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_replacing_a_read_only_folder_leaves_no_hidden_old_copy(tmp_path, monkeypatch):
    # chmod 555 on an old token cache / checkpoint: rmtree(ignore_errors=True) could not delete its files
    # and the replaced folder stayed behind as a hidden .<name>.XXXX.old copy
    import shutil
    import stat

    from pgen_engine.io_utils import replace_dir

    real_unlink = os.unlink

    def unlink_as_non_root(path, *, dir_fd=None):  # root may delete anything: refuse like for a user
        st = os.fstat(dir_fd) if dir_fd is not None else os.stat(os.path.dirname(path) or ".")
        if not st.st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, dir_fd=dir_fd)

    d = tmp_path / "cache"
    d.mkdir()
    (d / "codes.bin").write_bytes(b"old")
    d.chmod(0o555)
    new = tmp_path / "new"
    new.mkdir()
    (new / "codes.bin").write_bytes(b"new")
    monkeypatch.setattr(os, "unlink", unlink_as_non_root)
    monkeypatch.setattr(shutil.os, "unlink", unlink_as_non_root)
    replace_dir(new, d)
    monkeypatch.undo()
    assert (d / "codes.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
