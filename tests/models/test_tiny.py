from __future__ import annotations

import pytest

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
