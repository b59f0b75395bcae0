"""Continuous batching for :class:`~pgen_engine.generation.Generator` (``scheduler="continuous"``).

The C++ :class:`~pgen_engine.generation.scheduler.BatchScheduler` owns the paged KV cache's
bookkeeping: it admits requests (FIFO) while their worst case fits the block pool and the
row budget, forks a prompt's blocks to its samples (copy-on-write), and frees a sample's
blocks when it ends, so the next queued request is prefilled in the same step as the running
rows decode. The Generator's preallocated KV storage is reused as the block pool.

Tokens equal the wave path's: the same per-(request, sample, step) seeds, the same prompt
positions (0..len-1 per sequence) and the same CFG rows.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from pgen_engine.models.decoder import KVCache
from pgen_engine.ops.rng import mix_seed

from .scheduler import BatchScheduler, apply_block_copies

#: Tokens per KV block of the continuous path.
BLOCK_SIZE = 16


@dataclasses.dataclass(frozen=True)
class _Request:
    """Samples ``[first, first + count)`` of prompt ``prompt`` (one scheduler request)."""

    prompt: int
    first: int
    count: int


def generate_continuous(gen, prompts, pixel_chunks, req_seeds: torch.Tensor, num_samples: int, s: float,
                        temperature: float, top_k: int, top_p: float, greedy: bool, bar, out: torch.Tensor) -> None:
    """Fill ``out`` (int64 ``[B * num_samples, T]``) with every sample's codes.

    ``prompts`` / ``pixel_chunks`` / ``req_seeds`` are the Generator's parsed inputs; a
    prompt's samples are split into requests of at most ``max_batch_size`` samples.
    """
    m = gen.model
    dev = m.device
    T = gen.num_image_tokens
    cfg = s != 1.0
    hkv, d = gen._kv_shape
    num_blocks = gen._k[0].shape[0] // BLOCK_SIZE
    n = num_blocks * BLOCK_SIZE
    cache = KVCache(k=[k[:n].view(num_blocks, BLOCK_SIZE, hkv, d) for k in gen._k],
                    v=[v[:n].view(num_blocks, BLOCK_SIZE, hkv, d) for v in gen._v])
    sched = BatchScheduler(num_blocks, BLOCK_SIZE, (2 if cfg else 1) * gen.max_batch_size, cfg=cfg)
    requests: list[_Request] = []
    for i, p in enumerate(prompts):
        for first in range(0, num_samples, gen.max_batch_size):
            req = _Request(i, first, min(gen.max_batch_size, num_samples - first))
            sched.add_request(len(requests), len(p.ids), req.count, T)
            requests.append(req)

    B = len(prompts)
    sample_seeds = mix_seed(req_seeds.repeat_interleave(num_samples), torch.arange(num_samples).repeat(B))
    last = torch.zeros(B * num_samples, dtype=torch.long, device=dev)  # latest code of each output row
    row_of: dict[int, int] = {}   # live sample sequence id -> output row
    made: dict[int, int] = {}     # live sample sequence id -> codes generated so far
    pick = dict(s=s, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    stats = gen.last_stats
    while sched.has_unfinished():
        plan = sched.schedule()
        apply_block_copies(list(zip(cache.k, cache.v)), plan.copies)
        reported: list[int] = []
        if plan.prefill:
            t0 = time.perf_counter()
            groups = plan.prefill
            reqs = [requests[g.request_id] for g in groups]
            seqs = [prompts[r.prompt].ids for r in reqs]
            cms = [prompts[r.prompt].code_mask for r in reqs]
            pix = [pixel_chunks[r.prompt] for r in reqs]
            if cfg:
                seqs += [list(gen._uncond_ids(prompts[r.prompt])) for r in reqs]
                cms += [None] * len(reqs)
                pix += [None] * len(reqs)
            slots = plan.prefill_slot_mapping.tolist()
            slots_of, at = [], 0
            for length in plan.prefill_lens:
                slots_of.append(slots[at:at + length])
                at += length
            h = gen._prefill_slots(cache, seqs, cms, pix, slots_of)
            group_of, rows = [], []
            for gi, (g, r) in enumerate(zip(groups, reqs)):
                for j, sid in enumerate(g.sample_ids):
                    row_of[sid] = r.prompt * num_samples + r.first + j
                    made[sid] = 0
                    group_of.append(gi)
                    rows.append(row_of[sid])
            gidx = torch.tensor(group_of, device=dev)
            hh = torch.cat([h[gidx], h[len(groups) + gidx]]) if cfg else h[gidx]
            rows_t = torch.tensor(rows, device=dev)
            tok = gen._pick(hh, len(rows), mix_seed(sample_seeds[rows], 0).to(dev), **pick)
            out[rows_t, 0] = tok
            last[rows_t] = tok
            reported += [sid for g in groups for sid in g.sample_ids]
            stats["prefill_s"] += time.perf_counter() - t0
        if plan.decode_sample_ids:
            t0 = time.perf_counter()
            sids = plan.decode_sample_ids
            rows = [row_of[x] for x in sids]
            steps = [made[x] for x in sids]
            rows_t = torch.tensor(rows, device=dev)
            emb = m.embed_image_codes(last[rows_t].clamp(min=0))  # -1: non-finite logits (Generator._pick)
            if cfg:
                emb = torch.cat([emb, emb])
            ctx = plan.decode_context_lens.to(dev)
            h = m.decode_step(emb, ctx.long() - 1, cache, plan.decode_slot_mapping.to(dev), ctx,
                              plan.decode_block_tables.to(dev))
            tok = gen._pick(h, len(sids), mix_seed(sample_seeds[rows], torch.tensor(steps)).to(dev), **pick)
            out[rows_t, torch.tensor(steps, device=dev)] = tok
            last[rows_t] = tok
            reported += list(sids)
            stats["decode_s"] += time.perf_counter() - t0
        for sid in reported:
            made[sid] += 1
        sched.step_done(reported, [False] * len(reported))  # a sample ends at T codes by itself
        for sid in reported:  # rows that reached T codes were freed by the scheduler
            if made[sid] == T:
                del made[sid], row_of[sid]
        stats["steps"] += 1
        if bar is not None:
            bar.update(len(reported))
