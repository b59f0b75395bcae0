"""Trainer entry checks that need no data or engine."""
from __future__ import annotations

from pathlib import Path

import pytest

from pgen_engine.config import ConfigError, load_config
from pgen_engine.training.stages import run_stage

REPO = Path(__file__).resolve().parents[2]


def test_output_dir_that_is_a_file_is_a_config_error_before_any_work(tmp_path):
    # used to fail with a FileExistsError traceback from mkdir
    f = tmp_path / "run.txt"
    f.write_text("keep me")
    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"output_dir={f}",
                                                           f"data.dataset_dir={tmp_path / 'no_data'}"])
    with pytest.raises(ConfigError, match=r"output_dir=.*run\.txt: exists and is not a folder"):
        run_stage(cfg)
    assert f.read_text() == "keep me" and not (tmp_path / "no_data").exists()
