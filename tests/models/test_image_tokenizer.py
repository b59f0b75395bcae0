"""The checkpoint's VQ model behind the ImageTokenizer interface."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.models.image_tokenizer import VQImageTokenizer


def test_encode_matches_transformers_vq(tiny_model, tiny_hf):
    tok = VQImageTokenizer(tiny_model, batch_size=2)
    imgs = torch.randint(0, 256, (3, tiny_model.image_size, tiny_model.image_size, 3), dtype=torch.uint8)
    codes = tok.encode(imgs)
    assert codes.shape == (3, tok.num_tokens) and codes.dtype == torch.long
    pix = imgs.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = tiny_hf.model.vqmodel.encode(pix).image_tokens.view(3, -1)
    assert torch.equal(codes, ref)
    out = tok.decode(codes)
    assert out.shape == imgs.shape and out.dtype == torch.uint8


def test_fingerprint_changes_with_weights(tiny_ckpt):
    import pgen_engine as pg

    m1, m2 = pg.load_model(tiny_ckpt), pg.load_model(tiny_ckpt)
    assert VQImageTokenizer(m1).fingerprint() == VQImageTokenizer(m2).fingerprint()
    with torch.no_grad():
        m2.vqmodel.quantize.embedding.weight[0, 0] += 1
    assert VQImageTokenizer(m1).fingerprint() != VQImageTokenizer(m2).fingerprint()


def test_bad_inputs(tiny_model):
    tok = VQImageTokenizer(tiny_model)
    with pytest.raises(TypeError):
        tok.encode(torch.zeros(1, tiny_model.image_size, tiny_model.image_size, 3))
    with pytest.raises(ValueError):
        tok.encode(torch.zeros(1, 7, 7, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        tok.decode(torch.zeros(1, 3, dtype=torch.long))


def test_decode_runs_in_chunks_and_matches_one_pass(tiny_model, monkeypatch):
    """decode splits N codes into batch_size chunks (one pass over thousands of codes held
    ~10 GB of decoder activations in the MovieLens demo) and gives the one-pass pixels."""
    tok = VQImageTokenizer(tiny_model, batch_size=3)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, tok.codebook_size, (7, tok.num_tokens), generator=g)
    whole = tiny_model.decode_images(codes).cpu()
    sizes = []
    real = tiny_model.decode_images

    def spy(c):
        sizes.append(int(c.shape[0]))
        return real(c)

    monkeypatch.setattr(tiny_model, "decode_images", spy)
    got = tok.decode(codes)
    assert sizes == [3, 3, 1]
    assert got.shape == whole.shape and got.dtype == torch.uint8
    assert (got.int() - whole.int()).abs().max() <= 1  # per-image results; batch size may move a rounding
