"""Chronological leave-one-out splits and history windows.

Per user, interactions are ordered by (timestamp, line in interactions.csv): equal
timestamps keep file order, so "later" always means "later in that order". Then:

* users with fewer than ``min_interactions`` (>= 3) interactions are dropped;
* the last interaction is the test target, the second last the valid target, the rest
  is the user's train sequence;
* train examples are windows over the train sequence: the target at position ``t``,
  history = the up to ``k`` items right before it. Targets are taken from the end of
  the sequence backwards every ``stride`` positions (so the most recent one is always
  used), at least ``min_history`` history items, at most ``max_windows_per_user`` per
  user (the most recent ones), returned in time order;
* the valid example's history is the last ``k`` train items; the test example's is the
  last ``k`` of train + valid;
* no leakage: a window's history is strictly before its target in the order above, and
  a train window never targets the user's valid or test item (such windows are dropped,
  relevant only when a user re-interacts with the same item);
* ``future_items(example)`` are the user's train items after the example's target (with
  ``include_target``, from the target on) — the "future interest" an RL reward can score
  against (empty for valid/test examples).
"""
from __future__ import annotations

import dataclasses

from .dataset import Dataset

#: a user's last two interactions are the valid / test targets, so a user needs at least this many
SPLIT_MIN_INTERACTIONS = 3
#: users with fewer interactions are left out by default (``data.min_interactions``)
DEFAULT_MIN_INTERACTIONS = 5


@dataclasses.dataclass(frozen=True)
class Example:
    """One "history -> next item" example.

    Attributes:
        user_id: the user.
        history: item ids, oldest first (length <= k).
        target: the item id to generate.
        position: index of the target in the user's full (time-ordered) sequence.
        split: "train", "valid" or "test".
    """

    user_id: str
    history: tuple[str, ...]
    target: str
    position: int
    split: str


@dataclasses.dataclass
class Splits:
    """Examples of the three splits plus each user's train sequence."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    train_sequences: dict[str, list[str]]
    k: int

    def future_items(self, example: Example, horizon: int | None = None, *,
                     include_target: bool = False) -> list[str]:
        """The user's train-split items after ``example``'s history window (up to ``horizon``).

        By default strictly after the example's target; with ``include_target`` the target
        itself comes first. Only a train window's target is a train-split item: for valid /
        test examples both forms are empty, so the held-out targets are never returned.
        """
        seq = self.train_sequences.get(example.user_id, [])
        start = example.position if include_target else example.position + 1
        fut = seq[start:] if start < len(seq) else []
        return fut if horizon is None else fut[:horizon]

    def stats(self) -> dict[str, int]:
        return {"users": len(self.train_sequences), "train": len(self.train),
                "valid": len(self.valid), "test": len(self.test)}


def build_splits(
    dataset: Dataset,
    *,
    k: int = 4,
    stride: int = 1,
    max_windows_per_user: int | None = None,
    min_interactions: int = DEFAULT_MIN_INTERACTIONS,
    min_history: int = 1,
) -> Splits:
    """Leave-one-out splits with training windows (rules in the module docstring).

    Raises ValueError for nonsensical settings (k < 1, stride < 1, min_interactions < 3,
    min_history outside [1, k]).
    """
    if k < 1 or stride < 1:
        raise ValueError(f"k and stride must be >= 1, got k={k}, stride={stride}")
    if min_interactions < SPLIT_MIN_INTERACTIONS:
        raise ValueError(f"min_interactions must be >= {SPLIT_MIN_INTERACTIONS} (train + valid + test), "
                         f"got {min_interactions}")
    if not 1 <= min_history <= k:
        raise ValueError(f"min_history must be in [1, k={k}], got {min_history}")
    if max_windows_per_user is not None and max_windows_per_user < 1:
        raise ValueError(f"max_windows_per_user must be >= 1 or None, got {max_windows_per_user}")
    train: list[Example] = []
    valid: list[Example] = []
    test: list[Example] = []
    seqs: dict[str, list[str]] = {}
    for uid, events in dataset.interactions.items():
        if len(events) < min_interactions:
            continue
        # Loader guarantees time order with ties in file order; re-sort defensively on the
        # same key so hand-built Datasets behave identically.
        events = sorted(events, key=lambda x: (x.timestamp, x.line))
        items = [x.item_id for x in events]
        tr = items[:-2]
        seqs[uid] = tr
        held_out = {items[-2], items[-1]}
        windows = []
        for t in range(len(tr) - 1, min_history - 1, -stride):
            if tr[t] in held_out:
                continue
            windows.append(Example(uid, tuple(tr[max(0, t - k):t]), tr[t], t, "train"))
            if max_windows_per_user is not None and len(windows) >= max_windows_per_user:
                break
        train.extend(reversed(windows))
        n = len(items)
        valid.append(Example(uid, tuple(tr[-k:]), items[-2], n - 2, "valid"))
        test.append(Example(uid, tuple(items[:-1][-k:]), items[-1], n - 1, "test"))
    return Splits(train, valid, test, seqs, k)
