"""Block manager and continuous-batching scheduler (pgen_engine.generation.scheduler).

The random-stream tests keep a fake paged KV cache (one int per slot) and write a distinct
value for every token of every sequence through the returned slots and copy-on-write
copies; reading each live sequence back through its block table must give exactly its own
tokens. That catches shared-slot writes, missing copies and stale tables at once.
"""
from __future__ import annotations

import random

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
    apply_block_copies,
)


class FakeCache:
    """[num_blocks, block_size] int64 cache; -1 = never written."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.data = np.full((num_blocks, block_size), -1, np.int64)
        self.bs = block_size

    def copy(self, src: int, dst: int) -> None:
        self.data[dst] = self.data[src]

    def write(self, slot: int, value: int) -> None:
        self.data[slot // self.bs, slot % self.bs] = value

    def read(self, bm: KVBlockManager, seq: int) -> list[int]:
        slots = bm.slot_mapping(seq).numpy()
        return self.data.reshape(-1)[slots].tolist()


def check_refcounts(bm: KVBlockManager) -> None:
    counts: dict[int, int] = {}
    for seq in bm.seq_ids():
        table = bm.block_table(seq)
        assert len(table) == bm.blocks_for_tokens(bm.seq_len(seq))
        for b in table:
            counts[b] = counts.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.refcount(b) == counts.get(b, 0), f"block {b}"
    assert bm.num_free_blocks() == bm.num_blocks - len(counts)


# ----------------------------------------------------------------------------- BlockManager


def test_allocate_slots_and_tables():
    bs = 5
    bm = KVBlockManager(num_blocks=9, block_size=bs)
    bm.allocate(10, 12)  # 3 blocks
    bm.allocate(11, 1)
    bm.allocate(12, 0)  # empty sequence: no block until the first append
    assert bm.num_free_blocks() == 9 - 4
    t = bm.block_table(10)
    slots = bm.slot_mapping(10)
    assert slots.dtype == torch.int64 and slots.shape == (12,)
    assert slots.tolist() == [t[p // bs] * bs + p % bs for p in range(12)]
    assert bm.slot_mapping(10, 4, 7).tolist() == slots[4:7].tolist()
    tables = bm.block_tables_tensor([11, 10, 12], max_blocks=4)
    assert tables.dtype == torch.int32 and tables.shape == (3, 4)
    assert tables[1, :3].tolist() == t and tables[1, 3] == 0
    assert tables[0].tolist() == [bm.block_table(11)[0], 0, 0, 0]
    assert tables[2].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="max_blocks"):
        bm.block_tables_tensor([10], max_blocks=2)
    slot, copy = bm.append_slot(12)
    assert copy is None and slot == bm.block_table(12)[0] * bs
    check_refcounts(bm)


def test_errors_are_specific():
    bm = KVBlockManager(num_blocks=4, block_size=3)
    bm.allocate(1, 7)  # 3 blocks
    with pytest.raises(SchedulerStateError, match="already exists"):
        bm.allocate(1, 1)
    with pytest.raises(OutOfKVBlocksError, match="out of KV blocks: need 2, free 1"):
        bm.allocate(2, 4)
    assert isinstance(OutOfKVBlocksError("x"), MemoryError)
    assert bm.num_free_blocks() == 1 and not bm.has_seq(2)  # nothing half-allocated
    with pytest.raises(UnknownIdError, match="unknown sequence id 5"):
        bm.append_slot(5)
    with pytest.raises(KeyError):
        bm.fork(5, 6)
    with pytest.raises(ValueError, match="outside sequence"):
        bm.slot_mapping(1, 0, 8)
    bm.free(1)
    with pytest.raises(UnknownIdError, match="double free"):
        bm.free(1)
    with pytest.raises(ValueError, match="block_size"):
        KVBlockManager(num_blocks=4, block_size=0)
    assert bm.num_free_blocks() == 4


def test_fork_shares_until_written():
    bs = 4
    bm = KVBlockManager(num_blocks=16, block_size=bs)
    bm.allocate(0, 10)  # blocks: full, full, partial (2 of 4 used)
    parent = bm.block_table(0)
    for child in (1, 2, 3):
        bm.fork(0, child)
    assert all(bm.block_table(c) == parent for c in (1, 2, 3))
    assert [bm.refcount(b) for b in parent] == [4, 4, 4]
    free_before = bm.num_free_blocks()
    # Children 1..3 write first: each copies the shared partial block.
    dsts = []
    for child in (1, 2, 3):
        slot, copy = bm.append_slot(child)
        assert copy is not None and copy[0] == parent[2]
        dsts.append(copy[1])
        assert bm.block_table(child)[:2] == parent[:2] and bm.block_table(child)[2] == copy[1]
        assert slot == copy[1] * bs + 2
    assert len(set(dsts)) == 3 and parent[2] not in dsts
    # The parent is now the only owner of its partial block: no copy.
    slot, copy = bm.append_slot(0)
    assert copy is None and slot == parent[2] * bs + 2
    assert bm.num_free_blocks() == free_before - 3
    assert bm.refcount(parent[0]) == 4 and bm.refcount(parent[2]) == 1
    check_refcounts(bm)
    for s in (0, 1, 2, 3):
        bm.free(s)
    assert bm.num_free_blocks() == 16


def test_fork_at_block_boundary_needs_no_copy():
    bm = KVBlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 8)
    bm.fork(0, 1)
    s0, c0 = bm.append_slot(0)
    s1, c1 = bm.append_slot(1)
    assert c0 is None and c1 is None and s0 != s1
    assert bm.block_table(0)[:2] == bm.block_table(1)[:2]


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_random_block_ops_keep_contents_and_leak_nothing(block_size):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    nb = 37
    bm = KVBlockManager(num_blocks=nb, block_size=block_size)
    cache = FakeCache(nb, block_size)
    content: dict[int, list[int]] = {}
    next_id, next_val = 0, 0
    for step in range(2500):
        op = rng.random()
        live = list(content)
        if op < 0.25 or not live:
            n = rng.randrange(0, 3 * block_size + 2)
            can = bm.can_allocate(n)
            try:
                bm.allocate(next_id, n)
            except OutOfKVBlocksError:
                assert not can
                continue
            assert can
            slots = bm.slot_mapping(next_id).tolist()
            vals = list(range(next_val, next_val + n))
            next_val += n
            for sl, v in zip(slots, vals):
                cache.write(sl, v)
            content[next_id] = vals
            next_id += 1
        elif op < 0.45:
            parent = rng.choice(live)
            bm.fork(parent, next_id)
            content[next_id] = list(content[parent])
            next_id += 1
        elif op < 0.85:
            seq = rng.choice(live)
            free_before = bm.num_free_blocks()
            try:
                slot, copy = bm.append_slot(seq)
            except OutOfKVBlocksError:
                assert free_before == 0
                continue
            if copy is not None:
                cache.copy(*copy)
            block = slot // block_size
            # The written block belongs to this sequence alone.
            assert bm.refcount(block) == 1, f"seed={seed} step={step}"
            cache.write(slot, next_val)
            content[seq].append(next_val)
            next_val += 1
        else:
            seq = rng.choice(live)
            bm.free(seq)
            del content[seq]
        if step % 50 == 0:
            check_refcounts(bm)
            for seq, vals in content.items():
                assert cache.read(bm, seq) == vals, f"seed={seed} step={step} seq={seq}"
    check_refcounts(bm)
    for seq, vals in content.items():
        assert cache.read(bm, seq) == vals, f"seed={seed}"
        bm.free(seq)
    assert bm.num_free_blocks() == nb and bm.num_seqs() == 0


def test_apply_block_copies_on_paged_cache():
    nb, bs, h, d = 6, 3, 2, 5
    k = torch.randn(nb, bs, h, d)
    v = torch.randn(nb, bs, h, d)
    k0, v0 = k.clone(), v.clone()
    copies = torch.tensor([[1, 4], [2, 0]], dtype=torch.int64)
    apply_block_copies([(k, v)], copies)
    assert torch.equal(k[4], k0[1]) and torch.equal(v[0], v0[2])
    assert torch.equal(k[[1, 2, 3, 5]], k0[[1, 2, 3, 5]])
    apply_block_copies([(k, v)], torch.empty(0, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[C, 2\]"):
        apply_block_copies([(k, v)], torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- Scheduler


def test_add_request_validation():
    s = BatchScheduler(num_blocks=10, block_size=4, max_batch_rows=6, cfg=True)
    # worst case: 2 halves * (shared 2 + 3 samples * (ceil(13/4) - 2 = 2)) = 16 > 10 blocks
    assert s.worst_case_blocks(9, 3, 4) == 16
    with pytest.raises(OutOfKVBlocksError, match="can never fit"):
        s.add_request(1, prompt_len=9, num_samples=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_batch_rows"):
        s.add_request(2, prompt_len=2, num_samples=4, max_new_tokens=1)  # 8 rows > 6
    with pytest.raises(ValueError, match="prompt_len"):
        s.add_request(3, prompt_len=0, num_samples=1, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.add_request(3, prompt_len=2, num_samples=1, max_new_tokens=0)
    s.add_request(3, prompt_len=2, num_samples=1, max_new_tokens=2)
    with pytest.raises(SchedulerStateError, match="already queued"):
        s.add_request(3, prompt_len=2, num_samples=1, max_new_tokens=2)
    assert s.stats().num_waiting == 1


def test_protocol_errors_and_refill():
    s = BatchScheduler(num_blocks=4, block_size=4, max_batch_rows=8, cfg=False)
    s.add_request(7, prompt_len=5, num_samples=2, max_new_tokens=3)  # 1 + 2*(2-1) = 3 blocks
    s.add_request(8, prompt_len=2, num_samples=1, max_new_tokens=2)  # 1 block
    s.add_request(9, prompt_len=1, num_samples=1, max_new_tokens=3)  # 1 block: must wait
    plan = s.schedule()
    assert [g.request_id for g in plan.prefill] == [7, 8]
    g7 = plan.prefill[0]
    assert g7.sample_ids[0] == g7.seq_id and len(g7.sample_ids) == 2
    assert plan.prefill_lens == (5, 2) and plan.prefill_slot_mapping.shape == (7,)
    assert s.stats().num_waiting == 1 and s.stats().reserved_blocks == 4
    with pytest.raises(SchedulerStateError, match="not reported"):
        s.schedule()
    with pytest.raises(UnknownIdError):
        s.step_done([12345], [False])
    with pytest.raises(ValueError, match="finished flags"):
        s.step_done([g7.seq_id], [])
    with pytest.raises(SchedulerStateError, match="twice"):
        s.step_done([g7.seq_id, g7.seq_id], [False, False])
    assert s.stats().num_pending_samples == 3  # failed calls changed nothing
    # Request 8 ends at once (EOS): its block and reservation free up for request 9.
    done = s.step_done(list(plan.sample_ids), [False, False, True])
    assert done == [8]
    with pytest.raises(SchedulerStateError, match="not scheduled"):
        s.step_done([g7.seq_id], [False])
    plan2 = s.schedule()
    assert [g.request_id for g in plan2.prefill] == [9]
    assert plan2.decode_sample_ids == g7.sample_ids
    # The two samples of request 7 share a partial prompt block: one copy-on-write.
    assert plan2.copies.shape == (1, 2)
    assert plan2.decode_context_lens.tolist() == [6, 6]
    assert plan2.decode_block_tables.shape == (2, 2)
    assert s.sample_info(g7.sample_ids[1]) == (7, 1, 1)
    s.abort(7)
    with pytest.raises(UnknownIdError):
        s.abort(7)
    s.step_done(list(plan2.prefill[0].sample_ids), [True])
    assert not s.has_unfinished()
    assert s.stats().num_free_blocks == 4 and s.stats().reserved_blocks == 0


@pytest.mark.parametrize("cfg", [False, True])
def test_random_request_stream(cfg):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    nb, bs, max_rows = 48, rng.choice([2, 3, 5]), rng.choice([6, 9, 16])
    s = BatchScheduler(num_blocks=nb, block_size=bs, max_batch_rows=max_rows, cfg=cfg)
    bm = s.block_manager
    cache = FakeCache(nb, bs)
    halves = 2 if cfg else 1
    content: dict[int, list[int]] = {}  # every live sequence's expected KV values
    uncond_of: dict[int, int] = {}
    req_info: dict[int, tuple[int, int, int]] = {}
    added: list[int] = []
    admitted: list[int] = []
    completed: set[int] = set()
    next_req, next_val, total_steps = 0, 0, 0
    while (next_req < 120 or s.has_unfinished()) and total_steps < 5000:
        total_steps += 1
        for _ in range(rng.choice([0, 0, 1, 2])):
            if next_req >= 120:
                break
            p, n, m = rng.randint(1, 3 * bs + 1), rng.randint(1, 3), rng.randint(1, 4 * bs)
            if n * halves > max_rows:
                n = 1
            if s.worst_case_blocks(p, n, m) > nb:
                with pytest.raises(OutOfKVBlocksError, match="can never fit"):
                    s.add_request(next_req, p, n, m)
            else:
                s.add_request(next_req, p, n, m)
                added.append(next_req)
                req_info[next_req] = (p, n, m)
            next_req += 1
        plan = s.schedule()
        st = s.stats()
        used = nb - st.num_free_blocks
        assert used <= st.reserved_blocks <= nb, f"seed={seed}"
        assert st.num_running_rows <= max_rows
        assert len(plan.decode_seq_ids) == halves * len(plan.decode_sample_ids)
        # Copy-on-write first, then every write this step.
        for src, dst in plan.copies.tolist():
            cache.copy(src, dst)
        offset = 0
        for seq, n_tok in zip(plan.prefill_seq_ids, plan.prefill_lens):
            vals = list(range(next_val, next_val + n_tok))
            next_val += n_tok
            for sl, v in zip(plan.prefill_slot_mapping[offset : offset + n_tok].tolist(), vals):
                cache.write(sl, v)
            offset += n_tok
            content[seq] = vals
        assert offset == plan.prefill_slot_mapping.numel()
        for g in plan.prefill:
            admitted.append(g.request_id)
            assert len(g.sample_ids) == req_info[g.request_id][1]
            for k, sid in enumerate(g.sample_ids):
                content[sid] = list(content[g.seq_id])
                if cfg:
                    uncond_of[sid] = g.uncond_sample_ids[k]
                    content[g.uncond_sample_ids[k]] = list(content[g.uncond_seq_id])
        written = set()
        for row, seq in enumerate(plan.decode_seq_ids):
            slot = int(plan.decode_slot_mapping[row])
            assert slot not in written, "two rows write one slot"
            written.add(slot)
            assert bm.refcount(slot // bs) == 1
            cache.write(slot, next_val)
            content[seq].append(next_val)
            next_val += 1
            assert int(plan.decode_context_lens[row]) == len(content[seq])
            table = plan.decode_block_tables[row].tolist()
            n_blk = bm.blocks_for_tokens(len(content[seq]))
            assert table[:n_blk] == bm.block_table(seq)
        if cfg:
            r = len(plan.decode_sample_ids)
            assert [uncond_of[x] for x in plan.decode_sample_ids] == list(plan.decode_seq_ids[r:])
        # Every live sequence reads back exactly its own tokens.
        for seq, vals in content.items():
            assert cache.read(bm, seq) == vals, f"seed={seed} seq={seq}"
        ids = list(plan.sample_ids)
        finished = [rng.random() < 0.15 for _ in ids]
        done = s.step_done(ids, finished)
        completed.update(done)
        for sid in ids:
            if not bm.has_seq(sid):
                del content[sid]
                if cfg:
                    assert not bm.has_seq(uncond_of[sid])
                    del content[uncond_of[sid]]
        for seq in list(content):
            if not bm.has_seq(seq):  # prompt parents that were not a sample id
                del content[seq]
    assert admitted == added, "admission must be FIFO and admit everything"
    assert completed == set(added)
    st = s.stats()
    assert st.num_free_blocks == nb and st.reserved_blocks == 0 and bm.num_seqs() == 0, f"seed={seed}"
    assert st.num_running_rows == 0 and st.num_waiting == 0


def test_refilled_rows_respect_max_new_tokens():
    s = BatchScheduler(num_blocks=64, block_size=4, max_batch_rows=2, cfg=False)
    for rid in range(3):
        s.add_request(rid, prompt_len=3, num_samples=1, max_new_tokens=3 + rid)
    order, steps = [], 0
    while s.has_unfinished():
        plan = s.schedule()
        assert len(plan.decode_seq_ids) + sum(len(g.sample_ids) for g in plan.prefill) <= 2
        order += s.step_done(list(plan.sample_ids), [False] * len(plan.sample_ids))
        steps += 1
    # Requests 0 and 1 run together; 2 takes request 0's row after it ends (3 tokens).
    assert order == [0, 1, 2] and steps == 3 + 5
