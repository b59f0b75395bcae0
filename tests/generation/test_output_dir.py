"""The output folder of ``pgen generate`` (pgen_engine/generation/output_dir.py)."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from pgen_engine.generation.output_dir import make_out, write_png
from tests.fs_faults import file_size_limit


def test_a_png_that_cannot_be_written_names_its_place_in_out(tmp_path):
    # a full disk was "pgen generate: error: [Errno 27] File too large", naming no file
    out = tmp_path / "out dir ü"
    stage, created = make_out(out)
    assert created
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with file_size_limit(1024), pytest.raises(OSError) as info:  # EFBIG past 1 KiB, as on a full disk
        write_png(noise, stage / "a_0.png")
    assert info.value.errno == errno.EFBIG and info.value.filename == str(out / "a_0.png"), info.value
    with pytest.raises(OSError) as info:  # an open() that fails keeps its own file name
        write_png(noise, tmp_path / "missing" / "b.png")
    assert info.value.filename == str(tmp_path / "missing" / "b.png")


def test_a_failed_publish_puts_back_a_dangling_symlink_it_replaced(tmp_path, monkeypatch):
    # publish moved aside only entries that exists() saw: a dangling symlink named like an output was
    # replaced without being moved aside, and the roll-back after a failure deleted it
    import os

    import pgen_engine.generation.output_dir as output_dir
    from pgen_engine.generation.output_dir import MANIFEST, publish

    out = tmp_path / "out"
    stage, _ = make_out(out)
    (out / "a_0.png").symlink_to(tmp_path / "gone.png")
    (out / MANIFEST).write_text("old\n")
    (stage / "a_0.png").write_bytes(b"new")
    (stage / MANIFEST).write_text("new\n")
    real = os.replace

    def failing(src, dst):
        if os.fspath(dst) == str(out / MANIFEST) and os.fspath(src) == str(stage / MANIFEST):
            raise OSError(28, "No space left on device", os.fspath(dst))
        return real(src, dst)

    monkeypatch.setattr(output_dir.os, "replace", failing)
    with pytest.raises(OSError):
        publish(stage, out, ["a_0.png"])
    assert (out / "a_0.png").is_symlink() and os.readlink(out / "a_0.png") == str(tmp_path / "gone.png")
    assert (out / MANIFEST).read_text() == "old\n"
