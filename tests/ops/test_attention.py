"""Attention ops: Triton kernels (CPU interpreter) vs the torch references, dispatch, errors.

Tolerance rule: kernel error vs an fp64 reference <= 2x the error of the
reference computed in the kernel's dtype, plus a tiny floor; NaN never passes.
"""
from __future__ import annotations

import importlib
import os
import sys

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # GPU runs test the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops import _backend  # noqa: E402

if hasattr(_backend.triton_available, "cache_clear"):  # older _backend cached the answer
    _backend.triton_available.cache_clear()
# Kernels jitted before the env var was set: reload the kernel modules (helpers first, the
# package last, so every module re-binds the reloaded objects).
for _name in sorted((m for m in sys.modules if m.startswith("pgen_engine.ops._triton_attention.")),
                    key=lambda m: m != "pgen_engine.ops._triton_attention.common"):
    importlib.reload(sys.modules[_name])
if "pgen_engine.ops._triton_attention" in sys.modules:
    importlib.reload(sys.modules["pgen_engine.ops._triton_attention"])

from pgen_engine.ops import _triton_attention as T  # noqa: E402
from pgen_engine.ops import attention as A  # noqa: E402
from pgen_engine.ops._triton_attention import common as TC  # noqa: E402
from pgen_engine.ops.attention import decode as A_decode  # noqa: E402
from pgen_engine.ops.attention import kv_write as A_kv_write  # noqa: E402
from pgen_engine.ops.attention import prefill as A_prefill  # noqa: E402
from pgen_engine.ops.attention import reference as A_ref  # noqa: E402
from tests.ops._device import CPU, DEV  # noqa: E402

