"""Tiny models sized to an image tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from pgen_engine.config import ModelInitConfig
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.training.init import INIT_MARKER, init_model_for_tokenizer, tokenizer_geometry


@pytest.fixture(scope="module")
def tok():
    imgs = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    return PatchKMeansTokenizer.fit(imgs, patch_size=16, codebook_size=24, iters=3, seed=0)


def test_geometry_follows_tokenizer(tok):
    assert tokenizer_geometry(tok) == {"image_size": 32, "patch_size": 16, "codebook_size": 24}


def test_init_model_matches_tokenizer_and_is_reused(tmp_path, tok):
    import pgen_engine as pg

    out = init_model_for_tokenizer(tmp_path / "m", tok, ModelInitConfig(init_std=0.05, vq_embed_dim=16))
    m = pg.load_model(out)
    assert (m.num_image_tokens, m.codebook_size, m.image_size) == (4, 24, 32)
    assert m.generation_embeddings.weight.shape[1] == 16
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    init_model_for_tokenizer(tmp_path / "m", tok, ModelInitConfig(init_std=0.05, vq_embed_dim=16))
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # same spec: reused
    assert json.loads((out / INIT_MARKER).read_text())["tokenizer"] == tok.fingerprint()
    init_model_for_tokenizer(tmp_path / "m", tok, ModelInitConfig(hidden_size=32, num_heads=2, num_kv_heads=1))
    assert pg.load_model(out).config.text.hidden_size == 32  # changed spec: rebuilt
