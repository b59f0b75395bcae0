"""A wave's KV segments as block tables, and the torch reference decode attention over them.

The wave cache (:class:`~pgen_engine.models.decoder.KVCache`, cascade layout) has two
segments per row: a shared prefix (its prompt's pool row, ``prefix_len`` positions) and its own
image tokens. Both are expressed here as pages of a head-major page pool ``[N, Hkv, BS, D]``:
row ``b`` reads prefix position ``p`` from page ``prefix_table[b, p // BSp]`` at offset
``p % BSp`` of the prefix pool, and own position ``p`` likewise from ``own_table`` in the own
pool. A contiguous row is the trivial table: one page per pool row (``BSp = Lp``) and one per
own row (``BSo = Lo``), which is exactly the Generator's wave storage
(:func:`contiguous_tables`). Pages may be shared by any number of rows (a GRPO group's prompt,
the shared unconditional prompt): sharing is just equal table entries.

:func:`paged_decode_reference` is the readable definition (torch, no host synchronisation,
``seqlens >= 1``). The decode backends keep their contiguous kernels: on CPU the C++ cascade
attention (``_C.cached_attention_cpu``) was 19.9x faster than this gather-based reference on
the trivial tables (64 rows, 4 heads of 64, 128-token prefixes + 63 own tokens, one layer-step:
39.7 ms vs 788.6 ms, both inflated by a 2-core VM at load 12; 2026-12-06,
``pytest -s tests/generation/test_block_tables.py`` prints it), so the CPU path stays contiguous.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class BlockTables:
    """Where each of ``rows`` cache rows keeps its K/V (see the module docstring).

    ``prefix_table`` int32 ``[rows, max prefix pages]`` and ``own_table`` int32
    ``[rows, max own pages]`` hold page ids (entries past a row's length are never read; -1 is
    allowed there); ``prefix_len`` int32 ``[rows]`` is each row's shared-prefix length.
    """

    prefix_table: torch.Tensor
    prefix_len: torch.Tensor
    own_table: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("prefix_table", "own_table"):
            t = getattr(self, name)
            if t.dim() != 2 or t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"BlockTables.{name} must be an integer [rows, pages] tensor, got {t.dtype} "
                                 f"{tuple(t.shape)}")
        rows = self.prefix_table.shape[0]
        if self.own_table.shape[0] != rows or tuple(self.prefix_len.shape) != (rows,):
            raise ValueError(f"BlockTables: prefix_table has {rows} rows, own_table {self.own_table.shape[0]}, "
                             f"prefix_len shape {tuple(self.prefix_len.shape)} (expected [{rows}])")


def contiguous_tables(prefix_row: torch.Tensor, prefix_len: torch.Tensor) -> BlockTables:
    """The Generator's contiguous wave cache as trivial tables: row ``b`` reads pool row
    ``prefix_row[b]`` (one page of ``Lp`` positions) and own row ``b`` (one page of ``Lo``)."""
    rows = prefix_row.shape[0]
    own = torch.arange(rows, dtype=torch.int32, device=prefix_row.device)[:, None]
    return BlockTables(prefix_table=prefix_row.to(torch.int32)[:, None], prefix_len=prefix_len.to(torch.int32),
                       own_table=own)


def _gather(pages: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """pages ``[N, Hkv, BS, D]``, table ``[B, n]`` -> the rows' keys ``[B, Hkv, n * BS, D]``."""
    B, n = table.shape
    _, hkv, bs, d = pages.shape
    g = pages.index_select(0, table.reshape(-1).long().clamp(min=0))  # -1 entries are never read (masked)
    return g.view(B, n, hkv, bs, d).permute(0, 2, 1, 3, 4).reshape(B, hkv, n * bs, d)


def paged_decode_reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           prefix_k_pages: torch.Tensor, prefix_v_pages: torch.Tensor, tables: BlockTables,
                           seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row over its shared prefix and own tokens, read through block tables.

    q ``[B, Hq, D]``; own pages ``k_pages`` / ``v_pages`` ``[NO, Hkv, BSo, D]``; prefix pages
    ``[NP, Hkv, BSp, D]``; ``tables`` for (at least) the ``B`` rows; seqlens int ``[B]``: keys
    per row including the new token (row ``b`` reads ``min(prefix_len[b], seqlens[b])`` prefix
    positions, then the rest from its own pages) -> ``[B, Hq, D]`` in ``q.dtype`` (pages of
    another dtype are cast on read). Positions past a row's length are masked, and their
    values zeroed (they may hold NaN from an earlier call). No host synchronisation.
    """
    B, Hq, D = q.shape
    hkv = k_pages.shape[1]
    if q.dim() != 3 or k_pages.dim() != 4 or prefix_k_pages.dim() != 4 or Hq % hkv or k_pages.shape[3] != D:
        raise ValueError(f"paged_decode_reference: q must be [B, Hq, D] and pages [N, Hkv, BS, D] with Hq a "
                         f"multiple of Hkv, got q {tuple(q.shape)}, k_pages {tuple(k_pages.shape)}, prefix_k_pages "
                         f"{tuple(prefix_k_pages.shape)}")
    if tables.prefix_table.shape[0] < B:
        raise ValueError(f"paged_decode_reference: tables cover {tables.prefix_table.shape[0]} rows, q has {B}")
    n = seqlens[:B].long()
    plen = torch.minimum(tables.prefix_len[:B].long(), n)
    kp, vp = _gather(prefix_k_pages, tables.prefix_table[:B]), _gather(prefix_v_pages, tables.prefix_table[:B])
    ko, vo = _gather(k_pages, tables.own_table[:B]), _gather(v_pages, tables.own_table[:B])
    k = torch.cat([kp.to(q.dtype), ko.to(q.dtype)], dim=2)
    v = torch.cat([vp.to(q.dtype), vo.to(q.dtype)], dim=2)
    ar_p = torch.arange(kp.shape[2], device=q.device)[None, :]
    ar_o = torch.arange(ko.shape[2], device=q.device)[None, :]
    live = torch.cat([ar_p < plen[:, None], ar_o < (n - plen)[:, None]], dim=1)  # [B, keys]
    qg = q.view(B, hkv, Hq // hkv, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, group, keys]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    v = v.masked_fill(~live[:, None, :, None], 0)
    return torch.matmul(p, v).view(B, Hq, D)
