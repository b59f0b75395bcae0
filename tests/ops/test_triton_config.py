"""Per-architecture Triton launch geometry (pgen_engine.ops._triton_config).

Whether each geometry fits its GPU's shared memory is checked by compiling it
(tests/ops/test_triton_compile.py); these tests pin the function's contract and that the
launchers really ask it, with the device's architecture.
"""
from __future__ import annotations

import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops import _triton_config as C  # noqa: E402

ARCHS = (80, 89, 90)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _footprint(b: C.PrefillBlocks) -> int:
    """Tile rows kept in shared memory, a monotone proxy for the bytes a config needs."""
    return b.block_m + 2 * b.block_n * max(1, b.num_stages)


def test_smem_limits_are_the_opt_in_per_block_maxima():
    assert C.smem_limit(80) == 163 * 1024
    assert C.smem_limit(89) == 99 * 1024
    assert C.smem_limit(90) == 227 * 1024
    assert C.smem_limit(86) == C.smem_limit(89)
    # unknown minor version: the smallest of its family; unknown family: the 99 KiB parts
    assert C.smem_limit(92) == C.smem_limit(90)
    assert C.smem_limit(110) == 99 * 1024


@pytest.mark.parametrize("backward", [False, True])
def test_interpreter_gets_small_tiles(backward, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dt in DTYPES:
        assert C.prefill_blocks(C.INTERPRETER_ARCH, dt, 128, backward) == C.PrefillBlocks(32, 32, 4, 1)


def test_fp32_head_dim_128_shrinks_below_sm90(monkeypatch):
    """The fp32 forward's (128, 64, 3-stage) tiles need ~229,888 B: H100 only."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backward in (False, True):
        h100 = C.prefill_blocks(90, torch.float32, 128, backward)
        a100 = C.prefill_blocks(80, torch.float32, 128, backward)
        l40s = C.prefill_blocks(89, torch.float32, 128, backward)
        assert _footprint(h100) >= _footprint(a100) > _footprint(l40s), (h100, a100, l40s)
        assert backward or _footprint(h100) > _footprint(a100)
        # 16-bit tiles are half the bytes: the same geometry serves every architecture
        assert len({C.prefill_blocks(a, torch.bfloat16, 128, backward) for a in ARCHS}) == 1
    assert C.prefill_blocks(90, torch.float32, 128) == C.PrefillBlocks(128, 64, 8, 3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("backward", [False, True])
def test_geometry_is_valid(arch, dtype, head_dim, backward, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b = C.prefill_blocks(arch, dtype, head_dim, backward)
    for v in (b.block_m, b.block_n, b.num_warps):
        assert v >= 1 and v & (v - 1) == 0, b  # powers of two, as tl.arange and warps need
    assert b.block_m >= 16 and b.block_n >= 16 and b.num_stages >= 1  # tl.dot needs 16x16 tiles
    assert b.num_warps <= 8


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        C.prefill_blocks(90, torch.float64, 128)
    with pytest.raises(ValueError, match="head_dim"):
        C.prefill_blocks(90, torch.float32, 0)


def test_launchers_ask_with_the_device_arch(monkeypatch):
    """The prefill launchers size their tiles through prefill_blocks(device_arch(device), ...)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in the interpreter")
    from pgen_engine.ops import _triton_attention as T

    calls = []
    real = C.prefill_blocks
    monkeypatch.setattr(C, "device_arch", lambda device: 89)
    monkeypatch.setattr(C, "prefill_blocks", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    out, lse = T.prefill_fwd(q, k, v, cu, None, None, 8, True, 0.25)
    T.prefill_bwd(torch.ones_like(out), q, k, v, out, lse, cu, None, None, None, 8, True, 0.25)
    assert calls == [((89, torch.float32, 16), {}), ((89, torch.float32, 16), {"backward": True})]
