"""The C++ float32 CPU layer stack of the C++ decode backend (``generation.layers_cpu``: the
decode step ``_C.decode_layers_cpu`` / ``_C.cached_attention_cpu`` and the prompt pass
``_C.prefill_layers_cpu``) against the eager torch layers of the model, including shared prompt
prefixes, left padding and bad inputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator, layers_cpu
from pgen_engine.generation.backends import make_backend
from pgen_engine.models import op_dispatch as K
from pgen_engine.models.decoder import KVCache, positions_from_mask
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.ops._backend import extension

_C = extension()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "decode_layers_cpu"),
                                reason="pgen_engine._C not built")


def _torch_attention(q, kc, vc, lens, scale, prow=None, plen=None, pk=None, pv=None):
    """Independent oracle: per row, gather its keys (pool prefix + own positions) and softmax."""
    B, Hq, D = q.shape
    Hkv = kc.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        p = 0 if prow is None else min(int(plen[b]), n)
        kpre = kc[b, :, :0] if prow is None else pk[int(prow[b]), :, :p]
        vpre = vc[b, :, :0] if prow is None else pv[int(prow[b]), :, :p]
        k = torch.cat([kpre, kc[b, :, :n - p]], dim=1).repeat_interleave(Hq // Hkv, 0)  # [Hq, n, D]
        v = torch.cat([vpre, vc[b, :, :n - p]], dim=1).repeat_interleave(Hq // Hkv, 0)
        w = torch.softmax(torch.einsum("hd,hnd->hn", q[b].double(), k.double()) * scale, -1)
        out[b] = torch.einsum("hn,hnd->hd", w, v.double()).float()
    return out


@pytest.mark.parametrize("D", [8, 40, 64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
def test_cpp_attention_matches_oracle(D, heads):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(D * 7 + Hq)
    rows, L = 7, 37
    kc, vc = torch.randn(rows, Hkv, L, D, generator=g), torch.randn(rows, Hkv, L, D, generator=g)
    q = torch.randn(5, Hq, D, generator=g) * 2
    lens = torch.tensor([37, 1, 0, 20, 33], dtype=torch.int32)
    out = _C.cached_attention_cpu(q, kc, vc, lens, None, None, None, None, D ** -0.5)
    assert (out - _torch_attention(q, kc, vc, lens, D ** -0.5)).abs().max() <= 2e-5
    assert out[2].abs().max() == 0  # an empty row attends to nothing


@pytest.mark.parametrize("D", [16, 64])
def test_shared_prefix_reads_the_pool_row(D):
    """Rows read their first positions from a prefix-pool row, the rest from index 0 of their own row."""
    g = torch.Generator().manual_seed(D)
    rows, Hq, Hkv, L, P, Lp = 6, 4, 2, 12, 2, 14
    kc, vc = torch.randn(rows, Hkv, L, D, generator=g), torch.randn(rows, Hkv, L, D, generator=g)
    pk, pv = torch.randn(P, Hkv, Lp, D, generator=g), torch.randn(P, Hkv, Lp, D, generator=g)
    q = torch.randn(rows, Hq, D, generator=g)
    lens = torch.tensor([12, 15, 14, 20, 9, 24], dtype=torch.int32)
    prow = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.int32)
    plen = torch.tensor([0, 10, 10, 13, 13, 14], dtype=torch.int32)
    ref = _torch_attention(q, kc, vc, lens, D ** -0.5, prow, plen, pk, pv)
    cpp = _C.cached_attention_cpu(q, kc, vc, lens, pk, pv, prow, plen, D ** -0.5)
    eager = K._cached_attention_head_major(q, kc, vc, lens, D ** -0.5, prow, plen, pk, pv)
    assert (cpp - ref).abs().max() <= 2e-5
    assert (eager - ref).abs().max() <= 2e-5
    # the same answer as physically copying each row's prefix in front of its own positions
    kfull, vfull = torch.zeros(rows, Hkv, Lp + L, D), torch.zeros(rows, Hkv, Lp + L, D)
    for b in range(rows):
        p = int(plen[b])
        kfull[b, :, :p], vfull[b, :, :p] = pk[int(prow[b]), :, :p], pv[int(prow[b]), :, :p]
        kfull[b, :, p:p + L], vfull[b, :, p:p + L] = kc[b], vc[b]
    plain = _C.cached_attention_cpu(q, kfull, vfull, lens, None, None, None, None, D ** -0.5)
    assert (plain - cpp).abs().max() <= 1e-6
    with pytest.raises(RuntimeError, match="outside the prefix pool"):
        _C.cached_attention_cpu(q, kc, vc, lens, pk, pv, prow + 1, plen, D ** -0.5)


@pytest.mark.parametrize("D", [16, 64, 128])
def test_rows_sharing_a_prefix_attend_as_one_group_with_per_row_values(D):
    """Rows with the same prefix (pool row and length) are attended together, the prefix read
    block by block for all of them; each row's output is bitwise what it gets attending alone."""
    g = torch.Generator().manual_seed(D + 1)
    rows, Hq, Hkv, L, P, Lp = 7, 4, 2, 9, 2, 70
    kc, vc = torch.randn(rows, Hkv, L, D, generator=g), torch.randn(rows, Hkv, L, D, generator=g)
    pk, pv = torch.randn(P, Hkv, Lp, D, generator=g), torch.randn(P, Hkv, Lp, D, generator=g)
    q = torch.randn(rows, Hq, D, generator=g)
    # rows 0, 2, 3, 5 share pool row 1's 67 keys (> 2 blocks); row 6 too but its seqlen stops
    # inside the prefix; rows 1 and 4 share pool row 0's 5 keys
    prow = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.int32)
    plen = torch.tensor([67, 5, 67, 67, 5, 67, 67], dtype=torch.int32)
    lens = torch.tensor([70, 9, 68, 76, 14, 67, 40], dtype=torch.int32)
    out = _C.cached_attention_cpu(q, kc, vc, lens, pk, pv, prow, plen, D ** -0.5)
    for b in range(rows):
        alone = _C.cached_attention_cpu(q[b:b + 1], kc[b:b + 1], vc[b:b + 1], lens[b:b + 1], pk, pv, prow[b:b + 1],
                                        plen[b:b + 1], D ** -0.5)
        assert torch.equal(out[b], alone[0]), b
    ref = _torch_attention(q, kc, vc, lens, D ** -0.5, prow, plen, pk, pv)
    assert (out - ref).abs().max() <= 2e-5


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """GQA checkpoint with head_dim 64 (the unrolled kernel path)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("cpu_decode") / "d64", seed=3, hidden_size=256,
                                num_heads=4, num_kv_heads=2, intermediate_size=160, image_size=32, patch_size=8)
    return pg.load_model(path)


@pytest.mark.parametrize("which", ["tiny", "d64"])
def test_decode_step_in_cpp_equals_eager_layers(which, tiny_model, model64, monkeypatch):
    m = tiny_model if which == "tiny" else model64
    cfg = m.config.text
    rows, L = 5, 30
    g = torch.Generator().manual_seed(11)
    shape = (rows, cfg.num_kv_heads, L, cfg.head_dim)
    k0 = [torch.randn(shape, generator=g) for _ in range(cfg.num_layers)]
    v0 = [torch.randn(shape, generator=g) for _ in range(cfg.num_layers)]
    pshape = (2, cfg.num_kv_heads, 16, cfg.head_dim)
    pk0 = [torch.randn(pshape, generator=g) for _ in range(cfg.num_layers)]
    pv0 = [torch.randn(pshape, generator=g) for _ in range(cfg.num_layers)]
    prow = torch.tensor([0, 0, 1, 0, 1], dtype=torch.int32)
    plen = torch.tensor([0, 11, 0, 11, 0], dtype=torch.int32)
    pos = torch.tensor([17, 12, 29, 20, 0])
    lens = (pos + 1).to(torch.int32)
    h = torch.randn(rows, cfg.hidden_size, generator=g)

    def run(cpp: bool, shared: bool):
        monkeypatch.setattr(layers_cpu, "_CPU_DECODE", cpp)
        cache = KVCache(k=[t.clone() for t in k0], v=[t.clone() for t in v0], layout="bhsd")
        # own positions start at index 0 past a shared prefix
        slots = torch.arange(rows) * L + pos - (plen.long() if shared else 0)
        if shared:
            cache = dataclasses.replace(cache, prefix_row=prow, prefix_len=plen, prefix_k=pk0, prefix_v=pv0)
        # inference mode and plain no_grad (the C++ step's worker threads set their own mode)
        with torch.inference_mode() if shared else torch.no_grad():
            assert layers_cpu.cpu_decode_applies(m.language_model, h, cache) == cpp
            backend = make_backend(m, torch.float32)
            assert backend.name == ("cpp" if cpp else "eager")
            return backend.step(h, pos, cache, slots, lens), cache

    for shared in (False, True):
        a, ca = run(True, shared)
        b, cb = run(False, shared)
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
        for x, y in zip(ca.k + ca.v, cb.k + cb.v):
            assert (x - y).abs().max() <= 1e-5  # same K/V written at the same slots, nothing else touched
        assert not torch.equal(ca.k[0], k0[0])


@pytest.mark.parametrize("which", ["tiny", "d64"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("S", [9, 200])  # 3 x 200 tokens: the packed GEMM and attention (>= 512 rows)
def test_prefill_in_cpp_equals_eager_layers(which, padded, S, tiny_model, model64, monkeypatch):
    """Left-padded prompts (padding not stored: slot -1) into a head-major cache."""
    m = tiny_model if which == "tiny" else model64
    cfg = m.config.text
    B, rows, L = 3, 4, S + 7
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(B, S, cfg.hidden_size, generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
        mask[2, :1] = 0
    slots = torch.tensor([1, 3, 0])[:, None] * L + (mask.cumsum(1) - 1)  # rows 1, 3, 0 of the cache
    slots[mask == 0] = -1
    shape = (rows, cfg.num_kv_heads, L, cfg.head_dim)
    k0 = [torch.randn(shape, generator=g) for _ in range(cfg.num_layers)]
    v0 = [torch.randn(shape, generator=g) for _ in range(cfg.num_layers)]

    def run(cpp: bool):
        monkeypatch.setattr(layers_cpu, "_CPU_DECODE", cpp)
        cache = KVCache(k=[t.clone() for t in k0], v=[t.clone() for t in v0], layout="bhsd")
        with torch.inference_mode():
            assert layers_cpu.cpu_prefill_applies(m.language_model, emb, cache) == cpp
            return make_backend(m, torch.float32).prefill(emb, mask if padded else None, cache, slots), cache

    a, ca = run(True)
    b, cb = run(False)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    for x, y, x0 in zip(ca.k + ca.v, cb.k + cb.v, k0 + v0):
        assert (x - y).abs().max() <= 1e-4  # same K/V at the same slots
        assert torch.equal(x[2], x0[2])  # a row no prompt owns is untouched
        if padded:
            assert torch.equal(x[3, :, S - 4:], x0[3, :, S - 4:])  # prompt 1 has S-4 real tokens: the rest untouched


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("S", [9, 200])  # 200: the packed kernels run and the last layer is trimmed
def test_prefill_last_only_equals_the_full_pass(padded, S, model64):
    """last_only returns exactly the full pass's last hidden states and writes the same K/V."""
    m = model64
    cfg = m.config.text
    B, L = 3, S + 2
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(B, S, cfg.hidden_size, generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask[0, :3] = 0
    slots = torch.arange(B)[:, None] * L + (mask.cumsum(1) - 1)
    slots[mask == 0] = -1
    shape = (B, cfg.num_kv_heads, L, cfg.head_dim)

    def run(last_only: bool):
        cache = KVCache(k=[torch.zeros(shape) for _ in range(cfg.num_layers)],
                        v=[torch.zeros(shape) for _ in range(cfg.num_layers)], layout="bhsd")
        with torch.inference_mode():
            h = layers_cpu.prefill(m.language_model, emb, mask if padded else None, cache, slots, last_only=last_only)
        return h, cache

    full, cf = run(False)
    last, cl = run(True)
    assert last.shape == (B, 1, cfg.hidden_size)
    assert torch.equal(last[:, 0], full[:, -1])
    for x, y in zip(cf.k + cf.v, cl.k + cl.v):
        assert torch.equal(x, y)
    with torch.inference_mode():
        backend_last = make_backend(m, torch.float32).prefill_last(emb, mask if padded else None, run(False)[1], slots)
    assert torch.equal(backend_last, full[:, -1])


@pytest.mark.parametrize("last_only", [False, True])
def test_prefill_prompt_groups_per_thread_give_the_one_pass_values(last_only, model64):
    """With >= 2 threads the packed prefill runs one group of prompts per thread through every
    layer (no per-op barriers); hidden states and cache are bitwise those of one thread."""
    m = model64
    cfg = m.config.text
    B, S = 5, 130  # 650 rows: the packed kernels
    L = S + 1
    g = torch.Generator().manual_seed(9)
    emb = torch.randn(B, S, cfg.hidden_size, generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[3, :7] = 0
    slots = torch.arange(B)[:, None] * L + (mask.cumsum(1) - 1)
    slots[mask == 0] = -1
    shape = (B, cfg.num_kv_heads, L, cfg.head_dim)

    def run(threads: int):
        cache = KVCache(k=[torch.zeros(shape) for _ in range(cfg.num_layers)],
                        v=[torch.zeros(shape) for _ in range(cfg.num_layers)], layout="bhsd")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                h = layers_cpu.prefill(m.language_model, emb, mask, cache, slots, last_only=last_only)
        finally:
            torch.set_num_threads(before)
        return h, cache

    (h1, c1), (h2, c2) = run(1), run(2)
    assert torch.equal(h1, h2)
    for x, y in zip(c1.k + c1.v, c2.k + c2.v):
        assert torch.equal(x, y)

    # each thread's prompts in chunks of <= chunk_rows rows (whole prompts): the same bits
    pos = positions_from_mask(mask)
    cos, sin = m.language_model.rotary(pos, emb.dtype)
    for chunk_rows in (0, 1, 260, 10_000):
        cache = KVCache(k=[torch.zeros(shape) for _ in range(cfg.num_layers)],
                        v=[torch.zeros(shape) for _ in range(cfg.num_layers)], layout="bhsd")
        with torch.inference_mode():
            h = layers_cpu.prefill_layers_cpu(m.language_model, emb, cos, sin, mask.bool(), cache, slots,
                                              last_only=last_only, chunk_rows=chunk_rows)
        assert torch.equal(h, h2), chunk_rows
        for x, y in zip(c2.k + c2.v, cache.k + cache.v):
            assert torch.equal(x, y), chunk_rows


def test_prefill_layers_cpu_rejects_bad_inputs(tiny_model):
    lm = tiny_model.language_model
    cfg = lm.cfg
    cache = KVCache(k=[torch.zeros(2, cfg.num_kv_heads, 8, cfg.head_dim) for _ in range(cfg.num_layers)],
                    v=[torch.zeros(2, cfg.num_kv_heads, 8, cfg.head_dim) for _ in range(cfg.num_layers)],
                    layout="bhsd")
    h = torch.randn(1, 4, cfg.hidden_size)
    cos, sin = lm.rotary(torch.arange(4)[None], torch.float32)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"slot_mapping\[0, 3\] = 16 is outside the cache"):
            layers_cpu.prefill_layers_cpu(lm, h, cos, sin, None, cache, torch.tensor([[0, 1, 2, 16]]))
        with pytest.raises(RuntimeError, match=r"cos/sin must be contiguous float32 \[1, 4, "):
            layers_cpu.prefill_layers_cpu(lm, h, cos[:, :3], sin[:, :3], None, cache, torch.tensor([[0, 1, 2, 3]]))
        with pytest.raises(RuntimeError, match="hidden width"):
            layers_cpu.prefill_layers_cpu(lm, h[..., :-1], cos, sin, None, cache, torch.tensor([[0, 1, 2, 3]]))
        with pytest.raises(ValueError, match="key_mask must be left padding"):
            layers_cpu.prefill_layers_cpu(lm, h, cos, sin, torch.tensor([[True, False, True, True]]), cache,
                                 torch.tensor([[0, -1, 2, 3]]))


def test_decode_layers_cpu_rejects_bad_inputs(tiny_model):
    lm = tiny_model.language_model
    cfg = lm.cfg
    rows, L = 2, 8
    cache = KVCache(k=[torch.zeros(rows, cfg.num_kv_heads, L, cfg.head_dim) for _ in range(cfg.num_layers)],
                    v=[torch.zeros(rows, cfg.num_kv_heads, L, cfg.head_dim) for _ in range(cfg.num_layers)],
                    layout="bhsd")
    h = torch.randn(rows, cfg.hidden_size)
    pos = torch.tensor([1, 2])
    cos, sin = lm.rotary(pos, torch.float32)
    lens = torch.tensor([2, 3], dtype=torch.int32)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 16 is outside the cache"):
            layers_cpu.decode_layers_cpu(lm, h, cos, sin, cache, torch.tensor([1, 16]), lens)
        with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] = 9"):
            layers_cpu.decode_layers_cpu(lm, h, cos, sin, cache, torch.tensor([1, 10]), torch.tensor([9, 3], dtype=torch.int32))
        bad = dataclasses.replace(cache, v=[t.double() for t in cache.v])
        with pytest.raises(RuntimeError, match="layer 0 V cache must be a float32 CPU tensor"):
            layers_cpu.decode_layers_cpu(lm, h, cos, sin, bad, torch.tensor([1, 10]), lens)
        with pytest.raises(RuntimeError, match="hidden has shape"):
            layers_cpu.decode_layers_cpu(lm, h[:, :-1], cos, sin, cache, torch.tensor([1, 10]), lens)
    with pytest.raises(ValueError, match="prefix_row, prefix_len, prefix_k and prefix_v go together"):
        dataclasses.replace(cache, prefix_row=torch.zeros(rows, dtype=torch.int32))


def test_generator_tokens_do_not_depend_on_the_decode_path(model64, monkeypatch):
    """Greedy CFG generation with shared prompt prefixes: C++ step == eager step, token for token."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(6, 250, (3, 14), generator=g)
    sp = pg.SpecialTokens.builtin()
    ids[:, 0], ids[:, -1] = sp.bos, sp.boi
    outs = []
    for cpp in (True, False):
        monkeypatch.setattr(layers_cpu, "_CPU_DECODE", cpp)
        gen = Generator(m := model64, max_batch_size=8)
        assert gen.backend == ("cpp" if cpp else "eager")
        with torch.inference_mode():
            outs.append(gen.generate(ids, num_samples=2, guidance_scale=3.0, greedy=True))
        assert outs[-1].shape == (6, m.num_image_tokens)
    assert torch.equal(outs[0], outs[1])
