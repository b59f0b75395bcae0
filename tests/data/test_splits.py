import random

import pytest

from pgen_engine.data.dataset import Dataset, Interaction, Item, load_dataset
from pgen_engine.data.splits import build_splits


def _random_dataset(seed, users=17, items=40):
    rng = random.Random(seed)
    its = {f"i{j}": Item(f"i{j}", "", None) for j in range(items)}
    inter = {}
    line = 2
    for u in range(users):
        n = rng.randint(1, 15)
        t = rng.randint(0, 100)
        seq = []
        for _ in range(n):
            t += rng.choice([0, 0, 1, 5])  # many ties
            seq.append(Interaction(f"i{rng.randrange(items)}", float(t), line))
            line += 1
        inter[f"u{u}"] = seq
    return Dataset(None, its, inter)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,stride,maxw", [(1, 1, None), (3, 2, None), (4, 1, 3)])
def test_leave_one_out_and_no_leakage(seed, k, stride, maxw):
    ds = _random_dataset(seed)
    sp = build_splits(ds, k=k, stride=stride, max_windows_per_user=maxw, min_interactions=4)
    order = {u: [(x.timestamp, x.line) for x in seq] for u, seq in ds.interactions.items()}
    kept = {u for u, s in ds.interactions.items() if len(s) >= 4}
    assert set(sp.train_sequences) == kept
    assert {e.user_id for e in sp.test} == kept == {e.user_id for e in sp.valid}
    per_user = {}
    for ex in sp.train:
        seq = ds.item_sequence(ex.user_id)
        assert ex.position < len(seq) - 2  # inside train
        assert seq[ex.position] == ex.target
        assert 1 <= len(ex.history) <= k
        assert tuple(seq[ex.position - len(ex.history):ex.position]) == ex.history
        # history strictly before the target in (timestamp, line) order
        assert all(order[ex.user_id][p] < order[ex.user_id][ex.position]
                   for p in range(ex.position - len(ex.history), ex.position))
        held = set(seq[-2:])
        assert ex.target not in held  # no test/valid item as a training target
        per_user.setdefault(ex.user_id, []).append(ex.position)
    for u, pos in per_user.items():
        assert pos == sorted(pos)
        if maxw is not None:
            assert len(pos) <= maxw
        assert all(b - a >= stride for a, b in zip(pos, pos[1:]))
    for ex in sp.test:
        seq = ds.item_sequence(ex.user_id)
        assert ex.target == seq[-1] and ex.history == tuple(seq[:-1][-k:])
        assert sp.future_items(ex) == []
    for ex in sp.valid:
        seq = ds.item_sequence(ex.user_id)
        assert ex.target == seq[-2] and ex.history == tuple(seq[:-2][-k:])


def test_future_items_and_latest_window_kept():
    ds = _random_dataset(7, users=5)
    sp = build_splits(ds, k=2, stride=3, min_interactions=3)
    for ex in sp.train:
        seq = ds.item_sequence(ex.user_id)
        assert sp.future_items(ex) == seq[ex.position + 1:len(seq) - 2]
        assert sp.future_items(ex, horizon=1) == seq[ex.position + 1:len(seq) - 2][:1]
    for u, tr in sp.train_sequences.items():
        wins = [e for e in sp.train if e.user_id == u]
        if len(tr) >= 2 and tr[-1] not in set(ds.item_sequence(u)[-2:]):
            assert wins[-1].position == len(tr) - 1


def test_bad_settings():
    ds = _random_dataset(0)
    for kw in ({"k": 0}, {"stride": 0}, {"min_interactions": 2}, {"min_history": 5, "k": 4},
               {"max_windows_per_user": 0}):
        with pytest.raises(ValueError):
            build_splits(ds, **kw)


def test_movielens_splits(movielens):
    ds = load_dataset(movielens)
    sp = build_splits(ds, k=4, max_windows_per_user=20)
    assert sp.stats()["users"] == 597 and len(sp.test) == 597
    assert 0 < len(sp.train) <= 597 * 20
    test_targets = {(e.user_id, e.target) for e in sp.test}
    assert not any((e.user_id, e.target) in test_targets for e in sp.train)


@pytest.mark.parametrize("seed", [0, 1])
def test_future_items_include_target_starts_at_the_windows_own_target(seed):
    """RL's next-item reward: a train window's future from its target on; held-out targets never."""
    ds = _random_dataset(seed)
    sp = build_splits(ds, k=3, min_interactions=4)
    assert sp.train
    for ex in sp.train:
        train_seq = sp.train_sequences[ex.user_id]
        fut = sp.future_items(ex, include_target=True)
        assert fut[0] == ex.target and fut == train_seq[ex.position:]
        assert fut[1:] == sp.future_items(ex)
        assert sp.future_items(ex, 1, include_target=True) == [ex.target]
    for ex in sp.valid + sp.test:  # the valid / test target is not a train-split item
        assert sp.future_items(ex, include_target=True) == []
