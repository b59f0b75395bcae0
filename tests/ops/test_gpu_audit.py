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
from pgen_engine.ops import decode_shared as DS  # noqa: E402
from pgen_engine.ops import kv_quant as KQ  # noqa: E402
from pgen_engine.ops.logprobs import token_logprobs  # noqa: E402
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
    """``t``'s values as a non-contiguous view on ``DEV`` (every other element of a wider buffer;
    made there, as ``.to(device)`` of a strided view returns a dense copy)."""
    t = t.to(DEV)
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
    table = table_t.to(DEV).t()  # [B, nb], strides (1, B)
    lens = torch.tensor([13, 16, 5], dtype=torch.int32)
    q = torch.randn(B, hq, d, generator=gen)
    ref = A.decode_attention_ref(q.double(), kc.double(), vc.double(), lens, block_table=table.cpu().contiguous())
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


def _shared_case(gen, B, hq, hkv, d, P, lp, lo, dtype, cache_dtype):
    """Arguments of shared_prefix_decode: random lengths, pool rows and caches (float8 with scales)."""
    q = torch.randn(B, hq, d, generator=gen).to(dtype)
    k, v = torch.randn(B, hkv, lo, d, generator=gen), torch.randn(B, hkv, lo, d, generator=gen)
    pk, pv = torch.randn(P, hkv, lp, d, generator=gen), torch.randn(P, hkv, lp, d, generator=gen)
    plen = torch.randint(0, lp + 1, (B,), generator=gen, dtype=torch.int32)
    c = dict(q=q, seqlens=plen + torch.randint(0, lo + 1, (B,), generator=gen, dtype=torch.int32),
             prefix_row=torch.randint(0, P, (B,), generator=gen, dtype=torch.int32), prefix_len=plen)
    for name, x in (("k", k), ("v", v), ("prefix_k", pk), ("prefix_v", pv)):
        if cache_dtype == KQ.FP8_DTYPE:
            s = x.abs().amax(dim=(2, 3)) * (KQ.HEADROOM / KQ.FP8_MAX)
            c[name], c[name + "_scale"] = KQ.quantize(x, s), s
        else:
            c[name] = x.to(cache_dtype)
    return c


def _shared_ref64(c):
    return DS.shared_prefix_decode_ref(**{n: t.double() if t.is_floating_point() and t.dtype != KQ.FP8_DTYPE
                                          and not n.endswith("scale") else t for n, t in c.items()})


def _on_dev(c):
    return {n: t.to(DEV) for n, t in c.items()}


def test_shared_prefix_decode_strided_lengths_and_scales():
    """Lengths / pool rows / prefix lengths and float8 scales as strided views (a column of a
    wider table): the kernels read them as dense arrays before the fix."""
    gen = _gen(3)
    for cache_dtype in (torch.float32, KQ.FP8_DTYPE):
        c = _shared_case(gen, 3, 4, 2, 64, 2, 20, 5, torch.float32, cache_dtype)
        ref = _shared_ref64(c)
        strided = {n: _strided(c[n], 7) for n in ("seqlens", "prefix_row", "prefix_len")}
        if cache_dtype == KQ.FP8_DTYPE:
            strided.update({n: _strided(c[n], 0.0) for n in ("k_scale", "v_scale", "prefix_k_scale",
                                                               "prefix_v_scale")})
        out = DS.shared_prefix_decode(**_on_dev({**c, **strided}), backend="triton")
        _close(out, ref, torch.float32, f"shared decode strided ({cache_dtype})")


