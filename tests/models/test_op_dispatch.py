"""The model's fused-op path (what runs on GPU) equals its CPU fast path.

Runs the model in a subprocess with PGEN_FUSED_OPS=1 so attention, decode attention and
KV writes go through ``pgen_engine.ops`` (their torch backends here; the Triton kernels
behind them are compared with the same references in tests/ops).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from pgen_engine.models import op_dispatch as K

SCRIPT = r"""
import sys, torch
import pgen_engine as pg
from pgen_engine.models import op_dispatch
assert op_dispatch._FORCE_FUSED
m = pg.load_model(sys.argv[1])
torch.manual_seed(0)
ids = torch.randint(6, 250, (2, 9)); ids[:, -1] = 3
mask = torch.ones(2, 9, dtype=torch.long); mask[1, :4] = 0
codes = torch.randint(0, m.codebook_size, (2, m.num_image_tokens))
torch.save({"text": m.text_logits(ids, mask), "image": m.image_logits(ids, codes, mask), "mask": mask}, sys.argv[2])
"""


def test_fused_path_matches_cpu_path(tiny_ckpt, tiny_model, tmp_path):
    out = tmp_path / "fused.pt"
    env = dict(os.environ, PGEN_FUSED_OPS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_ckpt), str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    fused = torch.load(out)
    torch.manual_seed(0)
    ids = torch.randint(6, 250, (2, 9)); ids[:, -1] = 3
    mask = fused["mask"]
    codes = torch.randint(0, tiny_model.codebook_size, (2, tiny_model.num_image_tokens))
    text = tiny_model.text_logits(ids, mask)
    valid = mask.bool()
    assert (text - fused["text"])[valid].abs().max() <= 1e-4
    assert (tiny_model.image_logits(ids, codes, mask) - fused["image"]).abs().max() <= 1e-4


def test_kv_write_skips_padding_slots():
    kc = torch.zeros(3, 4, 2, 8)
    vc = torch.zeros(3, 4, 2, 8)
    k = torch.randn(5, 2, 8)
    v = torch.randn(5, 2, 8)
    slots = torch.tensor([0, -1, 5, -1, 11])
    K.kv_write(kc, vc, k, v, slots)
    flat = kc.view(-1, 2, 8)
    assert torch.equal(flat[0], k[0]) and torch.equal(flat[5], k[2]) and torch.equal(flat[11], k[4])
    assert flat[[1, 2, 3, 4, 6, 7, 8, 9, 10]].abs().sum() == 0


def test_cached_attention_matches_full_softmax():
    B, Hq, Hkv, D, L = 3, 4, 2, 8, 6
    q = torch.randn(B, Hq, D)
    kc, vc = torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
    lens = torch.tensor([6, 2, 4], dtype=torch.int32)
    out = K.cached_attention(q, kc, vc, lens, None, D ** -0.5)
    for b in range(B):
        n = int(lens[b])
        k = kc[b, :n].repeat_interleave(Hq // Hkv, 1)
        v = vc[b, :n].repeat_interleave(Hq // Hkv, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * D ** -0.5, -1)
        assert torch.allclose(out[b], torch.einsum("hn,nhd->hd", w, v), atol=1e-5)


def test_head_major_layout_matches_flash_layout():
    """layout='bhsd' (the CPU Generator's cache) writes and attends exactly like 'bshd', incl. GQA."""
    rows, L, Hq, Hkv, D = 3, 7, 6, 2, 8
    kc, vc = torch.zeros(rows, L, Hkv, D), torch.zeros(rows, L, Hkv, D)
    kh, vh = torch.zeros(rows, Hkv, L, D), torch.zeros(rows, Hkv, L, D)
    slots = torch.tensor([0, 1, 2, -1, 7, 8, 14, 15, 16, 17])
    k, v = torch.randn(len(slots), Hkv, D), torch.randn(len(slots), Hkv, D)
    K.kv_write(kc, vc, k, v, slots)
    K.kv_write(kh, vh, k, v, slots, layout="bhsd")
    assert torch.equal(kh.transpose(1, 2), kc) and torch.equal(vh.transpose(1, 2), vc)
    q = torch.randn(rows, Hq, D)
    lens = torch.tensor([3, 2, 4], dtype=torch.int32)
    a = K.cached_attention(q, kc, vc, lens, None, D ** -0.5)
    b = K.cached_attention(q, kh, vh, lens, None, D ** -0.5, layout="bhsd")
    assert (a - b).abs().max() <= 1e-6
    import pytest
    with pytest.raises(ValueError, match="block_table"):
        K.cached_attention(q, kh, vh, lens, torch.zeros(rows, 1, dtype=torch.int32), 1.0, layout="bhsd")
