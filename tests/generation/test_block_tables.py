"""Block tables over the wave cache: the paged torch reference decode equals the cascade
reference on the contiguous layout (trivial tables) and on shuffled, shared pages of random
geometries; bad tables get clear errors."""
from __future__ import annotations

import time

import pytest
import torch

from pgen_engine.generation.block_tables import BlockTables, contiguous_tables, paged_decode_reference
from pgen_engine.models import op_dispatch as K
from pgen_engine.ops._backend import extension


def _wave(g: torch.Generator, rows: int, P: int, Lp: int, Lo: int, hq: int, hkv: int, d: int):
    """A random cascade cache: pool [P, Hkv, Lp, D], own rows [rows, Hkv, Lo, D], prefix tables, lengths."""
    pk, pv = torch.randn(P, hkv, Lp, d, generator=g), torch.randn(P, hkv, Lp, d, generator=g)
    k, v = torch.randn(rows, hkv, Lo, d, generator=g), torch.randn(rows, hkv, Lo, d, generator=g)
    prow = torch.randint(0, P, (rows,), generator=g, dtype=torch.int32)
    plen = torch.randint(1, Lp + 1, (rows,), generator=g, dtype=torch.int32)
    own = torch.randint(1, Lo + 1, (rows,), generator=g)
    seqlens = (plen.long() + own).to(torch.int32)
    q = torch.randn(rows, hq, d, generator=g)
    return q, k, v, pk, pv, prow, plen, seqlens


def _paginate(x: torch.Tensor, bs: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, Hkv, L, D] rows -> (pages [N, Hkv, bs, D] in a shuffled order, table int32 [R, ceil(L / bs)]).
    The same generator state gives the same page order (K and V share their tables)."""
    R, hkv, L, d = x.shape
    n = -(-L // bs)
    padded = torch.full((R, hkv, n * bs, d), float("nan"))  # never read: past every row's length
    padded[:, :, :L] = x
    pages = padded.view(R, hkv, n, bs, d).permute(0, 2, 1, 3, 4).reshape(R * n, hkv, bs, d)
    perm = torch.randperm(R * n, generator=g)
    where = torch.empty_like(perm)
    where[perm] = torch.arange(R * n)
    return pages[perm].contiguous(), where.view(R, n).to(torch.int32)


@pytest.mark.parametrize("seed", range(6))
def test_paged_reference_matches_the_cascade_reference_on_hidden_shapes(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    hkv = int(torch.randint(1, 4, (1,), generator=g))
    hq = hkv * int(torch.randint(1, 4, (1,), generator=g))
    d = int(torch.randint(1, 9, (1,), generator=g)) * 4
    rows, P = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    Lp, Lo = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
    q, k, v, pk, pv, prow, plen, seqlens = _wave(g, rows, P, Lp, Lo, hq, hkv, d)
    scale = d ** -0.5
    want = K._cached_attention_head_major(q, k, v, seqlens, scale, prow, plen, pk, pv)

    # the contiguous wave cache is the trivial table: bitwise the same math
    trivial = paged_decode_reference(q, k, v, pk, pv, contiguous_tables(prow, plen), seqlens, scale)
    torch.testing.assert_close(trivial, want, rtol=1e-5, atol=1e-5)

    # the same K/V in shuffled pages of a random block size, prompt pages shared by their rows
    bs = int(torch.randint(1, 9, (1,), generator=g))
    state = g.get_state()
    pkp, ptab = _paginate(pk, bs, g)
    pvp, _ = _paginate(pv, bs, g.set_state(state))
    state = g.get_state()
    kop, otab = _paginate(k, bs, g)
    vop, _ = _paginate(v, bs, g.set_state(state))
    tables = BlockTables(prefix_table=ptab[prow.long()], prefix_len=plen, own_table=otab)
    got = paged_decode_reference(q, kop, vop, pkp, pvp, tables, seqlens, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()  # NaN-filled page tails are never read


def test_bad_tables_get_clear_errors():
    t = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="prefix_len shape"):
        BlockTables(prefix_table=t, prefix_len=torch.zeros(2, dtype=torch.int32), own_table=t)
    with pytest.raises(ValueError, match="own_table must be an integer"):
        BlockTables(prefix_table=t, prefix_len=torch.zeros(3, dtype=torch.int32), own_table=t.float())
    q = torch.randn(4, 2, 8)
    pages = torch.randn(5, 2, 4, 8)
    ok = BlockTables(prefix_table=t, prefix_len=torch.ones(3, dtype=torch.int32), own_table=t)
    with pytest.raises(ValueError, match="tables cover 3 rows, q has 4"):
        paged_decode_reference(q, pages, pages, pages, pages, ok, torch.ones(4, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode_reference(q[:3], pages[:, :, :, :4], pages, pages, pages, ok, torch.ones(3), 1.0)


@pytest.mark.skipif(not hasattr(extension(), "cached_attention_cpu"), reason="pgen_engine._C not built")
def test_contiguous_cpu_kernel_is_the_faster_path():
    """The number quoted in block_tables' docstring: the C++ contiguous cascade kernel vs the paged
    torch reference (trivial tables) at the CPU benchmark's geometry, one layer-step; the C++
    kernel must stay faster for the CPU path to keep it."""
    g = torch.Generator().manual_seed(0)
    q, k, v, pk, pv, prow, plen, seqlens = _wave(g, 64, 9, 128, 64, 4, 4, 64)
    plen.fill_(128)
    seqlens = (plen + 63).to(torch.int32)
    tables = contiguous_tables(prow, plen)
    ext = extension()

    def best(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    with torch.inference_mode():
        cpp = best(lambda: ext.cached_attention_cpu(q, k, v, seqlens, pk, pv, prow, plen, 0.125))
        ref = best(lambda: paged_decode_reference(q, k, v, pk, pv, tables, seqlens, 0.125))
        a = ext.cached_attention_cpu(q, k, v, seqlens, pk, pv, prow, plen, 0.125)
        b = paged_decode_reference(q, k, v, pk, pv, tables, seqlens, 0.125)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print(f"\ncascade attention, 64 rows x 4 heads x 64, prefix 128 + own 63: C++ contiguous {cpp * 1e3:.3f} ms, "
          f"paged torch reference {ref * 1e3:.3f} ms ({ref / cpp:.1f}x)")
    assert cpp < ref