@pytest.mark.parametrize("strided", ["bias", "targets"])
def test_token_logprobs_strided_bias_and_targets(strided):
    """A bias column / targets column of a wider tensor: the forward read the bias as dense,
    the backward the targets (the forward made them dense, the backward did not)."""
    gen = _gen(4)
    h, w = torch.randn(6, 32, generator=gen), torch.randn(50, 32, generator=gen)
    t, b = torch.randint(0, 50, (6,), generator=gen), torch.randn(50, generator=gen)
    tt, bb = (_strided(t, 0), b) if strided == "targets" else (t, _strided(b, 0.0))
    got, want = [], []
    for be, hh, ww, out in (("triton", h.to(DEV), w.to(DEV), got), ("torch", h.double(), w.double(), want)):
        hh, ww = hh.clone().requires_grad_(), ww.clone().requires_grad_()
        dev = hh.device
        lp, ent = token_logprobs(hh, ww, (tt if be == "triton" else t).to(dev),
                                 bias=(bb if be == "triton" else b).to(device=dev, dtype=hh.dtype), backend=be)
        gh, gw = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), (hh, ww))
        out.extend([lp.detach(), ent.detach(), gh, gw])
    for g, r, n in zip(got, want, ("logprobs", "entropy", "d hidden", "d weight")):
        _close(g, r, torch.float32, f"token_logprobs strided {strided}: {n}")


# ---------------------------------------------------------------------------------------
# launch geometry per architecture
# ---------------------------------------------------------------------------------------
_CPU_ONLY = pytest.mark.skipif(os.environ.get("PGEN_TEST_DEVICE", "cpu") != "cpu", reason="a GPU run compiles for real")


def test_99kib_parts_share_one_geometry(monkeypatch):
    """sm_86 (A10 / RTX 30xx), sm_89 (L4 / L40S) and sm_120 have the same 99 KiB per block; the
    compile checks run sm_89 (and sm_86 below), so every config must be the same on all three,
    and never an sm_90 (227 KiB) one where that one differs."""
    from pgen_engine.ops import _triton_config as C

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the configs answer for the GPU, not the interpreter
    assert C.smem_limit(86) == C.smem_limit(89) == C.smem_limit(120) == 99 * 1024
    assert C.smem_limit(87) == C.smem_limit(80) and C.smem_limit(100) == C.smem_limit(90)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for d in (32, 40, 64, 80, 96, 120, 128, 160, 256):
            for fn in (C.prefill_blocks, C.shared_decode_blocks, C.decode_blocks):
                small = {fn(a, dt, d) for a in (86, 89, 120)}
                assert len(small) == 1, (fn.__name__, dt, d, small)
            assert {C.prefill_blocks(a, dt, d, backward=True) for a in (86, 89, 120)} == \
                {C.prefill_blocks(89, dt, d, backward=True)}
    # the configs that only fit an H100 (fp32 tiles) differ on the 99 KiB parts
    assert C.decode_blocks(89, torch.float32, 256) != C.decode_blocks(90, torch.float32, 256)
    assert C.shared_decode_blocks(89, torch.float32, 256) != C.shared_decode_blocks(90, torch.float32, 256)
    assert C.prefill_blocks(89, torch.float32, 128) != C.prefill_blocks(90, torch.float32, 128)


@_CPU_ONLY
def test_decode_kernels_fit_99kib_at_head_dim_256():
    """float32 decode at D=256 on sm_86: the split-K kernel with 64-key tiles needed 151,616 B and
    the shared-prefix kernel with 2 stages 102,528 B (over 101,376 B: OutOfResources on an A10 /
    L4); tools/triton_compile_check.py compiles them (ptxas included) and checks the limit."""
    pytest.importorskip("triton")
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "tools/triton_compile_check.py", "--arch", "86", "--dtypes", "fp32",
                          "--head-dims", "256", "--ops", "decode,decode_shared"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "_decode_split_kernel" in out.stdout and "_prefix_partial_kernel" in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------
# CUDA-graph decode bookkeeping (the capture replaced by a recorder, as in
# tests/generation/test_decode_graph.py)
# ---------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a CUDA graph on CPU: capture runs the warm-up step and records, replay runs it."""

    captures = 0

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()

    @classmethod
    def capture(cls, step):
        step()
        cls.captures += 1
        return cls(step)


