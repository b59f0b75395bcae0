"""Shared-prefix (cascade) decode attention: Triton kernel (CPU interpreter) vs the torch
reference vs a naive per-row definition, on hidden shapes (head dims 64 / 80 / 128, MHA and
GQA, ragged prefix lengths, groups of different sizes interleaved), float and float8 caches.

Tolerance rule (as tests/ops/test_attention.py): kernel error vs a float64 reference <= 2x
the error of the reference computed in the kernel's dtype, plus a rounding floor.
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

if hasattr(_backend.triton_available, "cache_clear"):
    _backend.triton_available.cache_clear()
if "pgen_engine.ops._triton_decode_shared" in sys.modules:  # jitted before the env var was set
    importlib.reload(sys.modules["pgen_engine.ops._triton_decode_shared"])

from pgen_engine.ops import _triton_decode_shared as TS  # noqa: E402
from pgen_engine.ops import decode_shared as DS  # noqa: E402
from pgen_engine.ops import kv_quant as KQ  # noqa: E402
from tests.ops._device import DEV  # noqa: E402

# float32: a few ulps of the largest value (the kernel's base-2 softmax and split merges
# round differently from the reference's BLAS matmul; a wrong mask or scale is off by far more)
_FLOOR = {torch.float32: 4e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the launcher allocates starts as NaN: an unwritten element fails the test."""
    monkeypatch.setattr(TS, "POISON_OUTPUTS", True)


def _within(out, ref64, ref_low, what=""):
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in kernel output"
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_low.double() - ref64).abs().max().item()
    floor = _FLOOR[out.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{what}: err {err:.3e} > 2 * ref_err {ref_err:.3e} + {floor:.1e}"


def _gen():
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def _case(gen, *, hq, hkv, d, lp, lo, plens, members, own, dtype=torch.float32):
    """A wave cache: pool rows with lengths ``plens``, ``members[b]`` the pool row of row b,
    ``own[b]`` row b's own tokens. Unread slots hold NaN (a kernel that reads them fails)."""
    P, B = len(plens), len(members)
    pk = torch.randn(P, hkv, lp, d, generator=gen)
    pv = torch.randn(P, hkv, lp, d, generator=gen)
    k = torch.randn(B + 1, hkv, lo, d, generator=gen)  # one spare row: rows may exceed B
    v = torch.randn(B + 1, hkv, lo, d, generator=gen)
    for p, n in enumerate(plens):
        pk[p, :, n:] = float("nan")
        pv[p, :, n:] = float("nan")
    for b, n in enumerate(own):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    k[B] = v[B] = float("nan")
    prow = torch.tensor(members + [0], dtype=torch.int32)
    plen = torch.tensor([plens[m] for m in members] + [0], dtype=torch.int32)
    seqlens = torch.tensor([plens[m] + o for m, o in zip(members, own)] + [0], dtype=torch.int32)
    q = torch.randn(B, hq, d, generator=gen)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), seqlens=seqlens, prefix_k=pk.to(dtype),
                prefix_v=pv.to(dtype), prefix_row=prow, prefix_len=plen)


def _naive(c, scale=None, deq=None):
    """Per-row float64 definition: concatenate the row's prefix and own tokens, softmax."""
    q = c["q"].double()
    B, hq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(B, hq, d, dtype=torch.float64)
    for b in range(B):
        p = int(c["prefix_row"][b])
        n_p = min(int(c["prefix_len"][b]), int(c["seqlens"][b]))
        n_o = int(c["seqlens"][b]) - n_p
        ks = [c["prefix_k"][p, :, :n_p].double(), c["k"][b, :, :n_o].double()]
        vs = [c["prefix_v"][p, :, :n_p].double(), c["v"][b, :, :n_o].double()]
        if deq is not None:
            ks = [ks[0] * deq["prefix_k_scale"][p].double()[:, None, None], ks[1] * deq["k_scale"][b].double()[:, None, None]]
            vs = [vs[0] * deq["prefix_v_scale"][p].double()[:, None, None], vs[1] * deq["v_scale"][b].double()[:, None, None]]
        kk, vv = torch.cat(ks, 1), torch.cat(vs, 1)  # [Hkv, n, D]
        if kk.shape[1] == 0:
            continue
        g = hq // kk.shape[0]
        kk, vv = kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0)
        w = torch.softmax(torch.einsum("hd,hnd->hn", q[b], kk) * scale, -1)
        out[b] = torch.einsum("hn,hnd->hd", w, vv)
    return out


def _dev(c):
    return {n: t.to(DEV) if isinstance(t, torch.Tensor) else t for n, t in c.items()}


