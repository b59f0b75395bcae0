"""Continuous batching over a paged KV cache: typed wrapper of the C++ scheduler.

The C++ core (``pgen_engine._C``, sources in ``csrc/``) owns the bookkeeping; this module
gives the Generator a typed, documented surface.

Cache layout. Every layer keeps ``k_cache, v_cache`` of shape
``[num_blocks, block_size, Hkv, D]``. A token at position ``pos`` of a sequence lives at the
flat slot ``block_table[pos // block_size] * block_size + pos % block_size``, i.e. row
``slot`` of ``k_cache.view(-1, Hkv, D)``.

Generator loop (one iteration = one :meth:`BatchScheduler.schedule` call)::

    sched = BatchScheduler(num_blocks, block_size, max_batch_rows, cfg=True)
    sched.add_request(rid, prompt_len, num_samples, max_new_tokens)
    while sched.has_unfinished():
        plan = sched.schedule()
        apply_block_copies(kv_caches, plan.copies)            # copy-on-write, before writes
        # prefill: plan.prefill_seq_ids (cond prompts, then uncond prompts), K/V written at
        #   plan.prefill_slot_mapping; the last-position logits of group g give the first
        #   token of each of its samples plan.prefill[g].sample_ids.
        # decode:  rows plan.decode_seq_ids (cond rows, then uncond rows), write K/V at
        #   plan.decode_slot_mapping, attend with plan.decode_block_tables /
        #   plan.decode_context_lens; logits[:R] cond, logits[R:] uncond (R = rows // 2).
        done = sched.step_done(sample_ids, finished)          # every sample of this plan
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pgen_engine.ops._backend import extension

from .coerce import as_flag, as_int64, as_int64_list

__all__ = [
    "BatchScheduler",
    "KVBlockManager",
    "OutOfKVBlocksError",
    "PrefillGroup",
    "SchedulerStateError",
    "SchedulerStats",
    "StepPlan",
    "UnknownIdError",
    "apply_block_copies",
    "extension_or_raise",
]


def extension_or_raise():
    """The compiled ``pgen_engine._C`` module; raises a clear error when it is not built."""
    ext = extension()
    if ext is None:
        raise RuntimeError(
            "pgen_engine._C is not built; the scheduler and block manager live in it. "
            "Build it with `make build` (or `python setup.py build_ext --inplace`)."
        )
    return ext


def _exc(name: str, fallback: type[BaseException]) -> type[BaseException]:
    ext = extension()
    return getattr(ext, name) if ext is not None else fallback


#: Pool exhausted (a ``MemoryError``). Raised by allocations, and by ``add_request`` for a
#: request whose worst case exceeds the whole pool.
OutOfKVBlocksError: type[BaseException] = _exc("OutOfKVBlocksError", MemoryError)
#: Unknown (or already freed) sequence / request id (a ``KeyError``).
UnknownIdError: type[BaseException] = _exc("UnknownIdError", KeyError)
#: Protocol misuse: duplicate id, unreported samples, double report (a ``RuntimeError``).
SchedulerStateError: type[BaseException] = _exc("SchedulerStateError", RuntimeError)


class KVBlockManager:
    """Reference-counted pool of ``num_blocks`` KV blocks of ``block_size`` tokens.

    Sequences are identified by caller-chosen ``int`` ids. Forked sequences share blocks
    until one of them appends into a shared, partially filled block; that append returns a
    copy instruction (copy-on-write) which the caller runs on every layer's cache.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._bm = extension_or_raise().BlockManager(as_int64(num_blocks, "num_blocks"),
                                                     as_int64(block_size, "block_size"))

    @classmethod
    def _wrap(cls, native) -> "KVBlockManager":
        obj = cls.__new__(cls)
        obj._bm = native
        return obj

    @property
    def num_blocks(self) -> int:
        return self._bm.num_blocks

    @property
    def block_size(self) -> int:
        return self._bm.block_size

    def num_free_blocks(self) -> int:
        """Blocks currently in the free pool."""
        return self._bm.num_free_blocks()

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """``ceil(num_tokens / block_size)``."""
        return self._bm.blocks_for_tokens(as_int64(num_tokens, "num_tokens"))

    def can_allocate(self, num_tokens: int) -> bool:
        """True when a new sequence of ``num_tokens`` tokens fits in the free pool now."""
        return self._bm.can_allocate(as_int64(num_tokens, "num_tokens"))

    def allocate(self, seq: int, num_tokens: int) -> None:
        """Create ``seq`` with ``num_tokens`` tokens. Raises OutOfKVBlocksError when short
        (nothing allocated), SchedulerStateError when ``seq`` exists."""
        self._bm.allocate(as_int64(seq, "seq"), as_int64(num_tokens, "num_tokens"))

    def append_slot(self, seq: int) -> tuple[int, tuple[int, int] | None]:
        """Reserve the slot of one more token of ``seq``.

        Returns ``(slot, copy)`` where ``copy`` is ``(src_block, dst_block)`` when the last
        block was shared and had to be copied (run it before writing the token), else None.
        """
        r = self._bm.append_slot(as_int64(seq, "seq"))
        return r.slot, ((r.cow_src, r.cow_dst) if r.cow_src >= 0 else None)

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares all of ``parent``'s blocks (refcounts + 1) and its length."""
        self._bm.fork(as_int64(parent, "parent"), as_int64(child, "child"))

    def free(self, seq: int) -> None:
        """Release ``seq``. Raises UnknownIdError for an unknown id (or a double free)."""
        self._bm.free(as_int64(seq, "seq"))

    def has_seq(self, seq: int) -> bool:
        return self._bm.has_seq(as_int64(seq, "seq"))

    def num_seqs(self) -> int:
        """Number of live sequences."""
        return self._bm.num_seqs()

    def seq_ids(self) -> list[int]:
        """Live sequence ids, sorted."""
        return self._bm.seq_ids()

    def seq_len(self, seq: int) -> int:
        """Number of tokens of ``seq``."""
        return self._bm.seq_len(as_int64(seq, "seq"))

    def block_table(self, seq: int) -> list[int]:
        """Block ids of ``seq`` in position order."""
        return self._bm.block_table(as_int64(seq, "seq"))

    def refcount(self, block: int) -> int:
        return self._bm.refcount(as_int64(block, "block"))

    def slot_mapping(self, seq: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """int64 ``[end - start]`` flat slots of positions ``[start, end)`` (default: to the
        end). Raises ValueError unless ``0 <= start <= end <= seq_len(seq)``."""
        return self._bm.slot_mapping(as_int64(seq, "seq"), as_int64(start, "start"),
                                     None if end is None else as_int64(end, "end"))

    def block_tables_tensor(self, seqs: Sequence[int], max_blocks: int) -> torch.Tensor:
        """int32 ``[len(seqs), max_blocks]`` block tables, padded with 0 (fixed width, e.g.
        for CUDA-graph capture). Raises ValueError when ``max_blocks`` is negative or a table
        is longer than it, UnknownIdError for an unknown id (checked before anything is built)."""
        return self._bm.block_tables_tensor(as_int64_list(seqs, "seqs"), as_int64(max_blocks, "max_blocks"))


class _SchedulerBlockManager(KVBlockManager):
    """The block pool of a :class:`BatchScheduler`, read-only: the scheduler owns every
    allocation, and one made or freed behind its back would break its reservations."""

    def _read_only(self, *args, **kwargs):
        raise SchedulerStateError(
            "BatchScheduler.block_manager is read-only: the scheduler allocates, forks, appends and "
            "frees its sequences itself (use add_request / step_done / abort)")

    allocate = append_slot = fork = free = _read_only


@dataclass(frozen=True)
class PrefillGroup:
    """One newly admitted request. ``seq_id`` (== ``sample_ids[0]``) holds the conditional
    prompt; its samples were forked from it and share its blocks. With cfg the same holds
    for ``uncond_seq_id`` / ``uncond_sample_ids`` (else -1 / empty)."""

    request_id: int
    prompt_len: int
    seq_id: int
    uncond_seq_id: int
    sample_ids: tuple[int, ...]
    uncond_sample_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """What to run this step. All tensors are on the CPU; move them to the device once.

    Attributes:
        prefill: admitted requests, in admission (FIFO) order.
        prefill_seq_ids: sequences to prefill: every group's cond prompt, then (cfg) every
            group's uncond prompt in the same order.
        prefill_lens: prompt length of each of ``prefill_seq_ids``.
        prefill_slot_mapping: int64 ``[sum(prefill_lens)]``, concatenated in that order.
        decode_sample_ids: conditional decode rows (the ids ``step_done`` expects), R rows.
        decode_seq_ids: all model rows: the R cond rows then (cfg) their R uncond partners.
        decode_slot_mapping: int64 ``[rows]``, slot of the token each row writes now.
        decode_context_lens: int32 ``[rows]``, tokens in the cache after this write.
        decode_block_tables: int32 ``[rows, max_blocks]``, 0-padded.
        copies: int64 ``[C, 2]`` (src_block, dst_block) copy-on-write copies to run on every
            layer BEFORE this step's writes.
    """

    prefill: tuple[PrefillGroup, ...]
    prefill_seq_ids: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    prefill_slot_mapping: torch.Tensor
    decode_sample_ids: tuple[int, ...]
    decode_seq_ids: tuple[int, ...]
    decode_slot_mapping: torch.Tensor
    decode_context_lens: torch.Tensor
    decode_block_tables: torch.Tensor
    copies: torch.Tensor

    @property
    def sample_ids(self) -> tuple[int, ...]:
        """Every sample that produces a token this step: decode rows, then the samples of
        each prefill group. ``step_done`` must be told about each of them exactly once."""
        out = list(self.decode_sample_ids)
        for g in self.prefill:
            out.extend(g.sample_ids)
        return tuple(out)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode_seq_ids


@dataclass(frozen=True)
class SchedulerStats:
    """Snapshot of the scheduler's occupancy."""

    num_blocks: int
    num_free_blocks: int
    reserved_blocks: int
    num_waiting: int
    num_running_requests: int
    num_running_rows: int
    num_pending_samples: int


class BatchScheduler:
    """FIFO continuous-batching scheduler that never over-commits the KV pool.

    A request (``prompt_len`` tokens -> ``num_samples`` samples of at most
    ``max_new_tokens`` tokens) is admitted only when the pool can hold its worst case: the
    prompt plus every future token of every sample (copy-on-write copies included), for
    both cfg halves. Admitted requests therefore never fail for lack of blocks; finished
    samples release their blocks and reservation, and the queue refills the freed rows.

    Args:
        num_blocks, block_size: the paged KV pool (``[num_blocks, block_size, Hkv, D]``).
        max_batch_rows: cap on model rows in flight (a cfg sample counts 2 rows).
        cfg: classifier-free guidance by batch doubling: each request also prefills an
            unconditional prompt of the same length and each sample decodes as a
            (cond, uncond) row pair.
    """

    def __init__(self, num_blocks: int, block_size: int, max_batch_rows: int, cfg: bool = False) -> None:
        if not isinstance(cfg, (bool, np.bool_)):
            raise TypeError(f"cfg must be a bool, got {type(cfg).__name__} {cfg!r}")
        self._s = extension_or_raise().Scheduler(as_int64(num_blocks, "num_blocks"), as_int64(block_size, "block_size"),
                                                 as_int64(max_batch_rows, "max_batch_rows"), bool(cfg))
        #: Read-only view of the scheduler's pool (tables, refcounts, slot mappings).
        self.block_manager = _SchedulerBlockManager._wrap(self._s.block_manager)

    @property
    def cfg(self) -> bool:
        return self._s.cfg

    @property
    def max_batch_rows(self) -> int:
        return self._s.max_batch_rows

    def worst_case_blocks(self, prompt_len: int, num_samples: int, max_new_tokens: int) -> int:
        """KV blocks a request may need over its lifetime (what admission reserves)."""
        return self._s.worst_case_blocks(as_int64(prompt_len, "prompt_len"), as_int64(num_samples, "num_samples"),
                                         as_int64(max_new_tokens, "max_new_tokens"))

    def add_request(self, request_id: int, prompt_len: int, num_samples: int, max_new_tokens: int) -> None:
        """Queue a request (FIFO).

        Raises:
            TypeError: a non-integer argument.
            ValueError: non-positive sizes, more rows than ``max_batch_rows``, or
                ``prompt_len + max_new_tokens - 1`` past the int32 context length limit.
            SchedulerStateError: ``request_id`` is already queued or running.
            OutOfKVBlocksError: its worst case exceeds the whole pool (it could never run).
        """
        self._s.add_request(as_int64(request_id, "request_id"), as_int64(prompt_len, "prompt_len"),
                            as_int64(num_samples, "num_samples"), as_int64(max_new_tokens, "max_new_tokens"))

    def schedule(self) -> StepPlan:
        """Plan the next step: decode every running sample that has a token to write, then
        admit queued requests (FIFO, stopping at the first that does not fit).

        Raises SchedulerStateError when samples of the previous plan were not reported.
        """
        p = self._s.schedule()
        groups = tuple(
            PrefillGroup(
                request_id=g.request_id,
                prompt_len=g.prompt_len,
                seq_id=g.seq_id,
                uncond_seq_id=g.uncond_seq_id,
                sample_ids=tuple(g.sample_seq_ids),
                uncond_sample_ids=tuple(g.uncond_sample_seq_ids),
            )
            for g in p.prefill
        )
        return StepPlan(
            prefill=groups,
            prefill_seq_ids=tuple(p.prefill_seq_ids),
            prefill_lens=tuple(p.prefill_lens),
            prefill_slot_mapping=p.prefill_slot_mapping,
            decode_sample_ids=tuple(p.decode_sample_ids),
            decode_seq_ids=tuple(p.decode_seq_ids),
            decode_slot_mapping=p.decode_slot_mapping,
            decode_context_lens=p.decode_context_lens,
            decode_block_tables=p.decode_block_tables,
            copies=p.copies,
        )

    def step_done(self, sample_ids: Sequence[int], finished: Sequence[bool] | torch.Tensor) -> list[int]:
        """Report that each of ``sample_ids`` produced one token; ``finished[i]`` marks an
        end of sequence (a sample also ends at ``max_new_tokens``). Finished samples free
        their blocks. Returns the request ids whose last sample finished.

        Raises UnknownIdError / SchedulerStateError for ids that are not pending samples of
        the last plan (nothing is changed then), ValueError on a length mismatch or a flag
        other than a bool / 0 / 1, TypeError on a non-integer id.
        """
        ids = as_int64_list(sample_ids, "sample_ids")
        if isinstance(finished, torch.Tensor):
            if finished.is_floating_point() or finished.is_complex():
                raise TypeError(f"finished must be a bool (or 0 / 1 integer) tensor, got {finished.dtype}")
            finished = finished.detach().cpu().tolist()
        elif isinstance(finished, (str, bytes)):
            raise TypeError("finished must be a sequence of bools")
        flags = list(finished)
        if not all(type(f) is bool for f in flags):  # fast path: plain bools
            flags = [as_flag(f, f"finished[{i}]") for i, f in enumerate(flags)]
        return self._s.step_done(ids, flags)

    def abort(self, request_id: int) -> None:
        """Drop a queued or running request and free everything it holds. Samples of it that
        the last plan scheduled are dropped too: leave them out of the ``step_done`` report."""
        self._s.abort(as_int64(request_id, "request_id"))

    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
        return self._s.has_unfinished()

    def sample_info(self, sample_id: int) -> tuple[int, int, int]:
        """``(request_id, sample_index, num_generated)`` of a live sample."""
        i = self._s.sample_info(as_int64(sample_id, "sample_id"))
        return i.request_id, i.sample_index, i.num_generated

    def stats(self) -> SchedulerStats:
        s = self._s.stats()
        return SchedulerStats(
            num_blocks=s.num_blocks,
            num_free_blocks=s.num_free_blocks,
            reserved_blocks=s.reserved_blocks,
            num_waiting=s.num_waiting,
            num_running_requests=s.num_running_requests,
            num_running_rows=s.num_running_rows,
            num_pending_samples=s.num_pending_samples,
        )


def apply_block_copies(kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], copies: torch.Tensor) -> None:
    """Run copy-on-write copies in place on every layer: ``cache[dst] = cache[src]``.

    Args:
        kv_caches: per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, Hkv, D]``.
        copies: int64 ``[C, 2]`` (src_block, dst_block), e.g. ``StepPlan.copies``.
    """
    if copies.dim() != 2 or copies.shape[1] != 2:
        raise ValueError(f"apply_block_copies: copies must be [C, 2], got {tuple(copies.shape)}")
    if copies.shape[0] == 0:
        return
    for k, v in kv_caches:
        idx = copies.to(k.device)
        # dst blocks are fresh (refcount 1) and src blocks shared, so no dst is also a src:
        # a single gather/scatter per cache is order-independent.
        k.index_copy_(0, idx[:, 1], k.index_select(0, idx[:, 0]))
        v.index_copy_(0, idx[:, 1], v.index_select(0, idx[:, 0]))