def test_graph_recaptured_when_a_model_buffer_moves(tmp_path, monkeypatch):
    """A captured decode graph reads the model's buffers at fixed addresses too (the rotary
    ``inv_freq``, which a checkpoint load re-assigns): the graph key named the parameters'
    addresses only, so a re-assigned buffer was read from freed memory on replay."""
    import pgen_engine as pg
    from pgen_engine.generation import Generator
    from pgen_engine.generation import decode_graph as dg
    from pgen_engine.models.tiny import make_tiny_checkpoint

    model = pg.load_model(make_tiny_checkpoint(tmp_path / "m", seed=3, image_size=32, patch_size=8, num_heads=4,
                                               num_kv_heads=2))
    monkeypatch.setattr(dg.StaticDecode, "_capture", staticmethod(_Recorder.capture))
    _Recorder.captures = 0
    sp = pg.SpecialTokens.builtin()
    rows = [[sp.bos, 7, 9, sp.boi], [sp.bos, 11, sp.boi]]
    g = Generator(model, max_batch_size=2, max_seq_len=32, decode_mode="static")
    g._static = dg.StaticDecode(graphs=True)  # what decode_mode="graph" builds on CUDA
    want = g.generate(rows, seed=1, top_k=5)
    assert _Recorder.captures == 1
    assert torch.equal(g.generate(rows, seed=1, top_k=5), want) and _Recorder.captures == 1  # replays only
    rot = next(m for m in model.modules() if "inv_freq" in m._buffers)
    rot.inv_freq = rot.inv_freq.clone()  # same values, new storage (what a checkpoint load does)
    assert torch.equal(g.generate(rows, seed=1, top_k=5), want)
    assert _Recorder.captures == 2, "a moved buffer must re-capture the decode graph"


def test_paged_kv_write_auto_on_cuda_takes_strided_caches(monkeypatch):
    """On CUDA ``backend="auto"`` picks the extension's kernel, which TORCH_CHECKs contiguous
    caches, while the op takes any cache with a dense head dim (the Triton kernel uses strides):
    a cache that is a slice of a larger buffer failed on GPUs with the extension only. "auto"
    now hands such caches to Triton; an explicit "cuda" says why it refuses them."""
    from pgen_engine.ops.attention import kv_write as KW

    calls = []

    class FakeExt:  # the CUDA kernel's contract, on CPU tensors
        @staticmethod
        def paged_kv_write_cuda(kc, vc, kn, vn, slots):
            if not (kc.is_contiguous() and vc.is_contiguous()):
                raise RuntimeError("paged_kv_write_cuda: caches must be contiguous")
            calls.append("cuda")
            A.paged_kv_write(kc, vc, kn, vn, slots, backend="torch")

    monkeypatch.setattr(KW, "extension", lambda: FakeExt)
    monkeypatch.setattr(KW, "resolve", lambda backend, device, supported, op: "cuda" if backend == "auto" else backend)
    gen = _gen(5)
    kn, vn = torch.randn(3, 2, 40, generator=gen).to(DEV), torch.randn(3, 2, 40, generator=gen).to(DEV)
    slots = torch.tensor([0, 5, 11], device=DEV)
    big_k, big_v = torch.zeros(4, 8, 2, 40, device=DEV), torch.zeros(4, 8, 2, 40, device=DEV)
    kc, vc = big_k[:, :4], big_v[:, :4]  # [4 blocks, 4 slots, Hkv, D], block stride 8 slots
    want_k, want_v = kc.clone(), vc.clone()
    A.paged_kv_write(want_k, want_v, kn, vn, slots, backend="torch")
    A.paged_kv_write(kc, vc, kn, vn, slots)  # auto -> "cuda" -> strided: Triton
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v) and calls == []
    dense_k, dense_v = torch.zeros(4, 4, 2, 40, device=DEV), torch.zeros(4, 4, 2, 40, device=DEV)
    A.paged_kv_write(dense_k, dense_v, kn, vn, slots)
    assert calls == ["cuda"] and torch.equal(dense_k, want_k)
    with pytest.raises(ValueError, match="needs contiguous caches"):
        A.paged_kv_write(kc, vc, kn, vn, slots, backend="cuda")


