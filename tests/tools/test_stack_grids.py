"""tools/stack_grids.py: crops the demo's per-user grids to N columns and stacks them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pgen_engine.eval.report import image_grid, save_png

TOOL = Path(__file__).resolve().parents[2] / "tools" / "stack_grids.py"


def _tool():
    spec = importlib.util.spec_from_file_location("stack_grids", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stacks_cropped_grids(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = []
    for u in range(2):
        rows = [("history", torch.randint(0, 256, (4, 64, 64, 3), generator=g, dtype=torch.uint8)),
                ("generated", torch.randint(0, 256, (10, 64, 64, 3), generator=g, dtype=torch.uint8))]
        paths.append(tmp_path / f"grid_user{u}.png")
        save_png(paths[-1], image_grid(rows))
    full = Image.open(paths[0])
    out = tmp_path / "out.png"
    assert _tool().main([str(out), *map(str, paths), "--columns", "3", "--scale", "1", "--colors", "0"]) == 0
    im = np.asarray(Image.open(out).convert("RGB"))
    width = 150 + 4 + 3 * (64 * 3 + 4)  # label column + 3 tiles of the demo's geometry
    assert im.shape == (2 * full.height + 8, width, 3)
    # the first grid's crop is pixel-identical at scale 1
    assert np.array_equal(im[:full.height], np.asarray(full.convert("RGB"))[:, :width])


def test_missing_grid_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main([str(tmp_path / "o.png"), str(tmp_path / "nope.png")])
    assert e.value.code != 0 and "nope.png" in capsys.readouterr().err
