"""The output folder of ``pgen generate`` (pgen_engine/generation/output_dir.py)."""
from __future__ import annotations

import errno
import resource

import numpy as np
import pytest

from pgen_engine.generation.output_dir import make_out, write_png


def test_a_png_that_cannot_be_written_names_its_place_in_out(tmp_path):
    # a full disk was "pgen generate: error: [Errno 27] File too large", naming no file
    out = tmp_path / "out dir ü"
    stage, created = make_out(out)
    assert created
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # ulimit -f: EFBIG past 1 KiB (SIGXFSZ is ignored)
    try:
        with pytest.raises(OSError) as info:
            write_png(noise, stage / "a_0.png")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG and info.value.filename == str(out / "a_0.png"), info.value
    with pytest.raises(OSError) as info:  # an open() that fails keeps its own file name
        write_png(noise, tmp_path / "missing" / "b.png")
    assert info.value.filename == str(tmp_path / "missing" / "b.png")