# ---------------------------------------------------------------------------------------
# CUDA grid limits: axes y and z hold at most 65,535 blocks (the interpreter has no limit)
# ---------------------------------------------------------------------------------------
def test_prefill_grid_fits_cuda_limits_for_many_sequences(monkeypatch):
    """A packed batch of 4,400 sequences x 16 heads put 70,400 programs on grid axis y, past
    CUDA's 65,535 (the launch fails on a GPU only). The launchers now fold them into y and z."""
    PF = importlib.import_module("pgen_engine.ops._triton_attention.prefill_fwd")  # the package re-exports
    PB = importlib.import_module("pgen_engine.ops._triton_attention.prefill_bwd")  # functions of these names
    grids = []

    class Stub:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *a, **k: None

    for mod, names in ((PF, ["_prefill_fwd_kernel"]), (PB, ["_prefill_bwd_dkdv_kernel", "_prefill_bwd_dq_kernel"])):
        for name in names:
            monkeypatch.setattr(mod, name, Stub())
    n_seq, hq, hkv, d = 4400, 16, 16, 16
    q, k, v = torch.zeros(n_seq, hq, d), torch.zeros(n_seq, hkv, d), torch.zeros(n_seq, hkv, d)
    cu = torch.arange(n_seq + 1, dtype=torch.int32)
    out, lse = PF.prefill_fwd(q, k, v, cu, None, None, 1, True, 0.25)
    PB.prefill_bwd(out, q, k, v, out, torch.zeros(hq, n_seq), cu, None, None, None, 1, True, 0.25)
    assert len(grids) == 3
    for g in grids:
        assert len(g) == 3 and all(x <= 65535 for x in g[1:]), g
        assert g[1] * g[2] >= n_seq * hq, g


def test_prefill_folded_grid_matches_reference(monkeypatch):
    """The folded (sequence, head) grid, forced with a tiny axis limit: programs past the last
    (sequence, head) write nothing, every other one writes its rows (outputs start as NaN)."""
    from pgen_engine.ops._triton_attention import common as TC

    monkeypatch.setattr(TC, "GRID_Y_MAX", 2)
    monkeypatch.setattr(TC, "POISON_OUTPUTS", True)
    gen = _gen(6)
    q = torch.randn(17, 3, 40, generator=gen)
    k, v = torch.randn(17, 1, 40, generator=gen), torch.randn(17, 1, 40, generator=gen)
    cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)
    qd, kd, vd = (t.to(DEV).detach().requires_grad_() for t in (q, k, v))
    out = A.prefill_attention(qd, kd, vd, causal=True, cu_seqlens=cu.to(DEV), max_seqlen=11, backend="triton")
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = A.prefill_attention_ref(q64, k64, v64, causal=True, cu_seqlens=cu, max_seqlen=11)
    ref.backward(torch.ones_like(ref))
    _close(out.detach(), ref.detach(), torch.float32, "folded grid out")
    for got, want, n in ((qd, q64, "dq"), (kd, k64, "dk"), (vd, v64, "dv")):
        _close(got.grad, want.grad, torch.float32, f"folded grid {n}")


# ---------------------------------------------------------------------------------------
# shapes the other op tests do not use (no fix needed; coverage for GPU runs)
# ---------------------------------------------------------------------------------------
# (batch, Hq, Hkv, D, block_size, blocks per row, lengths): batch 1 with one block, MQA with a
# 32-wide group, GQA at D=120 with a partly filled last block, MHA at D=96
DECODE_SHAPES = [(1, 8, 1, 80, 16, 1, [7]), (2, 32, 1, 96, 8, 5, [33, 40]), (3, 6, 2, 120, 4, 9, [35, 1, 17]),
                 (1, 4, 4, 96, 16, 3, [48])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_odd_shapes(dtype):
    gen = _gen(7)
    for B, hq, hkv, d, bs, nb, lens in DECODE_SHAPES:
        P = B * nb + 2
        kc = torch.randn(P, bs, hkv, d, generator=gen).to(dtype)
        vc = torch.randn(P, bs, hkv, d, generator=gen).to(dtype)
        table = torch.randperm(P, generator=gen)[:B * nb].view(B, nb).to(torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(B, hq, d, generator=gen).to(dtype)
        ref = A.decode_attention_ref(q.double(), kc.double(), vc.double(), sl, block_table=table)
        out = A.decode_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), sl.to(DEV), block_table=table.to(DEV),
                                 backend="triton")
        _close(out, ref, dtype, f"decode B={B} Hq={hq} Hkv={hkv} D={d} bs={bs} nb={nb}")


