"""Data preparation of a run (``training/sft_data.py``): the work_dir's tokenizer file."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file
import torch

from pgen_engine.config import load_config
from pgen_engine.eval.demo import CONFIGS
from pgen_engine.training.sft_data import DataPrepError, load_or_fit_tokenizer


@pytest.mark.parametrize("content", ["truncated", "other_safetensors"])
def test_damaged_patch_kmeans_file_names_it_and_says_how_to_refit(tmp_path, content):
    # used to be the loader's bare "unreadable safetensors file (...)" with no way forward
    cfg = load_config(CONFIGS / "demo_sft.yaml", [f"data.work_dir={tmp_path}", f"output_dir={tmp_path / 'run'}"])
    path = tmp_path / "tokenizer.safetensors"
    if content == "truncated":
        path.write_bytes(b"\x10\x00\x00")
    else:
        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(DataPrepError, match=rf"{path}: .*delete it to fit a new tokenizer"):
        load_or_fit_tokenizer(cfg, dataset=None, fit=True)
