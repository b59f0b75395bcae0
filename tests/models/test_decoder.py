"""Decoder pieces: positions from left-padded masks, cache allocation, rotary tables."""
from __future__ import annotations

import torch

from pgen_engine.models.decoder import KVCache, positions_from_mask


def test_positions_count_only_attended_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = positions_from_mask(mask)
    assert pos[0, 2:].tolist() == [0, 1, 2] and pos[1].tolist() == [0, 1, 2, 3, 4]
    assert (pos[0, :2] == 1).all()  # transformers' convention for padded slots


def test_cache_allocation_shapes(tiny_model):
    c = tiny_model.config.text
    cache = KVCache.allocate(c, num_blocks=5, block_size=4, dtype=torch.float32, device="cpu")
    assert len(cache.k) == len(cache.v) == c.num_layers
    assert cache.k[0].shape == (5, 4, c.num_kv_heads, c.head_dim)
    assert cache.nbytes() == 2 * c.num_layers * 5 * 4 * c.num_kv_heads * c.head_dim * 4
    assert (cache.num_blocks, cache.block_size) == (5, 4)


def test_rotary_matches_transformers(tiny_model, tiny_hf):
    pos = torch.arange(7)[None]
    cos, sin = tiny_model.language_model.rotary(pos, torch.float32)
    x = torch.zeros(1, 7, tiny_model.config.text.hidden_size)
    ref_cos, ref_sin = tiny_hf.model.language_model.rotary_emb(x, pos)
    assert torch.allclose(cos, ref_cos) and torch.allclose(sin, ref_sin)
