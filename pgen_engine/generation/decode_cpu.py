"""A wave's whole decode loop in C++ on CPU (``pgen_engine._C.decode_loop_cpu``).

On CPU the decode step of a small model costs a few hundred microseconds, and the Python loop
around it (embedding, rotary tables, head, CFG mix, sampling: about 30 eager ops) costs as
much again. :func:`run_decode_loop` hands the whole loop to C++: one call runs every step, each
thread owning a group of conditional rows and their unconditional partners, with no host-side
work or synchronisation between steps. The ops are those of the Python loop (the layer stack
of :func:`pgen_engine.generation.layers_cpu.decode_layers_cpu`, ATen for the embedding / aligner /
head / log-probs, the C++ sampler of :func:`pgen_engine.ops.sample`), so the codes match the
eager and static decode modes. ``PGEN_CPU_DECODE=0`` turns it off (with the C++ layer stack).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from pgen_engine import envs
from pgen_engine.ops._backend import extension
from pgen_engine.ops.sampling import clamp_to_float32

from . import layers_cpu
from .waves import LOGPROB_DISTRIBUTIONS

# activation names the C++ loop applies (transformers' ACT2FN names with an ATen equivalent)
SUPPORTED_ACTS = ("gelu", "gelu_pytorch_tanh", "silu", "swish", "relu")


# the loop of an extension built from older sources reads shared prefixes from its own cache,
# or writes conditional log-probs only: checked once, at import (the bound signature names its
# arguments); such a build runs the Python loop over the C++ step instead (rebuild: setup.py)
_LOOP_DOC = getattr(extension(), "decode_loop_cpu", None).__doc__ or ""
_LOOP_IS_CURRENT = "prefix_k" in _LOOP_DOC and "lp_guided" in _LOOP_DOC and "team" in _LOOP_DOC


def applies(model, cache) -> bool:
    """True when :func:`run_decode_loop` can decode ``model`` over ``cache`` here: float32 CPU
    model and head-major cache, no gradients, the extension built with the loop, and an
    aligner / head whose activations the loop knows."""
    lm = model.language_model
    if model.device.type != "cpu" or model.dtype != torch.float32 or cache.k[0].dtype != torch.float32:
        return False
    if cache.prefix_k is not None and cache.prefix_k[0].dtype != torch.float32:
        return False
    probe = torch.empty(0, dtype=torch.float32)
    if not layers_cpu.cpu_decode_applies(lm, probe, cache):
        return False
    ext = extension()
    if not hasattr(ext, "decode_loop_cpu") or not _LOOP_IS_CURRENT:
        return False
    if any(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled():
        return False
    return (model.generation_aligner.act_name in SUPPORTED_ACTS
            and model.generation_head.act_name in SUPPORTED_ACTS)


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache cpu0 reports (sysfs), or 32 MiB when it is unknown."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (idx / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        digits = txt.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 << 20


def rows_per_pass(model, cache, cfg: bool, T: int) -> int:
    """Conditional rows each thread decodes at once (all steps, then its next rows).

    The K/V every thread reads per step should stay within a quarter of the last-level cache
    (which other processes share): past that, attention streams the cache from DRAM each step
    (up to 1.5x slower decode on a 2-core VM with 32 MiB L3 at batch 32). Small passes cost
    little: the packed GEMM runs 4+ rows (2 conditional rows and their partners) at full
    rate. But each pass-step reads every weight once, so when the weights alone exceed that
    budget (Janus-Pro's 16384-code head), one pass. ``PGEN_ROWS_PER_PASS`` overrides (0 = all
    of a thread's rows in one pass).
    """
    forced = envs.get("PGEN_ROWS_PER_PASS")
    if forced is not None:
        return forced
    budget = last_level_cache_bytes() // 4
    # every pass-step reads all weights once: when they do not fit the budget anyway, more
    # passes only re-stream them (a 16384-code head is 16 MiB), so all rows go at once
    weight_bytes = sum(p.numel() * p.element_size() for p in (*model.language_model.layers.parameters(),
                                                               *model.generation_head.parameters()))
    if weight_bytes > budget:
        return 0
    cfg_t = model.language_model.cfg
    L = cache.k[0].shape[2]
    per_pos = cfg_t.num_layers * cfg_t.num_kv_heads * cfg_t.head_dim * cache.k[0].element_size() * 2  # K and V
    # a row and its partner (own positions; a shared prefix is read by the whole group, so it
    # counts once per thread rather than per row)
    per_row = per_pos * L * (2 if cfg else 1)
    threads = max(1, torch.get_num_threads())
    return max(2, budget // (threads * per_row))


# rows per thread (CFG partners included) up to which the team decode is used (team_decode)
TEAM_MAX_ROWS = 4


def team_decode(R: int, cfg: bool, threads: int | None = None) -> bool:
    """Whether the C++ loop decodes a wave of ``R`` conditional rows as one team of threads
    (every projection of a step split by output columns over all rows, row-wise work by rows)
    rather than one independent group of rows per thread. Same codes either way.

    A thread's packed GEMM over few rows is bound by reading the weights, not by its FMAs
    (one thread, an 18 MB stack out of cache: 110 GFLOP/s at 8 rows, 174 with the weights in
    L2), and with fewer conditional rows than threads some threads would sit idle. The team
    streams each weight once between all threads, but its threads meet at ~30 barriers per
    step, so a thread that loses its core to another process stalls the whole team. Decode
    of one wave (CFG, 128-token prompts, realistic geometry of
    ``benchmarks/test_bench_generation.py``) on the 2-core VM, 2 threads, median of 11
    alternating calls, team vs groups, ms (one run, 2026-12-07):

    ======  ==========  =====================================
    batch   idle        one other busy process on the cores
    ======  ==========  =====================================
    1       46 vs 68    106 vs 261
    2       50 vs 71    114 vs 118
    4       50 vs 65    169 vs 105
    8       82 vs 84    257 vs 154
    32      314 vs 309  (not measured)
    ======  ==========  =====================================

    ``python -m pytest benchmarks/test_bench_decode_team.py -q -s`` measures the idle column
    (a later idle run: team / groups median 0.72, 0.73, 0.82, 0.99, 1.07 at batch 1, 2, 4, 8,
    32). Hence a team only where a thread's group would hold at most :data:`TEAM_MAX_ROWS` rows
    (at 2 threads: CFG batches up to 4), where it is 20-30 % faster on a machine of its own.
    Where other processes compete for the cores it can be slower (batch 4 above): set
    ``PGEN_CPU_DECODE_TEAM=0`` there (``1`` forces the team on).
    """
    mode = envs.get("PGEN_CPU_DECODE_TEAM")
    if mode not in ("auto", "0", "1"):
        raise envs.EnvError(f"PGEN_CPU_DECODE_TEAM={mode!r}: expected auto, 0 or 1")
    threads = torch.get_num_threads() if threads is None else threads
    if mode != "auto":
        return mode == "1"
    per_thread = -(-R // max(1, threads)) * (2 if cfg else 1)
    return threads > 1 and per_thread <= TEAM_MAX_ROWS


def _linear_parts(layers) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ws, bs = [], []
    for lin in layers:
        ws.append(lin.weight.detach())
        bs.append(torch.empty(0) if lin.bias is None else lin.bias.detach())
    return ws, bs


def run_decode_loop(model, cache, cfg: bool, out: torch.Tensor, out_lp: torch.Tensor | None,
                    step_seeds: torch.Tensor, base: torch.Tensor, slot0: torch.Tensor, *, guidance_scale: float,
                    temperature: float, top_k: int, top_p: float, greedy: bool, lp_distribution: str = "conditional",
                    progress: Callable[[int], None] | None = None, chunk: int = 8, max_chunks: int = 16) -> None:
    """Decode codes ``1 .. T-1`` of a wave in place.

    Args:
        model: a float32 CPU :class:`pgen_engine.JanusModel` (see :func:`applies`).
        cache: the wave's head-major cache view (``[rows, Hkv, L, D]`` per layer, optional
            shared prefixes); rows ``[0, R)`` conditional, ``[R, 2R)`` their partners with CFG.
        cfg: whether the unconditional rows exist.
        out: int64 ``[R, T]``, column 0 filled (code 0, from the prefill); columns 1.. written,
            -1 where a row's logits were not all finite (a -1 input is embedded as code 0; the
            Generator raises on any -1, see ``Generator._pick``).
        out_lp: float32 ``[R, T]`` (column 0 filled) for the codes' log-probs, or None.
        step_seeds: int64 ``[T, R]`` sampling seed of every (step, row).
        base, slot0: int64 ``[rows]``: prompt length and first decode slot (``row * L + base``)
            of each cache row.
        guidance_scale, temperature, top_k, top_p, greedy: as in
            :meth:`pgen_engine.generation.Generator.generate`.
        lp_distribution: what ``out_lp`` holds: ``"conditional"``, ``log_softmax(c / T)[code]``;
            ``"guided"``, ``log_softmax((u + s (c - u)) / T)[code]`` (with CFG; without it the
            two are the same), as :func:`pgen_engine.training.grpo.guided_log_softmax` writes it.
        progress: called with the number of steps done after each chunk of steps (one C++
            call runs every step when None). Each call packs the weights again, so a wave is
            split into at most ``max_chunks`` calls (chunks of at least ``chunk`` steps).
    """
    if lp_distribution not in LOGPROB_DISTRIBUTIONS:
        raise ValueError(f"run_decode_loop: lp_distribution={lp_distribution!r}; expected one of {LOGPROB_DISTRIBUTIONS}")
    lm = model.language_model
    cfg_t = lm.cfg
    R, T = out.shape
    # rotary tables for every position a row reaches (prompt + image tokens; with shared
    # prefixes the own rows hold only the image tokens)
    cos, sin = lm.rotary(torch.arange(int(base.max()) + T), torch.float32)
    weights = layers_cpu.stack_weights(lm)
    aligner = model.generation_aligner
    head = model.generation_head
    aw, ab = _linear_parts([aligner.fc1, *aligner.hidden_layers])
    hw, hb = _linear_parts([head.proj_out, head.vision_head])
    codebook = head.vision_head.weight.shape[0]
    rows = 2 * R if cfg else R
    prow = plen = None
    if cache.prefix_row is not None:
        prow, plen = cache.prefix_row[:rows].contiguous(), cache.prefix_len[:rows].contiguous()
    ext = extension()
    step_seeds, base, slot0 = step_seeds.contiguous(), base.contiguous(), slot0.contiguous()
    top_k = 0 if top_k >= codebook else int(top_k)
    top_p, temperature = clamp_to_float32(top_p, temperature)  # the loop's float32 sampler: as ops.sample
    passes = rows_per_pass(model, cache, cfg, T)
    step = T if progress is None else max(1, chunk, -(-(T - 1) // max(1, max_chunks)))
    for t0 in range(1, T, step):
        t1 = min(T, t0 + step)
        ext.decode_loop_cpu(
            out, out_lp, step_seeds, base, slot0, t0, t1, model.generation_embeddings.weight.detach(), aw, ab,
            aligner.act_name, cos, sin, weights, lm.norm.weight.detach(), cache.k, cache.v, cache.prefix_k or [],
            cache.prefix_v or [], prow, plen,
            cfg_t.num_heads, cfg_t.num_kv_heads, cfg_t.rms_norm_eps, cfg_t.head_dim ** -0.5, hw, hb, head.act_name,
            cfg, float(guidance_scale), float(temperature), top_k, float(top_p), bool(greedy), passes,
            lp_distribution == "guided", team_decode(R, cfg))
        if progress is not None:
            progress(t1 - t0)
