"""WaveKVStorage: the wave's cascade cache views and its per-wave prefix groups."""
from __future__ import annotations

import torch

from pgen_engine.generation.kv_storage import WaveKVStorage
from pgen_engine.generation.waves import WaveGeometry


def _geometry(pc: int, n_uncond: int, rows: int) -> WaveGeometry:
    return WaveGeometry(Pc=pc, ukeys=tuple((i,) for i in range(n_uncond)), item_uncond=(), Lp=3,
                        R=rows // 2, rows=rows, Lo=2)


def _check_groups(cache, prefix_row: list[int], P: int) -> None:
    gptr, grows = cache.prefix_groups
    assert gptr.shape == (P + 1,) and grows.shape == (len(prefix_row),)
    assert int(gptr[0]) == 0 and int(gptr[-1]) == len(prefix_row)
    for p in range(P):
        members = sorted(grows[int(gptr[p]):int(gptr[p + 1])].tolist())
        assert members == [b for b, r in enumerate(prefix_row) if r == p], p


def test_wave_cache_groups_rows_by_prefix_row_at_fixed_addresses():
    moves = []
    st = WaveKVStorage(2, (2, 4), torch.float32, torch.device("cpu"), on_move=lambda: moves.append(1))
    g1 = _geometry(pc=2, n_uncond=1, rows=8)
    st.grow(g1.P * g1.Lp + g1.rows * g1.Lo)
    row1 = [1, 0, 1, 0, 2, 2, 2, 2]  # interleaved samples, then the CFG partners on one uncond prefix
    c1 = st.wave_cache(g1, row1, [3] * 8, min_rows=8)
    _check_groups(c1, row1, g1.P)
    ptrs = (c1.prefix_groups[0].data_ptr(), c1.prefix_groups[1].data_ptr())
    n_moves = len(moves)

    # a smaller next wave with other groups: new contents, same addresses (captured graphs read them)
    g2 = _geometry(pc=3, n_uncond=1, rows=6)
    row2 = [2, 1, 0, 3, 3, 3]
    c2 = st.wave_cache(g2, row2, [2] * 6, min_rows=8)
    _check_groups(c2, row2, g2.P)
    assert (c2.prefix_groups[0].data_ptr(), c2.prefix_groups[1].data_ptr()) == ptrs
    assert len(moves) == n_moves
