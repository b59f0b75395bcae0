"""Adversarial / property-based checks of the C++ KV block manager and batch scheduler.

* Random op streams (allocate / append_slot / fork / free, interleaved with misuse) are
  checked after every op against a pure-Python mirror of the tables and refcounts.
* Misuse of the API (unknown ids, bad ranges, overflowing sizes, wrong argument types)
  must raise a specific Python exception and leave the state unchanged.
* Random request streams through the scheduler (aborts, EOS, misuse, refills) must never
  schedule more than ``max_batch_rows`` rows, never over-commit the pool, finish every
  request exactly once (FIFO admission) and leak nothing.
* ``Generator(scheduler="continuous")`` gives the wave scheduler's tokens and frees its pool.

Every randomised test prints its seed in the assertion message.
"""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from pgen_engine.ops._backend import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="pgen_engine._C not built (run `make build`)")

from pgen_engine.generation.scheduler import (  # noqa: E402
    BatchScheduler,
    KVBlockManager,
    OutOfKVBlocksError,
    SchedulerStateError,
    UnknownIdError,
)

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)


# ----------------------------------------------------------------------------- reference model


class RefBlocks:
    """Pure-Python mirror of a KVBlockManager: tables, lengths and refcounts.

    It does not predict *which* free block the manager hands out; it checks that every
    handed-out block was free, that copies happen exactly when a shared partial block is
    written, and mirrors the result.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.nb, self.bs = num_blocks, block_size
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def refcounts(self) -> list[int]:
        rc = [0] * self.nb
        for t in self.tables.values():
            for b in t:
                rc[b] += 1
        return rc

    def free_count(self) -> int:
        return self.nb - sum(1 for r in self.refcounts() if r)

    def blocks_for(self, n: int) -> int:
        return -(-n // self.bs)

    def allocate(self, seq: int, n: int, table: list[int]) -> None:
        rc = self.refcounts()
        assert len(table) == self.blocks_for(n)
        assert len(set(table)) == len(table), "a table holds one block twice"
        assert all(rc[b] == 0 for b in table), "allocate handed out a used block"
        self.tables[seq], self.lens[seq] = list(table), n

    def append(self, seq: int, slot: int, copy) -> None:
        rc = self.refcounts()
        t, n = self.tables[seq], self.lens[seq]
        off = n % self.bs
        if off == 0:
            assert copy is None, "append into a fresh block needs no copy"
            b = slot // self.bs
            assert slot % self.bs == 0 and rc[b] == 0, "new block was not free"
            t.append(b)
        elif rc[t[-1]] > 1:
            assert copy is not None and copy[0] == t[-1], "write to a shared block without copy-on-write"
            assert rc[copy[1]] == 0 and copy[1] != copy[0], "copy destination was not free"
            assert slot == copy[1] * self.bs + off
            t[-1] = copy[1]
        else:
            assert copy is None, "needless copy of a private block"
            assert slot == t[-1] * self.bs + off
        self.lens[seq] = n + 1

    def fork(self, parent: int, child: int) -> None:
        self.tables[child], self.lens[child] = list(self.tables[parent]), self.lens[parent]

    def free(self, seq: int) -> None:
        del self.tables[seq], self.lens[seq]

    def check(self, bm: KVBlockManager, tag: str = "") -> None:
        assert bm.seq_ids() == sorted(self.tables), tag
        assert bm.num_seqs() == len(self.tables), tag
        rc = self.refcounts()
        assert [bm.refcount(b) for b in range(self.nb)] == rc, tag
        used = sum(1 for r in rc if r)
        assert bm.num_free_blocks() + used == self.nb, tag
        for seq, t in self.tables.items():
            n = self.lens[seq]
            assert bm.block_table(seq) == t, tag
            assert bm.seq_len(seq) == n, tag
            slots = bm.slot_mapping(seq)
            assert slots.dtype == torch.int64 and slots.tolist() == [
                t[p // self.bs] * self.bs + p % self.bs for p in range(n)
            ], tag
        if self.tables:
            seqs = list(self.tables)
            width = max(len(t) for t in self.tables.values()) + 2
            bt = bm.block_tables_tensor(seqs, width)
            assert bt.dtype == torch.int32 and bt.shape == (len(seqs), width), tag
            for row, seq in zip(bt.tolist(), seqs):
                t = self.tables[seq]
                assert row == t + [0] * (width - len(t)), tag


def snapshot(bm: KVBlockManager):
    return (
        bm.num_free_blocks(),
        tuple((s, tuple(bm.block_table(s)), bm.seq_len(s)) for s in bm.seq_ids()),
        tuple(bm.refcount(b) for b in range(bm.num_blocks)),
    )


def misuse(bm: KVBlockManager, ref: RefBlocks, rng: random.Random, fresh: int) -> None:
    """One random bad call: it must raise the documented exception and change nothing."""
    before = snapshot(bm)
    live = list(ref.tables)
    seq = rng.choice(live) if live else None
    kind = rng.randrange(12)
    if kind == 0:
        with pytest.raises(UnknownIdError):
            bm.free(fresh)
    elif kind == 1:
        with pytest.raises(UnknownIdError):
            bm.fork(fresh, fresh + 1)
    elif kind == 2:
        with pytest.raises(UnknownIdError):
            bm.append_slot(fresh)
    elif kind == 3 and seq is not None:
        with pytest.raises(SchedulerStateError):
            bm.allocate(seq, 1)
    elif kind == 4 and seq is not None:
        with pytest.raises(SchedulerStateError):
            bm.fork(seq, rng.choice(live))
    elif kind == 5:
        with pytest.raises(ValueError):
            bm.allocate(fresh, -rng.randint(1, 2**62))
    elif kind == 6:
        with pytest.raises(OutOfKVBlocksError):
            bm.allocate(fresh, rng.choice([ref.nb * ref.bs + 1, 2**62, I64_MAX]))
    elif kind == 7 and seq is not None:
        n = ref.lens[seq]
        with pytest.raises(ValueError):
            bm.slot_mapping(seq, rng.randint(0, n + 3), n + rng.randint(1, 3))
    elif kind == 8 and seq is not None and ref.lens[seq] >= 2:
        with pytest.raises(ValueError):
            bm.slot_mapping(seq, ref.lens[seq], rng.randint(0, ref.lens[seq] - 1))  # start > end
    elif kind == 9 and seq is not None and ref.tables[seq]:
        with pytest.raises(ValueError):
            bm.block_tables_tensor([seq], len(ref.tables[seq]) - 1)
    elif kind == 10:
        with pytest.raises(UnknownIdError):
            bm.block_tables_tensor(live + [fresh], 64)
    elif kind == 11:
        with pytest.raises(TypeError):
            bm.free(rng.choice([1.0, None, "1", 2.5]))
    assert snapshot(bm) == before, f"misuse kind {kind} changed the state"


def run_block_stream(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    nb, bs = rng.randint(1, 24), rng.choice([1, 2, 3, 4, 7, 16])
    bm = KVBlockManager(nb, bs)
    ref = RefBlocks(nb, bs)
    # ids from the whole int64 range, negatives and extremes included
    pool = [I64_MIN, I64_MAX, -1, 0] + [rng.randint(I64_MIN, I64_MAX) for _ in range(30)]
    fresh = iter(sorted(set(range(10**6, 10**6 + steps * 2)) | set(pool), key=lambda _: rng.random()))
    unused = 10**12
    for step in range(steps):
        tag = f"seed={seed} step={step} nb={nb} bs={bs}"
        live = list(ref.tables)
        op = rng.random()
        if op < 0.22 or not live:
            seq, n = next(fresh), rng.randrange(0, 3 * bs + 2)
            can = bm.can_allocate(n)
            assert can == (ref.blocks_for(n) <= ref.free_count()), tag
            assert bm.blocks_for_tokens(n) == ref.blocks_for(n), tag
            if not can:
                with pytest.raises(OutOfKVBlocksError, match="out of KV blocks"):
                    bm.allocate(seq, n)
            else:
                bm.allocate(seq, n)
                ref.allocate(seq, n, bm.block_table(seq))
        elif op < 0.40:
            parent, child = rng.choice(live), next(fresh)
            bm.fork(parent, child)
            ref.fork(parent, child)
        elif op < 0.75:
            seq = rng.choice(live)
            n = ref.lens[seq]
            needs_block = n % bs == 0 or ref.refcounts()[ref.tables[seq][-1]] > 1
            if needs_block and ref.free_count() == 0:
                with pytest.raises(OutOfKVBlocksError, match="out of KV blocks"):
                    bm.append_slot(seq)
            else:
                slot, copy = bm.append_slot(seq)
                ref.append(seq, slot, copy)
                assert bm.refcount(slot // bs) == 1, f"{tag}: write into a shared block"
        elif op < 0.92:
            seq = rng.choice(live)
            bm.free(seq)
            ref.free(seq)
            with pytest.raises(UnknownIdError, match="double free"):
                bm.free(seq)
        else:
            unused += 1
            misuse(bm, ref, rng, unused)
        ref.check(bm, tag)
    for seq in list(ref.tables):
        bm.free(seq)
        ref.free(seq)
    ref.check(bm, f"seed={seed} end")
    assert bm.num_free_blocks() == nb and bm.num_seqs() == 0


@pytest.mark.parametrize("seed", range(60))
def test_random_block_stream_matches_reference(seed):
    run_block_stream(seed, 400)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1200))
def test_random_block_stream_matches_reference_stress(seed):
    run_block_stream(seed, 2000)


# ----------------------------------------------------------------------------- BlockManager misuse


def test_fork_shares_every_block_until_each_sample_writes():
    bs = 4
    bm = KVBlockManager(64, bs)
    bm.allocate(0, 9)  # 2 full blocks + 1 partial
    parent = bm.block_table(0)
    for c in range(1, 6):
        bm.fork(0, c)
    assert [bm.refcount(b) for b in parent] == [6, 6, 6]
    copies = []
    for c in range(0, 6):
        _, copy = bm.append_slot(c)
        if copy is not None:
            copies.append(copy)
    # five of the six writers copy the partial block, the last one keeps it
    assert len(copies) == 5 and {s for s, _ in copies} == {parent[2]}
    assert bm.refcount(parent[2]) == 1 and [bm.refcount(b) for b in parent[:2]] == [6, 6]
    for c in range(6):
        bm.free(c)
    assert bm.num_free_blocks() == 64


def test_block_count_arithmetic_does_not_overflow():
    bm = KVBlockManager(8, 16)
    assert bm.blocks_for_tokens(I64_MAX) == I64_MAX // 16 + 1
    for n in (I64_MAX - 15, I64_MAX - 16, I64_MAX - 17, 2**62 + 1):
        assert bm.blocks_for_tokens(n) == -(-n // 16), n
    assert not bm.can_allocate(I64_MAX)
    with pytest.raises(OutOfKVBlocksError, match="out of KV blocks"):
        bm.allocate(1, I64_MAX)
    with pytest.raises(OutOfKVBlocksError, match="out of KV blocks"):
        bm.allocate(1, 2**62)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate(1, -1)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.can_allocate(I64_MIN)
    assert bm.num_free_blocks() == 8 and not bm.has_seq(1)
    one = KVBlockManager(1, 1)
    assert one.blocks_for_tokens(I64_MAX) == I64_MAX


@pytest.mark.parametrize(
    "num_blocks, block_size",
    [(0, 4), (-1, 4), (2**31, 4), (4, 0), (4, -3), (3, 2**62), (2**20, 2**44), (2, I64_MAX)],
)
def test_bad_pool_shapes_raise_value_error(num_blocks, block_size):
    # (3, 2**62): the last slot 3 * 2**62 - 1 does not fit int64, slots would wrap negative
    with pytest.raises(ValueError):
        KVBlockManager(num_blocks, block_size)


def test_largest_pool_slots_stay_in_int64():
    bs = I64_MAX // 4
    bm = KVBlockManager(4, bs)
    bm.allocate(0, 3 * bs + 2)
    sl = bm.slot_mapping(0, 3 * bs, 3 * bs + 2).tolist()
    assert sl == [bm.block_table(0)[3] * bs, bm.block_table(0)[3] * bs + 1]
    assert all(0 <= s < 4 * bs for s in sl)


@pytest.mark.parametrize("bad", [1.0, 2.5, "3", None, True, np.float64(1.0), [1]])
def test_non_integer_arguments_raise_type_error(bad):
    bm = KVBlockManager(8, 4)
    bm.allocate(1, 5)
    before = snapshot(bm)
    calls = [
        lambda: bm.allocate(bad, 1),
        lambda: bm.allocate(2, bad),
        lambda: bm.append_slot(bad),
        lambda: bm.fork(bad, 3),
        lambda: bm.fork(1, bad),
        lambda: bm.free(bad),
        lambda: bm.slot_mapping(bad),
        lambda: bm.slot_mapping(1, bad),
        lambda: bm.slot_mapping(1, 0, bad) if bad is not None else bm.slot_mapping(1, bad, 2),
        lambda: bm.block_tables_tensor([1], bad),
        lambda: bm.block_tables_tensor([bad], 4),
        lambda: bm.seq_len(bad),
        lambda: bm.refcount(bad),
        lambda: bm.blocks_for_tokens(bad),
        lambda: KVBlockManager(bad, 4),
        lambda: KVBlockManager(4, bad),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"call {i} accepted {bad!r}")
    assert snapshot(bm) == before


def test_integers_outside_int64_raise_value_error():
    bm = KVBlockManager(8, 4)
    bm.allocate(I64_MAX, 1)
    bm.allocate(I64_MIN, 1)
    for bad in (2**63, -(2**63) - 1, 2**200):
        with pytest.raises(ValueError, match="int64"):
            bm.allocate(bad, 1)
        with pytest.raises(ValueError, match="int64"):
            bm.slot_mapping(I64_MAX, 0, bad)
    s = BatchScheduler(8, 4, 4)
    with pytest.raises(ValueError, match="int64"):
        s.add_request(2**63, 1, 1, 1)
    s.add_request(I64_MIN, 1, 1, 1)
    assert s.schedule().prefill[0].request_id == I64_MIN


def test_numpy_and_torch_integers_are_accepted():
    bm = KVBlockManager(np.int64(8), np.int32(4))
    assert bm.num_blocks == 8 and bm.block_size == 4
    bm.allocate(np.int64(5), np.int16(6))
    bm.fork(np.int32(5), torch.tensor(6))
    slot, copy = bm.append_slot(np.uint8(6))
    assert copy is not None
    assert bm.slot_mapping(np.int64(5), np.int64(1), np.int64(3)).tolist() == bm.slot_mapping(5)[1:3].tolist()
    assert bm.block_tables_tensor(np.array([5, 6]), np.int64(3)).shape == (2, 3)
    bm.free(np.int64(5))
    bm.free(torch.tensor(6))
    assert bm.num_free_blocks() == 8


def test_slot_mapping_ranges_are_value_errors():
    bm = KVBlockManager(8, 4)
    bm.allocate(1, 6)
    assert bm.slot_mapping(1, 6, 6).shape == (0,)
    assert bm.slot_mapping(1, 2).tolist() == bm.slot_mapping(1)[2:].tolist()
    assert bm.slot_mapping(1, end=3).tolist() == bm.slot_mapping(1)[:3].tolist()
    for start, end in [(3, 2), (-1, 3), (0, 7), (7, None), (0, -2), (0, -1), (I64_MIN, 0), (0, I64_MAX)]:
        with pytest.raises(ValueError):
            bm.slot_mapping(1, start, end)
            pytest.fail(f"slot_mapping(1, {start}, {end}) did not raise")
    with pytest.raises(UnknownIdError):
        bm.slot_mapping(2, 0, 1)


def test_block_tables_tensor_width_errors_are_value_errors():
    bm = KVBlockManager(8, 4)
    bm.allocate(1, 9)  # 3 blocks
    with pytest.raises(ValueError, match="max_blocks"):
        bm.block_tables_tensor([1], -1)
    with pytest.raises(ValueError, match="max_blocks"):
        bm.block_tables_tensor([1], 2)
    with pytest.raises(ValueError, match="max_blocks"):
        bm.block_tables_tensor([1, 1], 2**62)  # would overflow the tensor size
    assert bm.block_tables_tensor([], 0).shape == (0, 0)
    assert bm.block_tables_tensor([1, 1], 3).tolist() == [bm.block_table(1)] * 2


# ----------------------------------------------------------------------------- Scheduler misuse


def test_scheduler_block_manager_is_read_only():
    s = BatchScheduler(num_blocks=4, block_size=4, max_batch_rows=4)
    s.add_request(0, prompt_len=3, num_samples=1, max_new_tokens=5)  # 2 blocks reserved
    plan = s.schedule()
    bm = s.block_manager
    sid = plan.sample_ids[0]
    before = snapshot(bm)
    for call in (lambda: bm.allocate(100, 8), lambda: bm.free(sid), lambda: bm.fork(sid, 100),
                 lambda: bm.append_slot(sid)):
        with pytest.raises(SchedulerStateError, match="read-only"):
            call()
    assert snapshot(bm) == before
    assert bm.seq_len(sid) == 3 and bm.refcount(bm.block_table(sid)[0]) == 1
    s.step_done([sid], [False])
    while s.has_unfinished():
        p = s.schedule()
        s.step_done(list(p.sample_ids), [False] * len(p.sample_ids))
    assert s.stats().num_free_blocks == 4


@pytest.mark.parametrize("cfg", [False, True])
def test_oversized_requests_are_rejected_at_submit(cfg):
    h = 2 if cfg else 1
    s = BatchScheduler(num_blocks=16, block_size=4, max_batch_rows=2**62, cfg=cfg)
    cases = [
        (1, 2**62, 1),  # 2**63 rows with cfg: wrapped negative
        (1, 2**61 + 1, 1),
        (1, I64_MAX, 1),
        (1, 1, I64_MAX),  # prompt + new tokens overflow
        (I64_MAX, 1, 1),
        (1, 2**40, 2**30),  # samples x blocks overflow
        (2**40, 1, 2**40),
        (3, 1, 2**31),
    ]
    for rid, (p, n, m) in enumerate(cases):
        with pytest.raises((ValueError, OutOfKVBlocksError)):
            s.add_request(rid, p, n, m)
            pytest.fail(f"add_request(prompt_len={p}, num_samples={n}, max_new_tokens={m}) accepted")
    assert s.stats().num_waiting == 0 and not s.has_unfinished()
    # worst_case_blocks saturates instead of wrapping
    assert s.worst_case_blocks(1, 2**62, 2**62) >= 16
    assert s.worst_case_blocks(I64_MAX, I64_MAX, I64_MAX) >= 16
    assert s.worst_case_blocks(4, 2, 4) == h * (1 + 2 * 1)


def test_context_lengths_must_fit_int32():
    # a pool big enough in tokens: decode_context_lens are int32, so a request longer than
    # 2**31 - 1 tokens must be refused at submit instead of wrapping
    s = BatchScheduler(num_blocks=8, block_size=2**40, max_batch_rows=4)
    with pytest.raises(ValueError, match="int32|2147483647"):
        s.add_request(0, prompt_len=2**31 - 10, num_samples=1, max_new_tokens=20)
    assert not s.has_unfinished()


@pytest.mark.parametrize("args", [(0, 1, 1), (-5, 1, 10), (5, -3, 10), (5, 0, 1), (5, 1, 0), (5, 1, -1)])
def test_worst_case_blocks_rejects_bad_sizes(args):
    s = BatchScheduler(num_blocks=16, block_size=4, max_batch_rows=8)
    with pytest.raises(ValueError):
        s.worst_case_blocks(*args)


@pytest.mark.parametrize("bad", [1.5, "1", None, True])
def test_scheduler_rejects_non_integer_arguments(bad):
    with pytest.raises(TypeError):
        BatchScheduler(num_blocks=bad, block_size=4, max_batch_rows=4)
    with pytest.raises(TypeError):
        BatchScheduler(num_blocks=8, block_size=4, max_batch_rows=bad)
    s = BatchScheduler(num_blocks=16, block_size=4, max_batch_rows=8)
    for i in range(4):
        args = [10, 2, 1, 3]
        args[i] = bad
        with pytest.raises(TypeError):
            s.add_request(*args)
    s.add_request(0, 2, 2, 3)
    plan = s.schedule()
    sid = plan.sample_ids[0]
    with pytest.raises(TypeError):
        s.step_done([sid + 0.25 if bad == 1.5 else bad, plan.sample_ids[1]], [False, False])
    with pytest.raises(TypeError):
        s.abort(bad)
    with pytest.raises(TypeError):
        s.sample_info(bad)
    st = s.stats()
    assert st.num_pending_samples == 2 and st.num_running_requests == 1
    s.step_done(list(plan.sample_ids), [False, False])


@pytest.mark.parametrize("bad", ["False", None, 0.5, 2, -1])
def test_step_done_rejects_non_boolean_flags(bad):
    s = BatchScheduler(num_blocks=16, block_size=4, max_batch_rows=8)
    s.add_request(0, 2, 1, 3)
    plan = s.schedule()
    with pytest.raises((TypeError, ValueError)):
        s.step_done(list(plan.sample_ids), [bad])
    assert s.stats().num_pending_samples == 1
    s.step_done(list(plan.sample_ids), [np.bool_(False)])
    plan = s.schedule()
    s.step_done(list(plan.sample_ids), torch.tensor([1]))  # 0 / 1 integers are flags too
    assert not s.has_unfinished()


def test_cfg_must_be_a_bool():
    assert BatchScheduler(8, 4, 4, cfg=np.bool_(True)).cfg
    for bad in ("no", None, 2, 1.0):
        with pytest.raises(TypeError):
            BatchScheduler(8, 4, 4, cfg=bad)


def test_step_done_is_linear_in_the_batch():
    n = 60000
    s = BatchScheduler(3 * n + 8, 1, n)
    s.add_request(0, 1, n, 3)
    plan = s.schedule()
    ids = list(plan.sample_ids)
    t = time.perf_counter()
    s.step_done(ids, [False] * n)
    took = time.perf_counter() - t
    assert took < 0.3, f"step_done of {n} samples took {took:.2f}s (quadratic duplicate check?)"
    with pytest.raises(SchedulerStateError, match="twice"):
        s.step_done(ids + [ids[-1]], [False] * (n + 1))  # never pending now; still rejected
    s.abort(0)
    assert s.stats().num_free_blocks == 3 * n + 8


def test_exactly_fitting_pool_runs_to_completion():
    for cfg in (False, True):
        probe = BatchScheduler(1000, 4, 64, cfg=cfg)
        need = probe.worst_case_blocks(7, 3, 10)
        s = BatchScheduler(need, 4, 6, cfg=cfg)
        s.add_request(0, 7, 3, 10)
        s.add_request(1, 7, 3, 10)  # must wait for the whole of request 0
        with pytest.raises(OutOfKVBlocksError, match="can never fit"):
            s.add_request(2, 7, 3, 20)
        order, steps, peak = [], 0, 0
        while s.has_unfinished():
            plan = s.schedule()
            peak = max(peak, need - s.stats().num_free_blocks)
            assert [g.request_id for g in plan.prefill] in ([], [0], [1])
            order += s.step_done(list(plan.sample_ids), [False] * len(plan.sample_ids))
            steps += 1
        assert order == [0, 1] and steps == 20
        assert 0 < peak <= need
        assert s.stats().num_free_blocks == need


# ----------------------------------------------------------------------------- scheduler streams


def run_scheduler_stream(seed: int, num_requests: int) -> None:
    rng = random.Random(seed)
    cfg = rng.random() < 0.5
    h = 2 if cfg else 1
    bs = rng.choice([1, 2, 3, 4, 8])
    max_rows = rng.choice([1, 2, 3, 4, 6, 9, 16])
    if cfg and max_rows < 2:
        max_rows = 2
    nb = rng.randint(4, 60)
    s = BatchScheduler(nb, bs, max_rows, cfg=cfg)
    bm = s.block_manager
    tag = f"seed={seed} cfg={cfg} bs={bs} rows={max_rows} nb={nb}"

    info: dict[int, tuple[int, int, int]] = {}  # request -> (prompt, samples, max_new)
    queue: list[int] = []  # waiting, FIFO
    running: dict[int, set[int]] = {}  # request -> live sample ids
    req_of: dict[int, int] = {}  # live sample -> request
    made: dict[int, int] = {}  # live sample -> tokens produced
    uncond: dict[int, int] = {}
    ended: dict[int, str] = {}  # request -> "done" / "aborted"
    admitted: list[int] = []
    pending: list[int] = []
    next_rid = 0

    def reserved() -> int:
        total = 0
        for rid, live in running.items():
            p, _, m = info[rid]
            shared = p // bs
            per = -(-(p + m) // bs) - shared
            total += h * (shared + len(live) * per)
        return total

    def check_stats(where: str) -> None:
        st = s.stats()
        assert st.num_waiting == len(queue), f"{tag} {where}"
        assert st.num_running_requests == len(running), f"{tag} {where}"
        assert st.num_running_rows == h * sum(len(v) for v in running.values()) <= max_rows, f"{tag} {where}"
        assert st.reserved_blocks == reserved() <= nb, f"{tag} {where}"
        assert nb - st.num_free_blocks <= st.reserved_blocks, f"{tag} {where}: pool over-committed"
        assert st.num_pending_samples == len(pending), f"{tag} {where}"
        assert bm.num_seqs() == h * len(req_of), f"{tag} {where}"  # a prompt is its sample 0
        assert s.has_unfinished() == bool(queue or running), f"{tag} {where}"

    steps = 0
    while next_rid < num_requests or s.has_unfinished():
        steps += 1
        assert steps < 20000, f"{tag}: no progress"
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if next_rid >= num_requests:
                break
            p, n, m = rng.randint(1, 4 * bs + 1), rng.randint(1, 4), rng.randint(1, 5 * bs)
            rid = next_rid if rng.random() > 0.05 else rng.choice([next_rid, *queue, *running] or [next_rid])
            if rid in queue or rid in running:
                with pytest.raises(SchedulerStateError, match="already queued"):
                    s.add_request(rid, 1, 1, 1)  # valid sizes: the id alone is wrong
                continue
            next_rid += 1
            if n * h > max_rows:
                with pytest.raises(ValueError, match="max_batch_rows"):
                    s.add_request(rid, p, n, m)
            elif s.worst_case_blocks(p, n, m) > nb:
                with pytest.raises(OutOfKVBlocksError, match="can never fit"):
                    s.add_request(rid, p, n, m)
            else:
                s.add_request(rid, p, n, m)
                info[rid] = (p, n, m)
                queue.append(rid)
        check_stats("after add")
        if rng.random() < 0.05 and (queue or running):  # abort before scheduling
            rid = rng.choice(queue + list(running))
            s.abort(rid)
            if rid in queue:
                queue.remove(rid)
            else:
                for sid in running.pop(rid):
                    del req_of[sid], made[sid]
            ended[rid] = "aborted"
            with pytest.raises(UnknownIdError):
                s.abort(rid)
            check_stats("after abort")
        if not s.has_unfinished():
            continue

        plan = s.schedule()
        rows = len(plan.decode_seq_ids) + h * sum(len(g.sample_ids) for g in plan.prefill)
        assert rows <= max_rows, f"{tag}: {rows} rows scheduled"
        assert not plan.is_empty, f"{tag}: empty plan while work remains"
        assert len(plan.decode_seq_ids) == h * len(plan.decode_sample_ids)
        # decode rows: exactly the live samples, each once, in admission order
        assert sorted(plan.decode_sample_ids) == sorted(req_of), tag
        for row, sid in enumerate(plan.decode_sample_ids):
            assert bm.seq_len(sid) == info[req_of[sid]][0] + made[sid], tag
            assert int(plan.decode_context_lens[row]) == bm.seq_len(sid)
            if cfg:
                u = plan.decode_seq_ids[len(plan.decode_sample_ids) + row]
                assert u == uncond[sid] and bm.seq_len(u) == bm.seq_len(sid)
        # every row writes a private slot of its own block table
        slots = plan.decode_slot_mapping.tolist()
        assert len(set(slots)) == len(slots), tag
        for row, seq in enumerate(plan.decode_seq_ids):
            t = bm.block_table(seq)
            n = bm.seq_len(seq)
            assert slots[row] == t[(n - 1) // bs] * bs + (n - 1) % bs, tag
            assert bm.refcount(slots[row] // bs) == 1, f"{tag}: write into a shared block"
            assert plan.decode_block_tables[row].tolist() == t + [0] * (plan.decode_block_tables.shape[1] - len(t))
        for src, dst in plan.copies.tolist():
            assert bm.refcount(dst) == 1 and src != dst, tag
        # admission: FIFO, the head of the queue first, never skipping
        got = [g.request_id for g in plan.prefill]
        assert got == queue[: len(got)], f"{tag}: admission not FIFO"
        off = 0
        for g in plan.prefill:
            rid = g.request_id
            queue.remove(rid)
            admitted.append(rid)
            p, n, m = info[rid]
            assert g.prompt_len == p and len(g.sample_ids) == n and g.sample_ids[0] == g.seq_id
            running[rid] = set(g.sample_ids)
            for k, sid in enumerate(g.sample_ids):
                assert sid not in req_of
                req_of[sid], made[sid] = rid, 0
                if cfg:
                    uncond[sid] = g.uncond_sample_ids[k]
                    assert g.uncond_sample_ids[0] == g.uncond_seq_id
                assert bm.block_table(sid) == bm.block_table(g.seq_id), f"{tag}: fork does not share"
                assert s.sample_info(sid) == (rid, k, 0)
        for seq, n in zip(plan.prefill_seq_ids, plan.prefill_lens):
            assert plan.prefill_slot_mapping[off:off + n].tolist() == bm.slot_mapping(seq).tolist()
            off += n
        assert off == plan.prefill_slot_mapping.numel()
        if queue and not got:  # head did not fit: rows or blocks must be the reason
            p, n, m = info[queue[0]]
            st = s.stats()
            assert st.num_running_rows + h * n > max_rows or st.reserved_blocks + s.worst_case_blocks(p, n, m) > nb
        pending = list(plan.sample_ids)
        check_stats("after schedule")

        # protocol misuse while samples are pending: rejected, nothing changes
        if rng.random() < 0.1:
            with pytest.raises(SchedulerStateError, match="not reported"):
                s.schedule()
        if rng.random() < 0.1 and pending:
            with pytest.raises(SchedulerStateError, match="twice"):
                s.step_done([pending[0], pending[0]], [False, False])
        if rng.random() < 0.1:
            with pytest.raises(UnknownIdError):
                s.step_done([10**15], [False])
        check_stats("after misuse")

        # an abort while the plan is out: its samples vanish from the report
        if rng.random() < 0.04 and running:
            rid = rng.choice(list(running))
            s.abort(rid)
            ended[rid] = "aborted"
            for sid in running.pop(rid):
                del req_of[sid], made[sid]
            gone = [x for x in pending if x not in req_of]
            pending = [x for x in pending if x in req_of]
            if gone:
                with pytest.raises(UnknownIdError):
                    s.step_done([gone[0]], [False])
            check_stats("after mid-step abort")

        # report (possibly in several chunks, shuffled)
        rng.shuffle(pending)
        while pending:
            k = rng.randint(1, len(pending))
            chunk, pending = pending[:k], pending[k:]
            flags = [rng.random() < 0.1 for _ in chunk]
            done = s.step_done(chunk, flags)
            expect_done = []
            for sid, f in zip(chunk, flags):
                made[sid] += 1
                rid = req_of[sid]
                if f or made[sid] >= info[rid][2]:
                    running[rid].discard(sid)
                    del req_of[sid], made[sid]
                    assert not bm.has_seq(sid)
                    if cfg:
                        assert not bm.has_seq(uncond[sid])
                    if not running[rid]:
                        del running[rid]
                        expect_done.append(rid)
            assert done == expect_done, tag
            for rid in done:
                assert rid not in ended, f"{tag}: request {rid} finished twice"
                ended[rid] = "done"
            check_stats("after step_done")
        if rng.random() < 0.05 and req_of:
            sid = rng.choice(list(req_of))
            with pytest.raises(SchedulerStateError, match="not scheduled"):
                s.step_done([sid], [False])

    assert set(ended) == set(info), f"{tag}: every accepted request ends exactly once"
    assert [r for r in admitted] == sorted(admitted, key=lambda r: list(info).index(r)), tag
    st = s.stats()
    assert st.num_free_blocks == nb and st.reserved_blocks == 0 and bm.num_seqs() == 0, tag
    assert st.num_running_rows == 0 and st.num_waiting == 0 and st.num_pending_samples == 0, tag


@pytest.mark.parametrize("seed", range(40))
def test_random_scheduler_stream(seed):
    run_scheduler_stream(seed, 60)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(500, 700))
def test_random_scheduler_stream_stress(seed):
    run_scheduler_stream(seed, 300)


def test_many_small_requests_refill_every_row():
    s = BatchScheduler(num_blocks=64, block_size=4, max_batch_rows=4, cfg=True)
    for rid in range(50):
        s.add_request(rid, prompt_len=1 + rid % 5, num_samples=1 + rid % 2, max_new_tokens=1 + rid % 7)
    done, steps = [], 0
    while s.has_unfinished():
        plan = s.schedule()
        assert len(plan.decode_seq_ids) + 2 * sum(len(g.sample_ids) for g in plan.prefill) <= 4
        done += s.step_done(list(plan.sample_ids), [False] * len(plan.sample_ids))
        steps += 1
    assert sorted(done) == list(range(50)) and len(done) == 50
    assert s.stats().num_free_blocks == 64


def test_num_samples_above_max_batch_rows_is_a_clear_error():
    for cfg, rows in ((False, 3), (True, 6)):
        s = BatchScheduler(num_blocks=64, block_size=4, max_batch_rows=rows, cfg=cfg)
        with pytest.raises(ValueError, match="max_batch_rows"):
            s.add_request(0, 2, 4, 2)
        s.add_request(0, 2, 3, 2)  # exactly max_batch_rows rows
        assert s.stats().num_waiting == 1


# ----------------------------------------------------------------------------- Generator


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import pgen_engine as pg
    from pgen_engine.models.tiny import make_tiny_checkpoint

    return pg.load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", seed=0))


def test_continuous_generator_matches_waves_and_frees_its_pool(tiny_model, monkeypatch):
    import pgen_engine.generation.continuous as continuous
    from pgen_engine.generation import Generator

    made: list[BatchScheduler] = []

    class Recording(BatchScheduler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(continuous, "BatchScheduler", Recording)
    model = tiny_model
    sp, T = model.special_tokens, model.num_image_tokens
    seed0 = random.randrange(2**31)
    for trial in range(10):
        seed = seed0 + trial
        rng = random.Random(seed)
        B = rng.randint(1, 5)
        rows = [[sp.bos] + [rng.randint(6, 200) for _ in range(rng.choice([0, 3, 14, 15, 30, 40]))] + [sp.boi]
                for _ in range(B)]
        mbs = rng.randint(1, 4)
        msl = max(map(len, rows)) + T + rng.choice([0, 1, 17])
        kw = dict(num_samples=rng.randint(1, 6), guidance_scale=rng.choice([1.0, 4.0]), greedy=rng.random() < 0.5,
                  seed=rng.randrange(2**31), top_k=rng.choice([0, 10]), top_p=rng.choice([1.0, 0.9]))
        a = Generator(model, max_batch_size=mbs, max_seq_len=msl).generate(rows, **kw)
        cont = Generator(model, max_batch_size=mbs, max_seq_len=msl, scheduler="continuous")
        for _ in range(2):  # the same Generator twice: its pool starts free again
            made.clear()
            b = cont.generate(rows, **kw)
            assert torch.equal(a, b), f"seed={seed} mbs={mbs} {kw}: {(a != b).sum()} tokens differ"
            (sched,) = made
            st = sched.stats()
            assert st.num_free_blocks == st.num_blocks and st.reserved_blocks == 0, f"seed={seed}: {st}"
            assert sched.block_manager.num_seqs() == 0 and not sched.has_unfinished()
