from __future__ import annotations

import pytest
import torch

from pgen_engine.models.tiny import make_tiny_checkpoint, tiny_janus_config


def test_geometry_is_consistent():
    c = tiny_janus_config(image_size=64, patch_size=8)
    assert c.vision_config.num_image_tokens == 64 and c.vq_config.num_patches == 8


def test_rejects_bad_geometry():
    with pytest.raises(ValueError):
        tiny_janus_config(image_size=30, patch_size=8)
    with pytest.raises(ValueError):
        tiny_janus_config(vocab_size=100)


def test_seed_determinism(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_code_rows_replace_the_code_embedding_and_head_and_are_shape_checked(tmp_path):
    import pgen_engine as pg

    seen = []

    def rows(embed_dim, hidden, std):
        seen.append((embed_dim, hidden, std))
        return torch.full((24, embed_dim), 0.5), torch.full((24, hidden), -0.25)

    m = pg.load_model(make_tiny_checkpoint(tmp_path / "a", codebook_size=24, vq_embed_dim=8, code_rows=rows))
    assert seen == [(8, m.config.text.hidden_size, 0.02)]  # no init_std: the config's initializer_range
    assert bool((m.generation_embeddings.weight == 0.5).all())
    assert bool((m.generation_head.vision_head.weight == -0.25).all())
    make_tiny_checkpoint(tmp_path / "b", codebook_size=24, vq_embed_dim=8, init_std=0.07, code_rows=rows)
    assert seen[-1][2] == 0.07
    with pytest.raises(ValueError, match="code_rows gave"):
        make_tiny_checkpoint(tmp_path / "c", codebook_size=25, vq_embed_dim=8, code_rows=rows)
