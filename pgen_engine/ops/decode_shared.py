"""Shared-prefix (cascade) decode attention: one query token per row over a shared prompt
prefix plus the row's own tokens, reading each shared prefix once per group of rows.

The layout is the Generator's wave cache (head-major, see
:class:`pgen_engine.models.decoder.KVCache`): a pool ``[P, Hkv, Lp, D]`` holds each distinct
prompt once (a GRPO group's prompt, the shared unconditional CFG prompt); row ``b`` reads
positions ``[0, plen_b)`` of pool row ``prefix_row[b]`` (``plen_b = min(prefix_len[b],
seqlens[b])``), then positions ``[0, seqlens[b] - plen_b)`` of its own row of ``k`` / ``v``
``[rows, Hkv, Lo, D]``. With ``B`` rows over ``P`` prompts the prefix traffic of a step is
``P * Lp`` positions instead of ``B * Lp``.

Caches may be float8 e4m3 (:mod:`pgen_engine.ops.kv_quant`): then float32 per-(row, KV head)
scales come with them, ``k_scale`` / ``v_scale`` ``[rows, Hkv]`` for the own rows and
``prefix_k_scale`` / ``prefix_v_scale`` ``[P, Hkv]`` for the pool, and the stored value ``x``
stands for ``x * scale``.

Backends: ``"triton"`` (:mod:`pgen_engine.ops._triton_decode_shared`; GPU, or the CPU
interpreter under ``TRITON_INTERPRET=1``) and ``"torch"`` (:func:`shared_prefix_decode_ref`,
which gathers the prefix per row: the readable definition, CUDA-graph safe, and the CPU path).
No host synchronisation on either.
"""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import resolve_backend
from pgen_engine.ops.kv_quant import FP8_DTYPE, dequantize

BACKENDS = ("torch", "triton")
_Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CACHE_DTYPES = (*_Q_DTYPES, FP8_DTYPE)
_KERNEL_Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256


