"""tools/vq_ablation.py: typed overrides, clear errors, one JSON line from a real (tiny) training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import vq_ablation  # noqa: E402

from pgen_engine.data.synth import SynthConfig, generate_synthetic  # noqa: E402


def test_overrides_are_typed():
    assert vq_ablation.parse_overrides(["lr=3e-3", "crop_size=0", "bf16=false"]) == dict(lr=3e-3, crop_size=0,
                                                                                           bf16=False)


@pytest.mark.parametrize("pair, match", [("nope=1", "FIELD=VALUE"), ("lr", "FIELD=VALUE"),
                                         ("crop_size=4.5", "expects a int"), ("bf16=yes", "expects a bool")])
def test_bad_overrides(pair, match):
    with pytest.raises(ValueError, match=match):
        vq_ablation.parse_overrides([pair])


def test_runs_one_recipe_and_writes_its_line(tmp_path, capsys):
    generate_synthetic(tmp_path / "d", SynthConfig(num_users=12, num_items=40, image_size=32, seed=0))
    n = torch.get_num_threads()
    try:
        rc = vq_ablation.main([str(tmp_path / "d"), "--set", "image_size=16", "--set", "codes_per_side=4",
                               "--set", "codebook_size=16", "--set", "max_steps=3", "--threads", "1",
                               "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 3 and line["overrides"]["max_steps"] == 3
    assert line["held_out"]["n"] >= 1 and line["held_out"]["psnr"] > 0
    assert json.loads((tmp_path / "r.json").read_text()) == line


def test_bad_inputs_exit_non_zero(tmp_path, capsys):
    assert vq_ablation.main([str(tmp_path / "missing")]) == 2
    assert vq_ablation.main([str(tmp_path), "--set", "crop_size=5"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "crop_size 5" in err
