"""Tiny models sized to an image tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from pgen_engine.config import ModelInitConfig
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.training.init import (INIT_MARKER, code_init_weights, code_pixel_features, init_model_for_tokenizer,
                                       tokenizer_geometry)


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


def test_code_init_weights_follow_the_features():
    g = torch.Generator().manual_seed(3)
    base = torch.rand(6, 40, generator=g)
    feats = torch.cat([base, base[:2]])  # codes 6, 7 look exactly like codes 0, 1
    emb, head = code_init_weights(feats, embed_dim=4, hidden_size=10, std=0.05, seed=0)
    assert emb.shape == (8, 4) and head.shape == (8, 10)
    torch.testing.assert_close(emb[6:], emb[:2])
    torch.testing.assert_close(head[6:], head[:2])
    assert not torch.allclose(emb[0], emb[1])
    # whitened: every component has the init's spread
    torch.testing.assert_close(emb.pow(2).mean(0), torch.full((4,), 0.05 ** 2), rtol=1e-4, atol=0)
    # the head scores a code's look-alike as high as the code itself
    assert torch.equal(head.argmax(1)[[0, 6]], head.argmax(1)[[6, 0]])


def test_code_init_weights_fill_past_the_rank_and_refuse_nan():
    feats = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])  # rank 1 after centring
    emb, _ = code_init_weights(feats, embed_dim=3, hidden_size=5, std=0.1, seed=1)
    assert emb.shape == (3, 3) and torch.isfinite(emb).all()
    assert emb[:, 1:].abs().sum() > 0  # noise, not zeros, past the rank
    with pytest.raises(ValueError, match="finite"):
        code_init_weights(torch.full((3, 2), float("nan")), embed_dim=2, hidden_size=4, std=0.1, seed=0)


def test_code_pixel_features_decode_each_code(tok):
    f = code_pixel_features(tok, chunk=5)
    assert f.shape == (24, 32 * 32 * 3) and 0 <= f.min() and f.max() <= 1
    torch.testing.assert_close(f[7], tok.decode(torch.full((1, 4), 7)).reshape(-1).float() / 255)


def test_init_model_code_init_tokenizer(tmp_path, tok):
    import pgen_engine as pg

    rnd = pg.load_model(init_model_for_tokenizer(tmp_path / "r", tok, ModelInitConfig(init_std=0.05, vq_embed_dim=8)))
    cfg = ModelInitConfig(init_std=0.05, vq_embed_dim=8, code_init="tokenizer")
    m = pg.load_model(init_model_for_tokenizer(tmp_path / "t", tok, cfg))
    emb, head = code_init_weights(code_pixel_features(tok), 8, m.config.text.hidden_size, 0.05, 0)
    torch.testing.assert_close(m.generation_embeddings.weight.detach().float(), emb)
    torch.testing.assert_close(m.generation_head.vision_head.weight.detach().float(), head)
    # every other weight is the random init's
    a, b = dict(rnd.named_parameters()), dict(m.named_parameters())
    same = [k for k in a if "generation_embeddings" not in k and "vision_head.weight" not in k]
    assert same and all(torch.equal(a[k], b[k]) for k in same)
    assert json.loads((tmp_path / "t" / INIT_MARKER).read_text())["init"]["code_init"] == "tokenizer"


def test_code_init_value_is_checked():
    from pgen_engine.typed_config import ConfigError

    with pytest.raises(ConfigError, match="model.init.code_init"):
        ModelInitConfig(code_init="pca")


def test_code_init_with_a_janus_vq_tokenizer(tmp_path):
    """The same init for the learned tokenizer: codes' looks come from the VQ decoder, and the
    embedding width is the VQ codebook's (Janus sizes the generation embedding by it)."""
    import pgen_engine as pg
    from pgen_engine.models.vq_tokenizer import JanusVQTokenizer, build_vqvae, vq_config

    torch.manual_seed(0)
    cfg = vq_config(image_size=16, codes_per_side=4, codebook_size=12, embed_dim=4)
    tok = JanusVQTokenizer(build_vqvae(cfg), cfg)
    feats = code_pixel_features(tok, chunk=5)
    assert feats.shape == (12, 16 * 16 * 3)
    torch.testing.assert_close(feats[3], tok.decode(torch.full((1, 16), 3)).reshape(-1).float() / 255)
    m = pg.load_model(init_model_for_tokenizer(tmp_path / "vq", tok, ModelInitConfig(code_init="tokenizer")))
    emb, head = code_init_weights(feats, 4, m.config.text.hidden_size, 0.02, 0)  # transformers' std
    torch.testing.assert_close(m.generation_embeddings.weight.detach().float(), emb)
    torch.testing.assert_close(m.generation_head.vision_head.weight.detach().float(), head)