def prefix_groups(prefix_row: torch.Tensor, num_prefixes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each pool row, as CSR: int32 ``group_ptr [P + 1]`` and ``group_rows [B]``
    (rows sorted by pool row; ``group_rows[group_ptr[p]:group_ptr[p + 1]]`` read pool row ``p``).

    No host synchronisation (sort and scatter on the device), so a captured graph can build
    them; a caller that knows the groups up front computes them once per wave.
    """
    rows = prefix_row.long()
    order = torch.argsort(rows, stable=True).to(torch.int32)
    counts = torch.zeros(num_prefixes + 1, dtype=torch.int64, device=rows.device)
    counts.index_add_(0, rows.clamp(0, num_prefixes - 1) + 1, torch.ones_like(rows))
    return counts.cumsum(0).to(torch.int32), order


def _check(q, k, v, seqlens, prefix_k, prefix_v, prefix_row, prefix_len, k_scale, v_scale,
           prefix_k_scale, prefix_v_scale) -> None:
    op = "shared_prefix_decode"
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v),
                    ("seqlens", seqlens), ("prefix_row", prefix_row), ("prefix_len", prefix_len)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {q.device} (q's device)")
    if q.dtype not in _Q_DTYPES or q.dim() != 3:
        raise ValueError(f"{op}: q must be [B,Hq,D] of {_Q_DTYPES}, got {q.dtype} {tuple(q.shape)}")
    B, hq, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] < B or k.shape[3] != d:
        raise ValueError(f"{op}: k and v must both be [rows>=B,Hkv,Lo,D] with B={B}, D={d}; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if prefix_k.dim() != 4 or prefix_k.shape != prefix_v.shape or prefix_k.shape[1] != hkv or prefix_k.shape[3] != d:
        raise ValueError(f"{op}: prefix_k and prefix_v must both be [P,Hkv,Lp,D] with Hkv={hkv}, D={d}; got "
                         f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    if prefix_k.shape[0] < 1:
        raise ValueError(f"{op}: the prefix pool is empty (P = 0); every row needs a pool row")
    if hq % hkv:
        raise ValueError(f"{op}: query heads Hq={hq} must be a multiple of KV heads Hkv={hkv}")
    for name, t in (("seqlens", seqlens), ("prefix_row", prefix_row), ("prefix_len", prefix_len)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < B:
            raise ValueError(f"{op}: {name} must be int32 [>=B]=[>={B}], got {t.dtype} {tuple(t.shape)}")
    dtypes = {k.dtype, v.dtype, prefix_k.dtype, prefix_v.dtype}
    if len(dtypes) != 1 or k.dtype not in _CACHE_DTYPES:
        raise TypeError(f"{op}: k, v, prefix_k, prefix_v must share one dtype of {_CACHE_DTYPES}, got "
                        f"{[t.dtype for t in (k, v, prefix_k, prefix_v)]}")
    scales = (k_scale, v_scale, prefix_k_scale, prefix_v_scale)
    if k.dtype == FP8_DTYPE:
        want = ((k.shape[0], hkv),) * 2 + ((prefix_k.shape[0], hkv),) * 2
        for name, s, shape in zip(("k_scale", "v_scale", "prefix_k_scale", "prefix_v_scale"), scales, want):
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != shape \
                    or s.device != q.device:
                got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"{op}: float8 caches need {name} float32 {shape} on {q.device}, got {got}")
    elif any(s is not None for s in scales):
        raise ValueError(f"{op}: scales are for float8 caches; these are {k.dtype}")


def shared_prefix_decode_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, prefix_row: torch.Tensor, prefix_len: torch.Tensor, *, scale: float | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    prefix_k_scale: torch.Tensor | None = None, prefix_v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`shared_prefix_decode` (same arguments; computed in q's dtype,
    softmax in float32). Gathers each row's prefix (so reads it once per row)."""
    _check(q, k, v, seqlens, prefix_k, prefix_v, prefix_row, prefix_len, k_scale, v_scale, prefix_k_scale,
           prefix_v_scale)
    B, hq, d = q.shape
    hkv, lo, lp = k.shape[1], k.shape[2], prefix_k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    rows = prefix_row[:B].long()
    n = seqlens[:B].long()
    plen = torch.minimum(torch.minimum(prefix_len[:B].long(), n), torch.tensor(lp, device=q.device))
    fp8 = k.dtype == FP8_DTYPE

    def read(pool: torch.Tensor, own: torch.Tensor, pool_scale, own_scale) -> torch.Tensor:
        pre, mine = pool.index_select(0, rows), own[:B]
        if fp8:  # dequantise with the scale of the row (pool row) that holds the values
            pre = dequantize(pre, pool_scale.index_select(0, rows), q.dtype)
            mine = dequantize(mine, own_scale[:B], q.dtype)
        return torch.cat([pre.to(q.dtype), mine.to(q.dtype)], dim=2)  # [B, Hkv, Lp + Lo, D]

    kk = read(prefix_k, k, prefix_k_scale, k_scale)
    vv = read(prefix_v, v, prefix_v_scale, v_scale)
    live = torch.cat([torch.arange(lp, device=q.device)[None, :] < plen[:, None],
                      torch.arange(lo, device=q.device)[None, :] < (n - plen)[:, None]], dim=1)  # [B, keys]
    # slots past a row's length hold whatever earlier calls left (NaN too): zero them, so
    # 0 * NaN cannot leak through a masked weight
    kk = kk.masked_fill(~live[:, None, :, None], 0)
    vv = vv.masked_fill(~live[:, None, :, None], 0)
    qg = q.view(B, hkv, hq // hkv, d)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax at least in float32
    s = torch.matmul(qg, kk.transpose(-1, -2)).to(work) * scale  # [B, Hkv, g, keys]
    s = s.masked_fill(~live[:, None, None, :], float("-inf"))
    anyk = live.any(-1)[:, None, None, None]
    p = torch.where(anyk, torch.softmax(torch.where(anyk, s, 0.0), dim=-1), 0.0)
    return torch.matmul(p.to(q.dtype), vv).reshape(B, hq, d)


def shared_prefix_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, prefix_row: torch.Tensor, prefix_len: torch.Tensor, *, scale: float | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    prefix_k_scale: torch.Tensor | None = None, prefix_v_scale: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "auto",
) -> torch.Tensor:
    """One new query per row over its shared prefix and its own cached tokens (module docstring).

    Args:
        q: ``[B, Hq, D]`` float32 / bfloat16 / float16 (float64: torch backend only).
        k, v: own rows ``[rows >= B, Hkv, Lo, D]``; row ``b`` uses row ``b``.
        seqlens: int32 ``[>= B]``: cached positions per row, prefix and the new token included.
        prefix_k, prefix_v: the pool ``[P, Hkv, Lp, D]`` (the caches' one dtype: q's, another
            float dtype (cast on read), or float8 e4m3 with the four scales).
        prefix_row, prefix_len: int32 ``[>= B]``: each row's pool row and prefix length.
        scale: softmax scale, default ``D ** -0.5``.
        k_scale, v_scale / prefix_k_scale, prefix_v_scale: float32 ``[rows, Hkv]`` / ``[P, Hkv]``,
            float8 caches only.
        groups: :func:`prefix_groups` of ``prefix_row[:B]`` if the caller has them (else built here).
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    Returns:
        ``[B, Hq, D]`` in q's dtype; a row with ``seqlens == 0`` gets zeros.
    """
    _check(q, k, v, seqlens, prefix_k, prefix_v, prefix_row, prefix_len, k_scale, v_scale, prefix_k_scale,
           prefix_v_scale)
    impl = resolve_backend(backend, q.device, BACKENDS, "shared_prefix_decode")
    kw = dict(scale=scale, k_scale=k_scale, v_scale=v_scale, prefix_k_scale=prefix_k_scale,
              prefix_v_scale=prefix_v_scale)
    if impl == "torch":
        return shared_prefix_decode_ref(q, k, v, seqlens, prefix_k, prefix_v, prefix_row, prefix_len, **kw)
    if q.dtype not in _KERNEL_Q_DTYPES or q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"shared_prefix_decode: the kernel takes q of {_KERNEL_Q_DTYPES} with D <= "
                         f"{_MAX_HEAD_DIM}, got {q.dtype} D={q.shape[-1]} (use backend='torch')")
    if any(t.stride(-1) != 1 for t in (k, v, prefix_k, prefix_v)):
        raise ValueError("shared_prefix_decode: caches must be contiguous in the head dim (stride(-1) == 1)")
    from pgen_engine.ops import _triton_decode_shared  # late import: triton is optional (extra 'kernels')

    B = q.shape[0]
    group_ptr, group_rows = groups if groups is not None else prefix_groups(prefix_row[:B], prefix_k.shape[0])
    q = q if q.stride(-1) == 1 else q.contiguous()
    return _triton_decode_shared.decode_shared(
        q, k, v, seqlens, prefix_k, prefix_v, prefix_len, group_ptr, group_rows,
        q.shape[-1] ** -0.5 if scale is None else float(scale), k_scale, v_scale, prefix_k_scale, prefix_v_scale)


__all__ = ["prefix_groups", "shared_prefix_decode", "shared_prefix_decode_ref"]
