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


def test_tokenizer_of_other_geometry_in_work_dir_is_kept_not_refit(tmp_path):
    # a second run with another tokenizer_image_size / patch_size in the same data.work_dir
    # used to refit and overwrite tokenizer.safetensors; the first run's `pgen eval` then
    # silently used the new codebook (same 4 tokens x 512 codes, so nothing failed)
    import numpy as np

    from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

    path = tmp_path / "tokenizer.safetensors"
    first = PatchKMeansTokenizer.fit(torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3),
                                                                                          dtype=np.uint8)),
                                     patch_size=16, codebook_size=512, iters=1, seed=0)
    first.save(path)
    before = path.read_bytes()
    same = load_config(CONFIGS / "demo_sft.yaml", [f"data.work_dir={tmp_path}", f"output_dir={tmp_path / 'r'}"])
    assert load_or_fit_tokenizer(same, dataset=None, fit=True).fingerprint() == first.fingerprint()
    other = load_config(CONFIGS / "demo_sft.yaml", [f"data.work_dir={tmp_path}", f"output_dir={tmp_path / 'r2'}",
                                                    "data.tokenizer_image_size=64", "data.patch_size=32"])
    with pytest.raises(DataPrepError, match=rf"{path}: holds a PatchKMeans tokenizer of image_size=32.*"
                                            r"data.tokenizer_image_size=64.*another data.work_dir"):
        load_or_fit_tokenizer(other, dataset=None, fit=True)
    assert path.read_bytes() == before


def _prepare_in_process(rank: int, out: str, root: str) -> None:
    # two runs (seeds) launched side by side with one shared dataset_dir and work_dir
    from pgen_engine.training.sft_data import _prepare_on_main  # late import: runs in the spawned process

    cfg = load_config(CONFIGS / "demo_sft.yaml", [f"data.dataset_dir={root}/synth", f"data.work_dir={root}/work",
                                                  f"output_dir={root}/run{rank}", f"seed={rank}",
                                                  "data.synth.users=40", "data.synth.items=24"])
    err, _ = _prepare_on_main(cfg)
    return ["returned" if err is None else "error", err or ""]


def test_runs_sharing_dataset_and_work_dir_prepare_them_once(tmp_path):
    # used to race: the second run found the first one's half-written synthetic dataset
    # ("folder exists but holds no interactions.csv") or fitted its own tokenizer and
    # replaced the first one's (different seed: other codes) after it had built its cache
    from tests.training.gloo_ranks import run_two_ranks  # late import: spawn helper of the rank tests

    res = run_two_ranks(_prepare_in_process, tmp_path, str(tmp_path), timeout_s=120)
    assert res == [("returned", ""), ("returned", "")], res
    caches = sorted(p.name for p in (tmp_path / "work").glob("token_cache_*"))
    assert len(caches) == 1 and (tmp_path / "work" / "tokenizer.safetensors").is_file()
    assert (tmp_path / "synth" / "interactions.csv").is_file()