def _f64(c):
    return {n: t.double() if t.is_floating_point() and t.dtype != KQ.FP8_DTYPE else t for n, t in c.items()}


# (hq, hkv, d): MHA as Janus-Pro, GQA, and head dims 64 / 80 / 128
SHAPES = [(2, 2, 64), (4, 2, 80), (3, 1, 128)]


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_naive(hq, hkv, d, dtype):
    gen = _gen()
    # 3 pool rows of ragged lengths (one a CFG-style uncond prefix); groups of 4, 1 and 2 rows,
    # interleaved; own lengths from 1 (the first decode step) to the own capacity
    c = _case(gen, hq=hq, hkv=hkv, d=d, lp=37, lo=9, plens=[37, 5, 20], members=[0, 2, 0, 1, 0, 2, 0],
              own=[1, 9, 4, 2, 9, 1, 6], dtype=dtype)
    naive = _naive(c)
    ref64 = DS.shared_prefix_decode_ref(**_f64(c))
    torch.testing.assert_close(ref64, naive, rtol=1e-10, atol=1e-10)
    ref_low = DS.shared_prefix_decode_ref(**c)
    out = DS.shared_prefix_decode(**_dev(c), backend="triton").cpu()
    _within(out, ref64, ref_low, f"shared decode {dtype} d={d}")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_splits_and_empty_rows(num_splits):
    """Any split count; a row with nothing cached yields zeros; a group larger than one member
    tile; groups given by the caller instead of built by the op."""
    gen = _gen()
    members = [1] * 19 + [0]  # 19 rows x 2 query heads per KV head: three 16-vector tiles
    own = [3] * 19 + [0]
    c = _case(gen, hq=4, hkv=2, d=64, lp=40, lo=4, plens=[0, 40], members=members, own=own)
    c["seqlens"][19] = 0
    ref64 = DS.shared_prefix_decode_ref(**_f64(c))
    ptr, rows = DS.prefix_groups(c["prefix_row"][:20], 2)
    d = _dev(c)
    out = TS.decode_shared(d["q"], d["k"], d["v"], d["seqlens"], d["prefix_k"], d["prefix_v"], d["prefix_len"],
                           ptr.to(DEV), rows.to(DEV), 64 ** -0.5, num_splits=num_splits).cpu()
    _within(out, ref64, DS.shared_prefix_decode_ref(**c), f"splits={num_splits}")
    assert torch.all(out[19] == 0)


def _quantized(c):
    """c with float8 caches and per-(row, head) scales, as the write path stores them."""
    q8 = dict(c)
    for name, pool in (("k", False), ("v", False), ("prefix_k", True), ("prefix_v", True)):
        x = torch.nan_to_num(c[name].float(), nan=0.0)
        s = x.abs().amax(dim=(2, 3)) * (KQ.HEADROOM / KQ.FP8_MAX)
        q8[name] = KQ.quantize(x, s)
        q8[("prefix_" if pool else "") + name.removeprefix("prefix_") + "_scale"] = s
    return q8


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_fp8_kernel_matches_dequantised_reference(hq, hkv, d):
    gen = _gen()
    c = _case(gen, hq=hq, hkv=hkv, d=d, lp=21, lo=7, plens=[21, 8], members=[1, 0, 0, 1, 0], own=[7, 1, 3, 5, 2])
    q8 = _quantized(c)
    scales = {n: q8[n] for n in ("k_scale", "v_scale", "prefix_k_scale", "prefix_v_scale")}
    naive = _naive({**q8, "k": q8["k"].float(), "v": q8["v"].float(), "prefix_k": q8["prefix_k"].float(),
                    "prefix_v": q8["prefix_v"].float()}, deq=scales)
    ref64 = DS.shared_prefix_decode_ref(**{**q8, "q": q8["q"].double()})
    torch.testing.assert_close(ref64, naive, rtol=1e-10, atol=1e-10)
    ref_low = DS.shared_prefix_decode_ref(**q8)
    out = DS.shared_prefix_decode(**_dev(q8), backend="triton").cpu()
    _within(out, ref64, ref_low, f"fp8 d={d}")
    # and the quantised attention is close to the full-precision one (e4m3: ~2^-4 relative)
    full = DS.shared_prefix_decode_ref(**_f64(c))
    assert (out.double() - full).abs().max() < 0.1 * full.abs().max()