# (B, Hq, Hkv, D, pool rows, Lp, Lo, q dtype, cache dtype)
SHARED_SHAPES = [(1, 8, 1, 96, 1, 19, 5, torch.float32, torch.float32),
                 (3, 32, 1, 120, 2, 40, 6, torch.bfloat16, torch.bfloat16),
                 (4, 6, 2, 80, 2, 33, 3, torch.float16, KQ.FP8_DTYPE),
                 (2, 4, 4, 96, 1, 17, 9, torch.float32, KQ.FP8_DTYPE),
                 (2, 4, 2, 120, 2, 17, 9, torch.bfloat16, KQ.FP8_DTYPE)]


@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=lambda s: f"D{s[3]}-g{s[1] // s[2]}-{s[7]}-{s[8]}")
def test_shared_prefix_decode_odd_shapes(shape):
    B, hq, hkv, d, P, lp, lo, dtype, cache_dtype = shape
    c = _shared_case(_gen(8), B, hq, hkv, d, P, lp, lo, dtype, cache_dtype)
    out = DS.shared_prefix_decode(**_on_dev(c), backend="triton")
    _close(out, _shared_ref64(c), dtype, f"shared decode {shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_mqa_odd_head_dim_forward_backward(dtype):
    """MQA (8 query heads on one KV head) at D=96, key padding and a bidirectional span, 16-bit."""
    gen = _gen(9)
    B, S, hq, hkv, d = 2, 21, 8, 1, 96
    q, k, v = (torch.randn(B, S, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[0, :2] = False
    spans = torch.tensor([[[3, 9]], [[-1, -1]]], dtype=torch.int32)
    kw = dict(causal=True, key_padding_mask=kpm, bidirectional_spans=spans)
    qd, kd, vd = (t.to(DEV).detach().requires_grad_() for t in (q, k, v))
    out = A.prefill_attention(qd, kd, vd, backend="triton", **{n: t.to(DEV) for n, t in kw.items() if n != "causal"},
                              causal=True)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(g.to(DEV))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = A.prefill_attention_ref(q64, k64, v64, **kw)
    ref.backward(g.double())
    _close(out.detach(), ref.detach(), dtype, "prefill MQA D=96")
    for got, want, n in ((qd, q64, "dq"), (kd, k64, "dk"), (vd, v64, "dv")):
        _close(got.grad, want.grad, dtype, f"prefill MQA D=96 {n}")


def test_fp8_nan_codes_read_as_nan():
    """A NaN activation quantises to e4m3's NaN code (the clamp keeps NaN); the kernel's bit
    conversion read that code as 480 (a finite output where the reference gives NaN, so a
    NaN in K/V escaped the Generator's non-finite-logits check on the GPU path only)."""
    gen = _gen(10)
    c = _shared_case(gen, 2, 4, 2, 64, 1, 12, 4, torch.float32, KQ.FP8_DTYPE)
    c["seqlens"] = torch.tensor([14, 16], dtype=torch.int32)
    c["prefix_len"] = torch.tensor([12, 12], dtype=torch.int32)
    c["prefix_row"] = torch.tensor([0, 0], dtype=torch.int32)
    for name, row, pos in (("k", 0, 1), ("prefix_v", 0, 3)):
        x = c[name].float()
        x[row, 0, pos, 5] = float("nan")
        c[name] = x.to(KQ.FP8_DTYPE)
        assert torch.isnan(c[name].float()).any()
    ref = DS.shared_prefix_decode_ref(**c)
    out = DS.shared_prefix_decode(**_on_dev(c), backend="triton").cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (torch.isnan(out).sum(), torch.isnan(ref).sum())
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    live = ~torch.isnan(ref)
    _close(out[live], ref[live], torch.float32, "fp8 with NaN codes (finite part)")
