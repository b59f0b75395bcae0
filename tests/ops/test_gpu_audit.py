"""GPU-path audit: Triton kernels on inputs the other op tests do not use (run in the CPU
interpreter here, on the GPU with ``PGEN_TEST_DEVICE=cuda``), launch geometry per architecture.

* strided (non-contiguous) index / auxiliary tensors: block tables, lengths, slot maps,
  ``cu_seqlens``, float8 scales, log-prob targets and bias. The kernels index them as dense
  arrays, so a strided view read other rows' entries (wrong outputs, no error);
* head dims that are not a power of two (80 / 96 / 120), MQA and wide GQA groups, batch 1,
  one-block tables, last blocks partly filled, float8 caches with 16-bit and float32 queries.

Each comparison is against the op's torch reference (float64 where the dtype allows).
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
# kernels jitted before TRITON_INTERPRET was set: reload them (helpers first, the package last)
for _name in sorted((m for m in sys.modules if m.startswith("pgen_engine.ops._triton_attention.")),
                    key=lambda m: m != "pgen_engine.ops._triton_attention.common"):
    importlib.reload(sys.modules[_name])
for _name in ("pgen_engine.ops._triton_attention", "pgen_engine.ops._triton_decode_shared"):
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])

from pgen_engine.ops import attention as A  # noqa: E402
from tests.ops._device import DEV  # noqa: E402

pytestmark = pytest.mark.skipif(not _backend.triton_available(), reason="Triton cannot run here")

# max |error| allowed relative to the largest reference magnitude, by the kernel's dtype
_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    out = out.cpu()
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN"
    err = (out.double() - ref.double()).abs().max().item()
    tol = _TOL[dtype] * max(1.0, ref.double().abs().max().item())
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def _strided(t: torch.Tensor, fill) -> torch.Tensor:
    """``t``'s values as a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.stack([t, torch.full_like(t, fill)], dim=-1)
    out = wide[..., 0]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


# ---------------------------------------------------------------------------------------
# strided index tensors
# ---------------------------------------------------------------------------------------
def test_decode_attention_strided_block_table_and_seqlens():
    """A block table passed transposed (``table.t()``) and lengths that are a column of a wider
    tensor: before the fix the kernel read ``BT + b * stride(0) + j`` / ``SEQLENS + b``."""
    gen = _gen()
    B, hq, hkv, d, bs, nb = 3, 4, 2, 64, 4, 4
    kc = torch.randn(B * nb, bs, hkv, d, generator=gen)
    vc = torch.randn(B * nb, bs, hkv, d, generator=gen)
    table_t = torch.randperm(B * nb, generator=gen).view(nb, B).to(torch.int32)
    table = table_t.t()  # [B, nb], strides (1, B)
    lens = torch.tensor([13, 16, 5], dtype=torch.int32)
    q = torch.randn(B, hq, d, generator=gen)
    ref = A.decode_attention_ref(q.double(), kc.double(), vc.double(), lens, block_table=table.contiguous())
    for tab, sl, what in ((table, lens, "table"), (table.contiguous(), _strided(lens, 99), "seqlens"),
                          (table, _strided(lens, 99), "both")):
        out = A.decode_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), sl.to(DEV), block_table=tab.to(DEV),
                                 backend="triton")
        _close(out, ref, torch.float32, f"strided {what}")


def test_paged_kv_write_strided_slot_mapping():
    gen = _gen(1)
    kc, vc = torch.zeros(5, 4, 3, 96), torch.zeros(5, 4, 3, 96)
    kn, vn = torch.randn(4, 3, 96, generator=gen), torch.randn(4, 3, 96, generator=gen)
    slots = torch.tensor([0, 7, 19, -1])
    kr, vr = kc.clone(), vc.clone()
    A.paged_kv_write(kr, vr, kn, vn, slots, backend="torch")
    kd, vd = kc.to(DEV), vc.to(DEV)
    A.paged_kv_write(kd, vd, kn.to(DEV), vn.to(DEV), _strided(slots, 100).to(DEV), backend="triton")
    assert torch.equal(kd.cpu(), kr) and torch.equal(vd.cpu(), vr)


def test_prefill_strided_cu_seqlens():
    gen = _gen(2)
    q = torch.randn(11, 4, 64, generator=gen)
    k, v = torch.randn(11, 2, 64, generator=gen), torch.randn(11, 2, 64, generator=gen)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    ref = A.prefill_attention_ref(q.double(), k.double(), v.double(), causal=True, cu_seqlens=cu, max_seqlen=7)
    qd, kd, vd = (t.to(DEV).detach().requires_grad_() for t in (q, k, v))
    out = A.prefill_attention(qd, kd, vd, causal=True, cu_seqlens=_strided(cu, 5).to(DEV), max_seqlen=7,
                              backend="triton")
    _close(out.detach(), ref, torch.float32, "prefill strided cu_seqlens")
    out.sum().backward()  # the backward reads cu_seqlens too
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    A.prefill_attention_ref(q64, k64, v64, causal=True, cu_seqlens=cu, max_seqlen=7).sum().backward()
    for got, want, n in ((qd, q64, "dq"), (kd, k64, "dk"), (vd, v64, "dv")):
        _close(got.grad, want.grad, torch.float32, f"prefill strided cu_seqlens {n}")
