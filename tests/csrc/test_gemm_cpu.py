"""The packed small-row float32 GEMM of the CPU decode loop (csrc/gemm_cpu.*)."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.ops._backend import extension

_C = extension()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "packed_gemm_available")
                                or not _C.packed_gemm_available(), reason="no packed GEMM on this CPU / build")


@pytest.mark.parametrize("N,K", [(256, 256), (96, 256), (256, 96), (17, 5), (1, 1), (33, 40), (64, 8)])
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 12, 13, 32])
def test_packed_mm_matches_float64(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    y = _C.packed_mm_cpu(x, w)
    ref = x.double() @ w.double().T
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * K ** 0.5 * max(1.0, ref.abs().max().item())


def test_a_rows_result_does_not_depend_on_its_batch():
    """Every output is one sequential sum over k: row r alone == row r of any batch, bitwise."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(13, 256, generator=g), torch.randn(100, 256, generator=g)
    full = _C.packed_mm_cpu(x, w)
    for r in range(13):
        assert torch.equal(_C.packed_mm_cpu(x[r:r + 1], w)[0], full[r])
    assert torch.equal(_C.packed_mm_cpu(x[3:11], w), full[3:11])


def test_packed_mm_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match=r"need float32 CPU x \[M, K\] and w \[N, K\]"):
        _C.packed_mm_cpu(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="need float32"):
        _C.packed_mm_cpu(torch.randn(2, 3).double(), torch.randn(4, 3))


@pytest.mark.parametrize("k", [0, 1, 17, 64, 127])
def test_a_prefix_of_k_reads_the_full_width_operands(k):
    """k < K: the first k terms of each sum, with x rows and packed panels at their full width."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(11, 128, generator=g), torch.randn(40, 128, generator=g)
    y = _C.packed_mm_cpu(x, w, k)
    ref = x[:, :k].double() @ w[:, :k].double().T
    assert (y.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    with pytest.raises(RuntimeError, match="exceeds K"):
        _C.packed_mm_cpu(x, w, 129)