def test_prefix_groups_are_csr_of_rows():
    prow = torch.tensor([2, 0, 2, 2, 1, 0], dtype=torch.int32)
    ptr, rows = DS.prefix_groups(prow, 4)
    assert ptr.tolist() == [0, 2, 3, 6, 6]
    assert rows.tolist() == [1, 5, 4, 0, 2, 3]
    assert ptr.dtype == rows.dtype == torch.int32


def test_quantize_roundtrip_and_saturation():
    x = torch.tensor([[[0.0, 1.0, -3.0, 100.0]]])
    s = torch.tensor([[100.0 * KQ.HEADROOM / KQ.FP8_MAX]])
    y = KQ.dequantize(KQ.quantize(x, s), s)
    torch.testing.assert_close(y, x, rtol=2 ** -4, atol=0)
    big = KQ.dequantize(KQ.quantize(x * 1000, s), s)
    assert big.max().item() == pytest.approx(KQ.FP8_MAX * s.item())  # saturates, no NaN / inf
    zero = KQ.quantize(x, torch.zeros(1, 1))  # a zero scale stores zeros, not NaN
    assert not torch.isnan(zero.float()).any()


def test_write_head_major_calibrates_then_keeps_scales():
    gen = _gen()
    k_cache = torch.zeros(3, 2, 5, 8, dtype=KQ.FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    ks, vs = torch.zeros(3, 2), torch.zeros(3, 2)
    x = torch.randn(4, 2, 8, generator=gen)
    slots = torch.tensor([0, 1, 2, 10])  # row 0 positions 0..2, row 2 position 0
    KQ.write_head_major(k_cache, v_cache, x, 2 * x, slots, ks, vs, calibrate=True)
    want = x[:3].abs().amax(dim=(0, 2)) * KQ.HEADROOM / KQ.FP8_MAX
    torch.testing.assert_close(ks[0], want)
    torch.testing.assert_close(vs[0], 2 * want)
    assert torch.all(ks[1] == 0)
    got = KQ.dequantize(k_cache[0, :, :3].transpose(0, 1), ks[0][None].expand(3, 2))
    torch.testing.assert_close(got, x[:3], rtol=2 ** -4, atol=1e-6)
    # decode write: set scales stay, unset ones are set (never below the floor)
    before = ks.clone()
    y = 10 * torch.randn(2, 2, 8, generator=gen)
    KQ.write_head_major(k_cache, v_cache, y, y, torch.tensor([3, 5]), ks, vs, calibrate=False,
                        floor_k=torch.full((3, 2), 1e3))
    torch.testing.assert_close(ks[0], before[0])
    assert torch.all(ks[1] == 1e3)


def test_clear_errors():
    gen = _gen()
    c = _case(gen, hq=2, hkv=2, d=16, lp=4, lo=2, plens=[4], members=[0, 0], own=[1, 2])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        DS.shared_prefix_decode_ref(**{**c, "q": torch.randn(2, 3, 16)})
    with pytest.raises(ValueError, match="seqlens must be int32"):
        DS.shared_prefix_decode_ref(**{**c, "seqlens": c["seqlens"].long()})
    q8 = _quantized(c)
    with pytest.raises(ValueError, match="float8 caches need k_scale"):
        DS.shared_prefix_decode_ref(**{**q8, "k_scale": None})
    with pytest.raises(ValueError, match="scales are for float8"):
        DS.shared_prefix_decode_ref(**c, k_scale=torch.ones(3, 2))
    with pytest.raises(TypeError, match="share one dtype"):
        DS.shared_prefix_decode_ref(**{**c, "k": c["k"].double()})
    with pytest.raises(ValueError, match="pool is empty"):
        DS.shared_prefix_decode_ref(**{**c, "prefix_k": c["prefix_k"][:0], "prefix_v": c["prefix_v"][:0]})


def test_launch_geometry_per_arch(monkeypatch):
    from pgen_engine.ops import _triton_config as C

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter gets its own small tiles

    for arch in (80, 89, 90):
        for dt in (torch.float32, torch.bfloat16):
            g = C.shared_decode_blocks(arch, dt, 128)
            assert g.block_m >= 16 and g.block_n >= 16 and g.split_len % g.block_n == 0
    # fp32 tiles are halved at D = 128; the 99 KiB parts get fewer stages than an H100
    assert C.shared_decode_blocks(90, torch.float32, 128).block_n < C.shared_decode_blocks(90, torch.bfloat16, 128).block_n
    assert C.shared_decode_blocks(89, torch.bfloat16, 128).num_stages < C.shared_decode_blocks(90, torch.bfloat16, 128).num_stages
    with pytest.raises(ValueError, match="dtype"):
        C.shared_decode_blocks(90, torch.float8_e4m3fn, 128)
