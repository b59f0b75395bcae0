"""GPU benchmarks of the attention ops; ``run(check_only)`` returns one dict per row.

Rows: ``op, shape, backend, ms, tflops|gbps, pct_of_ref``.
  * prefill fwd/bwd (causal, bf16, head dim 64 and 128, 2k-8k tokens): our Triton kernel and
    the references (torch SDPA flash / cuDNN backends, flash-attn / xformers when importable);
    ``pct_of_ref`` on our row = best reference time / our time * 100 (200 = twice as fast),
    on a reference row = 100.
  * decode (paged, batch 64-512, 1k-4k cached tokens): achieved HBM GB/s from the K/V bytes
    read; ``pct_of_ref`` = percent of a measured device-to-device copy bandwidth.
In check mode (or without CUDA) shapes are tiny and everything runs on CPU with the torch
backend (plus Triton when ``TRITON_INTERPRET=1``), only to prove the suite's code paths work.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

from pgen_engine.ops.attention import decode_attention, prefill_attention


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Mean milliseconds per call after one warm-up call (CUDA events on GPU)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def _prefill_flops(batch: int, seq: int, heads: int, dim: int, causal: bool, backward: bool) -> float:
    flops = 4.0 * batch * seq * seq * heads * dim  # QK^T and PV, 2 flops per MAC
    if causal:
        flops /= 2
    return flops * (2.5 if backward else 1.0)  # bwd: 5 matmuls vs 2


def _sdpa_refs(device: torch.device) -> dict[str, Callable]:
    """Reference prefill implementations available here, each f(q, k, v) with [B,S,H,D] inputs."""
    refs: dict[str, Callable] = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                              ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def f(q, k, v, _b=backend):
                with sdpa_kernel(_b):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                    ).transpose(1, 2)
            refs[name] = f
        try:
            from flash_attn import flash_attn_func  # type: ignore[import-not-found]

            refs["flash_attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
        except ImportError:
            pass
        try:
            import xformers.ops as xops  # type: ignore[import-not-found]

            refs["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
                q, k, v, attn_bias=xops.LowerTriangularMask()
            )
        except ImportError:
            pass
    else:
        refs["sdpa_math"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2)
    return refs


def _prefill_rows(device: torch.device, ours: list[str], check_only: bool, reps: int) -> list[dict]:
    rows: list[dict] = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(1, 2048, 16, 64), (1, 8192, 16, 64), (1, 2048, 16, 128), (1, 8192, 16, 128)]
    if check_only:
        shapes = [(1, 64, 2, 32)]
    refs = _sdpa_refs(device)
    for batch, seq, heads, dim in shapes:
        shape = f"B{batch} S{seq} H{heads} D{dim} causal {str(dtype)[6:]}"
        q, k, v = (torch.randn(batch, seq, heads, dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        for phase in ("fwd", "bwd"):
            bwd = phase == "bwd"
            flops = _prefill_flops(batch, seq, heads, dim, True, bwd)
            timings: dict[str, float] = {}
            for name, fn in [*((f"pgen_{b}", lambda q, k, v, _b=b: prefill_attention(q, k, v, backend=_b))
                               for b in ours), *refs.items()]:
                try:
                    if bwd:
                        out = fn(q, k, v)

                        def step(out=out):
                            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                    else:
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(q, k, v)
                    timings[name] = _time_ms(step, device, reps)
                except RuntimeError as e:  # e.g. an SDPA backend not supporting this shape/GPU
                    if "out of memory" in str(e).lower():
                        raise
                    print(f"note: {name} prefill {phase} {shape}: {str(e).splitlines()[0][:120]}")
            best_ref = min((t for n, t in timings.items() if not n.startswith("pgen_")), default=None)
            for name, ms in timings.items():
                pct = 100.0 if not name.startswith("pgen_") or best_ref is None else best_ref / ms * 100
                rows.append({"op": f"prefill_attention_{phase}", "shape": shape, "backend": name,
                             "ms": ms, "tflops": flops / ms / 1e9, "pct_of_ref": pct})
    return rows


def _copy_gbps(device: torch.device, reps: int) -> tuple[float, float]:
    """(ms, GB/s) of a device-to-device copy; GB/s counts read + write bytes."""
    n = (1 << 28) if device.type == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps)
    return ms, 2 * n / ms / 1e6


def _decode_rows(device: torch.device, ours: list[str], check_only: bool, reps: int) -> list[dict]:
    rows: list[dict] = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_ms, copy_gbps = _copy_gbps(device, reps)
    rows.append({"op": "memcpy_d2d", "shape": "256 MiB" if device.type == "cuda" else "1 MiB",
                 "backend": "torch", "ms": copy_ms, "gbps": copy_gbps, "pct_of_ref": 100.0})
    # (batch, cached tokens, Hq, Hkv, D, block_size)
    shapes = [(64, 1024, 16, 16, 128, 16), (256, 2048, 16, 16, 128, 16), (512, 4096, 16, 4, 128, 16),
              (256, 4096, 32, 8, 64, 16)]
    if check_only:
        shapes = [(3, 40, 4, 2, 32, 8)]
    for batch, ctx, hq, hkv, dim, bs in shapes:
        blocks_per_row = -(-ctx // bs)
        n_blocks = batch * blocks_per_row
        k_cache = torch.randn(n_blocks, bs, hkv, dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(n_blocks, device=device).to(torch.int32).view(batch, blocks_per_row)
        seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, hq, dim, device=device, dtype=dtype)
        kv_bytes = 2 * batch * ctx * hkv * dim * k_cache.element_size()
        shape = f"B{batch} ctx{ctx} Hq{hq} Hkv{hkv} D{dim} bs{bs} {str(dtype)[6:]}"
        for backend in ours:
            # the caches bound as defaults: the loop deletes them after its last use
            ms = _time_ms(lambda b=backend, k=k_cache, v=v_cache: decode_attention(
                q, k, v, seqlens, block_table=table, backend=b), device, reps)
            gbps = kv_bytes / ms / 1e6
            rows.append({"op": "decode_attention_paged", "shape": shape, "backend": f"pgen_{backend}",
                         "ms": ms, "gbps": gbps, "pct_of_ref": gbps / copy_gbps * 100})
        del k_cache, v_cache
    return rows


def run(check_only: bool) -> list[dict]:
    """Run the attention benchmarks; tiny CPU shapes when ``check_only`` or without CUDA."""
    cuda = torch.cuda.is_available() and not check_only
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        ours = ["triton"]
    else:
        ours = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    reps = 10 if cuda else 1
    torch.manual_seed(0)
    return _prefill_rows(device, ours, not cuda, reps) + _decode_rows(device, ours, not cuda, reps)


if __name__ == "__main__":
    import json

    for row in run(check_only=not torch.cuda.is_available()):
        print(json.dumps(row))