# Absolute floor, relative to the largest reference magnitude. For fp32 a tiny 1e-6. For
# 16-bit outputs half an ulp of the largest value: the error of merely rounding an exact
# result to the output dtype, which no kernel can beat (flash-attn's tests add the same
# kind of rounding-based atol to the 2x rule for gradients).
_FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer a launcher allocates starts as NaN, so unwritten elements fail the test."""
    monkeypatch.setattr(TC, "POISON_OUTPUTS", True)


def assert_within_rule(out: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, what: str = "") -> None:
    """out (kernel, low precision) vs ref64 (fp64 reference) vs ref_low (reference in out's dtype)."""
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in kernel output"
    assert not torch.isnan(ref64).any(), f"{what}: NaN in reference"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_low.double() - ref64).abs().max().item() if out.numel() else 0.0
    floor = _FLOOR[out.dtype] * max(1.0, ref64.abs().max().item() if out.numel() else 1.0)
    assert err <= 2 * ref_err + floor, f"{what}: err {err:.3e} > 2 * ref_err {ref_err:.3e} + {floor:.1e}"


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _to(dev, kw: dict) -> dict:
    """``kw`` with every tensor moved to ``dev`` (ints, bools and None unchanged)."""
    return {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


def _gen():
    # Fresh inputs on every run; the seed lands in the captured stdout shown on failure.
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def _left_padding_mask(lengths: list[int], seq: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n:
            mask[b, seq - n :] = True
    return mask


# ---------------------------------------------------------------------------------------
# span_limits: the monotone per-token limits equal the naive span mask
# ---------------------------------------------------------------------------------------
def test_span_limits_match_naive_mask():
    gen = _gen()
    lens = [23, 1, 40, 0, 17]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    spans = torch.full((len(lens), 3, 2), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(torch.randint(0, 4, (1,), generator=gen).item()):
            if n >= 2:
                s = torch.randint(0, n - 1, (1,), generator=gen).item()
                e = torch.randint(s + 1, n + 1, (1,), generator=gen).item()
                spans[b, j] = torch.tensor([s, e])  # may overlap each other
    q_hi, k_lo = A.span_limits(cu, sum(lens), spans)
    for b, n in enumerate(lens):
        lo = cu[b].item()
        allowed = A_ref._allowed_mask(1, n, True, spans[b : b + 1], None, torch.device("cpu"))[0]
        pos = torch.arange(n)
        assert torch.equal(allowed, pos[None, :] < q_hi[lo : lo + n, None].long())
        assert torch.equal(allowed, pos[:, None] >= k_lo[None, lo : lo + n].long())


# ---------------------------------------------------------------------------------------
# prefill forward
# ---------------------------------------------------------------------------------------
PREFILL_CASES = [
    # (layout, dtype, lens_or_(B,S), Hq, Hkv, D, causal, spans, padding)
    ("padded", torch.float32, (2, 113), 9, 3, 40, True, True, True),
    ("padded", torch.bfloat16, (1, 203), 9, 1, 80, True, False, False),
    ("varlen", torch.float16, [217, 5, 0, 64], 9, 3, 128, True, True, False),
    ("varlen", torch.bfloat16, [31, 70], 4, 4, 96, False, False, False),
    ("padded", torch.float32, (3, 37), 2, 1, 32, False, False, True),
]


def _make_spans(gen, n_seq: int, lens: list[int], max_spans: int = 2) -> torch.Tensor:
    spans = torch.full((n_seq, max_spans, 2), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        cursor = 0
        for j in range(max_spans):
            if n - cursor < 4:
                break
            s = cursor + torch.randint(0, (n - cursor) // 2, (1,), generator=gen).item()
            e = torch.randint(s + 1, n + 1, (1,), generator=gen).item()
            spans[b, j] = torch.tensor([s, e])
            cursor = e
    return spans


def _prefill_inputs(case, gen, requires_grad=False):
    layout, dtype, size, hq, hkv, d, causal, use_spans, padding = case
    kw: dict = {"causal": causal}
    if layout == "padded":
        n_seq, seq = size
        q = _rand(n_seq, seq, hq, d, dtype=dtype, gen=gen)
        k = _rand(n_seq, seq, hkv, d, dtype=dtype, gen=gen)
        v = _rand(n_seq, seq, hkv, d, dtype=dtype, gen=gen)
        lens = [seq] * n_seq
        if padding:
            real = [seq - 7 * b for b in range(n_seq)]
            kw["key_padding_mask"] = _left_padding_mask(real, seq)
    else:
        lens = list(size)
        total = sum(lens)
        q = _rand(total, hq, d, dtype=dtype, gen=gen)
        k = _rand(total, hkv, d, dtype=dtype, gen=gen)
        v = _rand(total, hkv, d, dtype=dtype, gen=gen)
        kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        kw["max_seqlen"] = max(lens)
    if use_spans:
        kw["bidirectional_spans"] = _make_spans(gen, len(lens), lens)
    return q, k, v, kw


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-D{c[5]}-{c[3]}:{c[4]}")
def test_prefill_forward_matches_reference(case):
    gen = _gen()
    q, k, v, kw = _prefill_inputs(case, gen)
    out = A.prefill_attention(q.to(DEV), k.to(DEV), v.to(DEV), backend="triton", **_to(DEV, kw)).cpu()
    ref64 = A.prefill_attention_ref(q.double(), k.double(), v.double(), **kw)
    ref_low = A.prefill_attention_ref(q, k, v, **kw)
    assert out.dtype == q.dtype
    assert_within_rule(out, ref64, ref_low, "prefill fwd")


def test_prefill_fully_masked_rows_are_zero_not_nan():
    gen = _gen()
    q = _rand(2, 19, 3, 32, dtype=torch.float32, gen=gen)
    k = _rand(2, 19, 3, 32, dtype=torch.float32, gen=gen)
    v = _rand(2, 19, 3, 32, dtype=torch.float32, gen=gen)
    kpm = _left_padding_mask([11, 0], 19)  # row 1 is padding only
    out = A.prefill_attention(q.to(DEV), k.to(DEV), v.to(DEV), key_padding_mask=kpm.to(DEV),
                              backend="triton").cpu()
    assert not torch.isnan(out).any()
    assert torch.all(out[1] == 0)
    assert torch.all(out[0, :8] == 0)  # causal left padding: queries before the first real key
    assert out[0, 8:].abs().sum() > 0
    ref = A.prefill_attention_ref(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefill_default_scale_and_explicit_scale():
    gen = _gen()
    q, k, v = (_rand(1, 33, 2, 48, dtype=torch.float32, gen=gen) for _ in range(3))
    a = A.prefill_attention(q.to(DEV), k.to(DEV), v.to(DEV), backend="triton", scale=0.3).cpu()
    b = A.prefill_attention_ref(q, k, v, scale=0.3)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(a, A.prefill_attention_ref(q, k, v), atol=1e-3)


# ---------------------------------------------------------------------------------------
# prefill backward
# ---------------------------------------------------------------------------------------
BACKWARD_CASES = [
    ("padded", torch.float32, (2, 45), 9, 3, 40, True, True, True),
    ("varlen", torch.bfloat16, [70, 13], 9, 3, 80, True, True, False),
    ("varlen", torch.float32, [29, 0, 36], 9, 1, 128, False, False, False),
    ("padded", torch.float16, (1, 50), 4, 2, 64, True, False, False),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-D{c[5]}-{c[3]}:{c[4]}")
def test_prefill_backward_matches_reference_autograd(case):
    gen = _gen()
    q, k, v, kw = _prefill_inputs(case, gen)
    dout = _rand(*q.shape, dtype=q.dtype, gen=gen)

    def grads(fn, tensors, dev=CPU, **extra):
        leaves = [t.detach().to(dev).clone().requires_grad_(True) for t in tensors]
        out = fn(*leaves, **_to(dev, kw), **extra)
        out.backward(dout.to(device=dev, dtype=out.dtype))
        return out.cpu(), [t.grad.cpu() for t in leaves]

    out, g_kernel = grads(A.prefill_attention, (q, k, v), dev=DEV, backend="triton")
    _, g64 = grads(A.prefill_attention_ref, (q.double(), k.double(), v.double()))
    _, g_low = grads(A.prefill_attention_ref, (q, k, v))
    for name, a, b, c in zip(("dq", "dk", "dv"), g_kernel, g64, g_low):
        assert a.dtype == q.dtype
        assert_within_rule(a, b, c, f"prefill bwd {name}")


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------
def _paged_cache(gen, dtype, n_blocks, block_size, hkv, d, batch, blocks_per_row):
    k_cache = _rand(n_blocks, block_size, hkv, d, dtype=dtype, gen=gen)
    v_cache = _rand(n_blocks, block_size, hkv, d, dtype=dtype, gen=gen)
    perm = torch.randperm(n_blocks, generator=gen).to(torch.int32)
    table = perm[: batch * blocks_per_row].view(batch, blocks_per_row).clone()
    return k_cache, v_cache, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_paged_matches_reference(dtype):
    gen = _gen()
    batch, hq, hkv, d, bs, bpr = 5, 9, 3, 80, 16, 6
    k_cache, v_cache, table = _paged_cache(gen, dtype, 40, bs, hkv, d, batch, bpr)
    table[1] = table[0]  # CFG pair: rows share every block
    table[3, :2] = table[2, :2]  # samples of one prompt: shared prefix blocks
    seqlens = torch.tensor([95, 95, 0, 33, 17], dtype=torch.int32)
    # Poison every cache slot no row reads: a kernel that reads past a row's length gets NaN.
    used = torch.zeros(k_cache.shape[0] * bs, dtype=torch.bool)
    for b in range(batch):
        t = torch.arange(seqlens[b].item())
        used[table[b, t // bs].long() * bs + t % bs] = True
    k_cache.view(-1, hkv, d)[~used] = float("nan")
    v_cache.view(-1, hkv, d)[~used] = float("nan")
    q = _rand(batch, hq, d, dtype=dtype, gen=gen)
    ref64 = A.decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), seqlens, block_table=table)
    ref_low = A.decode_attention_ref(q, k_cache, v_cache, seqlens, block_table=table)
    out = A.decode_attention(q.to(DEV), k_cache.to(DEV), v_cache.to(DEV), seqlens.to(DEV),
                             block_table=table.to(DEV), backend="triton").cpu()
    assert_within_rule(out, ref64, ref_low, "decode paged")
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_decode_contiguous_split_k(num_splits):
    gen = _gen()
    batch, smax, hq, hkv, d = 3, 113, 9, 1, 128
    k_cache = _rand(batch, smax, hkv, d, dtype=torch.float32, gen=gen)
    v_cache = _rand(batch, smax, hkv, d, dtype=torch.float32, gen=gen)
    seqlens = torch.tensor([113, 1, 64], dtype=torch.int32)
    q = _rand(batch, hq, d, dtype=torch.float32, gen=gen)
    table = torch.arange(batch, dtype=torch.int32)[:, None]
    qd, kd, vd, sd = (t.to(DEV) for t in (q, k_cache, v_cache, seqlens))
    out = T.decode(qd, kd, vd, sd, table.to(DEV), d**-0.5, num_splits=num_splits).cpu()
    ref64 = A.decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), seqlens)
    ref_low = A.decode_attention_ref(q, k_cache, v_cache, seqlens)
    assert_within_rule(out, ref64, ref_low, f"decode splits={num_splits}")
    public = A.decode_attention(qd, kd, vd, sd, backend="triton").cpu()
    assert_within_rule(public, ref64, ref_low, "decode public")


def test_decode_single_token_equals_value():
    gen = _gen()
    k_cache, v_cache, table = _paged_cache(gen, torch.float32, 6, 8, 2, 40, 2, 3)
    q = _rand(2, 4, 40, dtype=torch.float32, gen=gen)
    seqlens = torch.tensor([1, 1], dtype=torch.int32)
    out = A.decode_attention(q.to(DEV), k_cache.to(DEV), v_cache.to(DEV), seqlens.to(DEV),
                             block_table=table.to(DEV), backend="triton").cpu()
    expect = v_cache[table[:, 0].long(), 0].repeat_interleave(2, dim=1)  # softmax over one key = 1
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# paged KV write
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_paged_matches_reference(dtype):
    gen = _gen()
    n_blocks, bs, hkv, d = 7, 5, 3, 40
    k_cache = _rand(n_blocks, bs, hkv, d, dtype=dtype, gen=gen)
    v_cache = _rand(n_blocks, bs, hkv, d, dtype=dtype, gen=gen)
    n = 13
    slots = torch.randperm(n_blocks * bs, generator=gen)[:n].to(torch.int64)
    slots[3] = -1
    slots[8] = n_blocks * bs + 2  # out of range: dropped
    k_new = _rand(n, hkv, d, dtype=dtype, gen=gen)
    v_new = _rand(n, hkv, d, dtype=dtype, gen=gen)
    k1, v1, k2, v2 = k_cache.clone().to(DEV), v_cache.clone().to(DEV), k_cache.clone(), v_cache.clone()
    A.paged_kv_write(k1, v1, k_new.to(DEV), v_new.to(DEV), slots.to(DEV), backend="triton")
    k1, v1 = k1.cpu(), v1.cpu()
    A.paged_kv_write_ref(k2, v2, k_new, v_new, slots)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    for i in range(n):
        s = slots[i].item()
        if 0 <= s < n_blocks * bs:
            assert torch.equal(k1[s // bs, s % bs], k_new[i]) and torch.equal(v1[s // bs, s % bs], v_new[i])
    untouched = torch.ones(n_blocks * bs, dtype=torch.bool)
    untouched[slots[(slots >= 0) & (slots < n_blocks * bs)]] = False
    assert torch.equal(k1.view(-1, hkv, d)[untouched], k_cache.view(-1, hkv, d)[untouched])


def test_kv_write_contiguous_cache_then_decode():
    gen = _gen()
    batch, smax, hkv, d = 2, 11, 1, 32
    k_cache = torch.zeros(batch, smax, hkv, d, device=DEV)
    v_cache = torch.zeros(batch, smax, hkv, d, device=DEV)
    pos = torch.tensor([4, 9])
    slots = torch.arange(batch) * smax + pos
    k_new = _rand(batch, hkv, d, dtype=torch.float32, gen=gen)
    v_new = _rand(batch, hkv, d, dtype=torch.float32, gen=gen)
    A.paged_kv_write(k_cache, v_cache, k_new.to(DEV), v_new.to(DEV), slots.to(DEV), backend="triton")
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    assert torch.equal(k_cache[0, 4], k_new[0]) and torch.equal(v_cache[1, 9], v_new[1])
    assert k_cache.abs().sum() == k_new.abs().sum()


# ---------------------------------------------------------------------------------------
# registered ops, torch.compile, dispatch
# ---------------------------------------------------------------------------------------
def test_opcheck_registered_ops():
    gen = _gen()
    q, k, v = _rand(9, 2, 32, dtype=torch.float32, gen=gen), _rand(9, 1, 32, dtype=torch.float32, gen=gen), _rand(
        9, 1, 32, dtype=torch.float32, gen=gen
    )
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)
    q_hi, k_lo = A.span_limits(cu, 9, torch.tensor([[[1, 3]], [[-1, -1]]], dtype=torch.int32, device=DEV))
    for backend in ("torch", "triton"):
        q.requires_grad_(True)
        torch.library.opcheck(
            A_prefill._prefill_fwd_op, (q, k, v, cu, q_hi, k_lo, None, 5, True, 32**-0.5, backend),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
        q.requires_grad_(False)
        kc, vc, table = (t.to(DEV) for t in _paged_cache(gen, torch.float32, 4, 4, 1, 32, 2, 2))
        seqlens = torch.tensor([3, 7], dtype=torch.int32, device=DEV)
        torch.library.opcheck(A_decode._decode_op, (q[:2], kc, vc, seqlens, table, 0.2, backend),
                              test_utils=("test_schema", "test_faketensor"))
        slots = torch.tensor([0, -1, 5], dtype=torch.int64, device=DEV)
        torch.library.opcheck(A_kv_write._kv_write_op, (kc.clone(), vc.clone(), k[:3], v[:3], slots, backend),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_traces_ops():
    gen = _gen()
    q = _rand(1, 17, 2, 32, dtype=torch.float32, gen=gen)
    k = _rand(1, 17, 2, 32, dtype=torch.float32, gen=gen)
    v = _rand(1, 17, 2, 32, dtype=torch.float32, gen=gen)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)

    def step(q, k, v):
        out = A.prefill_attention(q, k, v, backend="triton")
        kc = torch.zeros(2, 16, 2, 32, device=q.device)
        A.paged_kv_write(kc, kc.clone(), k[0, :3], v[0, :3], torch.arange(3, device=q.device), backend="triton")
        dec = A.decode_attention(q[:, -1], kc, kc, torch.tensor([3], dtype=torch.int32, device=q.device),
                                 block_table=torch.tensor([[1, 0]], dtype=torch.int32, device=q.device),
                                 backend="triton")
        return out, dec

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    out, dec = compiled(q, k, v)
    ref_out, ref_dec = step(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dec, ref_dec)


def test_dispatch_torch_backend_and_auto_on_cpu(monkeypatch):
    gen = _gen()
    q, k, v = (_rand(2, 9, 2, 32, dtype=torch.float32, gen=gen) for _ in range(3))
    ref = A.prefill_attention_ref(q, k, v)
    assert torch.equal(A.prefill_attention(q, k, v, backend="torch"), ref)
    monkeypatch.delenv("PGEN_OPS_BACKEND", raising=False)
    assert torch.equal(A.prefill_attention(q, k, v), ref)  # auto on CPU -> torch reference
    monkeypatch.setenv("PGEN_OPS_BACKEND", "triton")
    forced = A.prefill_attention(q.to(DEV), k.to(DEV), v.to(DEV)).cpu()  # the Triton part runs on DEV
    torch.testing.assert_close(forced, ref, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not implemented"):
        A.decode_attention(q[:, 0], k, v, torch.tensor([3, 4], dtype=torch.int32), backend="cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        A.paged_kv_write(k, v, k[0], v[0], torch.arange(9), backend="cuda")


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def test_clear_errors_for_bad_inputs():
    q = torch.randn(1, 8, 4, 32)
    kv3 = torch.randn(1, 8, 3, 32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        A.prefill_attention(q, kv3, kv3)
    with pytest.raises(TypeError, match="cu_seqlens must be torch.int32"):
        A.prefill_attention(q[0], q[0], q[0], cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="end at total=8"):
        A.prefill_attention(q[0], q[0], q[0], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="key_padding_mask is only for the padded layout"):
        A.prefill_attention(q[0], q[0], q[0], cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                            key_padding_mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bidirectional_spans must be \[B,N,2\]"):
        A.prefill_attention(q, q, q, bidirectional_spans=torch.zeros(2, 1, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="key_padding_mask must be torch.bool"):
        A.prefill_attention(q, q, q, key_padding_mask=torch.ones(1, 8))
    with pytest.raises(TypeError, match="share one dtype"):
        A.prefill_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="kernels take"):
        A.prefill_attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(ValueError, match="head dim <= 256"):
        big = torch.randn(1, 2, 1, 264)
        A.prefill_attention(big, big, big, backend="triton")
    with pytest.raises(ValueError, match="padded layout expects"):
        A.prefill_attention(q[0], q[0], q[0])
    cache = torch.randn(4, 8, 2, 32)
    with pytest.raises(TypeError, match="block_table must be torch.int32"):
        A.decode_attention(torch.randn(2, 4, 32), cache, cache, torch.ones(2, dtype=torch.int32),
                           block_table=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous cache must be"):
        A.decode_attention(torch.randn(2, 4, 32), cache, cache, torch.ones(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens must be torch.int32"):
        A.decode_attention(torch.randn(4, 4, 32), cache, cache, torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="slot_mapping must be torch.int64"):
        A.paged_kv_write(cache, cache, torch.randn(3, 2, 32), torch.randn(3, 2, 32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_new/v_new must both be \[N,Hkv,D\]"):
        A.paged_kv_write(cache, cache, torch.randn(3, 1, 32), torch.randn(3, 1, 32), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown backend"):
        A.prefill_attention(q, q, q, backend="fast")
