"""GPU benchmarks of the non-attention ops; ``run(check_only)`` returns one dict per row.

Rows: ``op, shape, backend, ms, gbps|tflops, pct_of_ref`` where ``pct_of_ref`` is the reference
time as a percentage of ours (200 = twice as fast). In check mode (or without CUDA) shapes are
tiny and everything runs on CPU, only to prove the suite works.
"""
from __future__ import annotations

import time

import torch

from pgen_engine.ops.logprobs import token_logprobs
from pgen_engine.ops.norm import rms_norm
from pgen_engine.ops.rotary import apply_rotary
from pgen_engine.ops.sampling import sample


def _time_ms(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def _sort_sampler(c, u, s, p, seeds):
    """Sort-based torch path the kernel is compared with (the usual CFG + top-p recipe)."""
    x = u + s * (c.float() - u.float())
    probs = torch.softmax(x, -1)
    sp, si = probs.sort(-1, descending=True)
    cs = sp.cumsum(-1)
    sp = sp.masked_fill(cs - sp > p, 0.0)
    pick = torch.multinomial(sp, 1)
    return si.gather(1, pick).squeeze(1)


def _peak(fn) -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(check_only: bool) -> list[dict]:
    """Run the op benchmarks; tiny CPU shapes when ``check_only`` or without CUDA."""
    cuda = torch.cuda.is_available() and not check_only
    dev = torch.device("cuda" if cuda else "cpu")
    be = "auto" if cuda else "torch"
    reps = 20 if cuda else 1
    B, V = (512, 16384) if cuda else (4, 257)
    rows: list[dict] = []

    c = torch.randn(B, V, device=dev, dtype=torch.bfloat16)
    u = torch.randn(B, V, device=dev, dtype=torch.bfloat16)
    seeds = torch.arange(B, device=dev, dtype=torch.int64)
    ours = _time_ms(lambda: sample(c, uncond_logits=u, guidance_scale=5.0, top_p=0.9, seed=seeds, backend=be), reps)
    ref = _time_ms(lambda: _sort_sampler(c, u, 5.0, 0.9, seeds), reps)
    rows.append(dict(op="sample_cfg_topp", shape=f"B={B},V={V}", backend=be, ms=ours,
                     gbps=2 * c.numel() * 2 / ours / 1e6, pct_of_ref=100 * ref / ours))

    N, H, Vh = (65536, 2048, 16384) if cuda else (64, 40, 257)
    h = torch.randn(N, H, device=dev, dtype=torch.bfloat16) * 0.1
    w = torch.randn(Vh, H, device=dev, dtype=torch.bfloat16) * 0.02
    t = torch.randint(0, Vh, (N,), device=dev)

    def naive():
        return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])

    ours = _time_ms(lambda: token_logprobs(h, w, t, backend=be), reps)
    ref = _time_ms(naive, reps)
    mem_ours, mem_ref = _peak(lambda: token_logprobs(h, w, t, backend=be)), _peak(naive)
    rows.append(dict(op="token_logprobs_fwd", shape=f"N={N},H={H},V={Vh}", backend=be, ms=ours,
                     tflops=2 * N * H * Vh / ours / 1e9, pct_of_ref=100 * ref / ours,
                     peak_mem_mib=mem_ours / 2 ** 20, ref_peak_mem_mib=mem_ref / 2 ** 20))

    R, D = (65536, 2048) if cuda else (33, 40)
    x = torch.randn(R, D, device=dev, dtype=torch.bfloat16)
    wn = torch.randn(D, device=dev, dtype=torch.bfloat16)
    ours = _time_ms(lambda: rms_norm(x, wn, 1e-6, backend=be), reps)
    ref = _time_ms(lambda: rms_norm(x, wn, 1e-6, backend="torch"), reps)
    rows.append(dict(op="rms_norm", shape=f"R={R},D={D}", backend=be, ms=ours,
                     gbps=2 * x.numel() * 2 / ours / 1e6, pct_of_ref=100 * ref / ours))

    T, NH, HD = (16384, 16, 128) if cuda else (9, 3, 16)
    q = torch.randn(T, NH, HD, device=dev, dtype=torch.bfloat16)
    cs, sn = torch.randn(T, HD, device=dev), torch.randn(T, HD, device=dev)
    ours = _time_ms(lambda: apply_rotary(q, cs, sn, backend=be), reps)
    ref = _time_ms(lambda: apply_rotary(q, cs, sn, backend="torch"), reps)
    rows.append(dict(op="apply_rotary", shape=f"T={T},H={NH},D={HD}", backend=be, ms=ours,
                     gbps=2 * q.numel() * 2 / ours / 1e6, pct_of_ref=100 * ref / ours))
    return rows
