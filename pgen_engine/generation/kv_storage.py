"""The Generator's KV storage: flat per-layer buffers that each wave carves into its cache.

Per layer one K and one V buffer ``[tokens, Hkv, D]``. A wave views the first
``P * Lp`` positions as its shared-prefix pool ``[P, Hkv, Lp, D]`` and the next
``rows * Lo`` as its rows' own image tokens ``[rows, Hkv, Lo, D]`` (head-major, the
:class:`~pgen_engine.models.decoder.KVCache` wave layout; sizes from
:class:`~pgen_engine.generation.waves.WaveGeometry`). The buffers grow to the largest wave a
call needs (never shrink on their own) and :meth:`WaveKVStorage.release` frees them.

A float8 storage (:mod:`pgen_engine.ops.kv_quant`) keeps float32 per-(row, KV head) scales
beside it, in a :class:`~pgen_engine.ops.kv_quant.ScaleStore` at fixed addresses (captured
graphs read them): pool rows from 0, own rows from the store's half; a wave's views are zeroed
(unset) when it starts, the prefill and the first decode write set them.
"""
from __future__ import annotations

from typing import Callable

import torch

from pgen_engine.models.decoder import KVCache
from pgen_engine.ops import kv_quant
from pgen_engine.ops.decode_shared import prefix_groups

from .waves import WaveGeometry


class WaveKVStorage:
    """Flat K/V buffers of ``num_layers`` layers, ``kv_shape = (Hkv, D)`` per position.

    ``on_move`` is called whenever the buffers (or the fixed prefix-table buffers) are
    reallocated: anything holding their addresses (captured CUDA graphs) must be dropped.
    """

    def __init__(self, num_layers: int, kv_shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 on_move: Callable[[], None]):
        self.num_layers, self.kv_shape, self.dtype, self.device = num_layers, kv_shape, dtype, device
        self._on_move = on_move
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._prow: torch.Tensor | None = None  # int32 prefix tables at fixed addresses (graphs read them)
        self._plen: torch.Tensor | None = None
        # the rows of each pool row (CSR, prefix_groups), built once per wave instead of per layer and step
        self._gptr: torch.Tensor | None = None
        self._grows: torch.Tensor | None = None
        self.scales: kv_quant.ScaleStore | None = None  # float8 only; 2 x the prefix tables' rows

    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def token_bytes(self) -> int:
        """Bytes of K and V for one position across all layers."""
        hkv, d = self.kv_shape
        return 2 * self.num_layers * hkv * d * torch.empty((), dtype=self.dtype).element_size()

    def grow(self, tokens: int) -> None:
        """Hold at least ``tokens`` positions per layer (contents lost when it reallocates)."""
        if self.k and self.k[0].shape[0] >= tokens:
            return
        self._on_move()
        self.k, self.v = [], []  # free first: peak = the new storage, not old + new
        shape = (tokens, *self.kv_shape)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def release(self) -> None:
        """Free the buffers; the next :meth:`grow` allocates again."""
        self._on_move()
        self.k, self.v = [], []

    def view(self, rows: int, L: int) -> KVCache:
        """A plain head-major ``[rows, Hkv, L, D]`` cache (no shared prefixes: row ``b`` holds
        positions from 0), grown as needed; for tests and direct decode-loop callers."""
        self.grow(rows * L)
        hkv, d = self.kv_shape
        n = rows * L
        sc = {}
        if kv_quant.is_fp8(self.dtype):
            ks, vs = self._scale_store(rows).views(0, rows)
            sc = dict(k_scale=ks, v_scale=vs)
        return KVCache(k=[k[:n].view(rows, hkv, L, d) for k in self.k],
                       v=[v[:n].view(rows, hkv, L, d) for v in self.v], layout="bhsd", **sc)

    def _scale_store(self, rows: int) -> kv_quant.ScaleStore:
        """The float8 scale tables, (re)allocated for ``rows`` own rows and as many pool rows (a
        wave's pool never has more rows than its cache: one per item and distinct uncond prompt)."""
        if self.scales is None or self.scales.capacity < 2 * rows:
            self._on_move()
            self.scales = kv_quant.ScaleStore(self.num_layers, 2 * rows, self.kv_shape[0], self.device)
        return self.scales

    def wave_cache(self, g: WaveGeometry, prefix_row: list[int], prefix_len: list[int], min_rows: int) -> KVCache:
        """The wave's cache: pool ``[P, Hkv, Lp, D]`` then own rows ``[rows, Hkv, Lo, D]``, with
        row ``b`` reading ``prefix_len[b]`` positions of pool row ``prefix_row[b]``. The buffers
        must already hold ``g.tokens`` positions (:meth:`grow`); the prefix tables live in
        buffers of at least ``min_rows`` rows, reallocated only when a wave has more."""
        hkv, d = self.kv_shape
        n_pool, n_own = g.P * g.Lp, g.rows * g.Lo
        if self.k[0].shape[0] < n_pool + n_own:
            raise ValueError(f"WaveKVStorage: a wave of {n_pool + n_own} positions over storage of "
                             f"{self.k[0].shape[0]} (call grow first)")
        need = max(g.rows, min_rows)
        if self._prow is None or self._prow.shape[0] < need:
            self._on_move()
            self._prow = torch.zeros(need, dtype=torch.int32, device=self.device)
            self._plen = torch.zeros(need, dtype=torch.int32, device=self.device)
            self._gptr = torch.zeros(need + 1, dtype=torch.int32, device=self.device)  # P <= rows
            self._grows = torch.zeros(need, dtype=torch.int32, device=self.device)
        self._prow[:g.rows].copy_(torch.tensor(prefix_row, dtype=torch.int32))
        self._plen[:g.rows].copy_(torch.tensor(prefix_len, dtype=torch.int32))
        gptr, grows = prefix_groups(self._prow[:g.rows], g.P)
        self._gptr[:g.P + 1].copy_(gptr)
        self._grows[:g.rows].copy_(grows)
        sc = {}
        if kv_quant.is_fp8(self.dtype):
            half = self._prow.shape[0]
            store = self._scale_store(half)
            (pks, pvs), (ks, vs) = store.views(0, g.P), store.views(store.capacity // 2, g.rows)
            sc = dict(k_scale=ks, v_scale=vs, prefix_k_scale=pks, prefix_v_scale=pvs)
        return KVCache(k=[k[n_pool:n_pool + n_own].view(g.rows, hkv, g.Lo, d) for k in self.k],
                       v=[v[n_pool:n_pool + n_own].view(g.rows, hkv, g.Lo, d) for v in self.v], layout="bhsd",
                       prefix_k=[k[:n_pool].view(g.P, hkv, g.Lp, d) for k in self.k],
                       prefix_v=[v[:n_pool].view(g.P, hkv, g.Lp, d) for v in self.v],
                       prefix_row=self._prow[:g.rows], prefix_len=self._plen[:g.rows],
                       prefix_groups=(self._gptr[:g.P + 1], self._grows[:g.rows]), **sc)
