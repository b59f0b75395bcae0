"""RLPromptSource: what the reward is given about each prompt's future."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from pgen_engine.config import RLConfig
from pgen_engine.data.dataset import Dataset, Interaction, Item
from pgen_engine.data.splits import build_splits
from pgen_engine.training.rl_env import RLPromptSource


class _Builder:
    """Codes-mode prompt builder stand-in: the prompt is the history codes."""

    mode, with_titles = "codes", False

    def build(self, codes, titles=None):
        ids = torch.cat([c for c in codes]) if codes else torch.zeros(0, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, gen_code_mask=torch.zeros_like(ids, dtype=torch.bool))


class _Cache:
    def codes(self, ids):
        return [torch.tensor([int(i[1:])]) for i in ids]


def _splits():
    # every item is consumed once, so a history window names its example
    order = list(range(72))
    random.Random(0).shuffle(order)
    items = {f"i{j}": Item(f"i{j}", "", None) for j in range(72)}
    inter = {f"u{u}": [Interaction(f"i{order[12 * u + t]}", float(t), 2 + 12 * u + t) for t in range(12)]
             for u in range(6)}
    return build_splits(Dataset(None, items, inter), k=3, min_interactions=4)


@pytest.mark.parametrize("include", [False, True])
def test_prompt_future_from_the_target_on_only_when_asked(include):
    sp = _splits()
    src = RLPromptSource(sp.train, sp, _Cache(), _Builder(), future_horizon=2, future_includes_target=include)
    batch = src.batch(0, 8)
    assert len(batch.future) == 8
    for h, fut in zip(batch.history, batch.future):
        (ex,) = [e for e in sp.train if list(e.history) == h]
        seq = sp.train_sequences[ex.user_id]
        want = seq[ex.position:ex.position + 2] if include else seq[ex.position + 1:ex.position + 3]
        assert fut == want and (ex.target in fut) == include


def test_rl_config_future_includes_target_defaults_off():
    assert RLConfig().future_includes_target is False
    assert RLConfig(future_includes_target=True, future_horizon=1).future_includes_target is True


def test_held_out_monitor_scores_valid_examples_against_their_own_target():
    sp = _splits()
    plain = RLPromptSource(sp.valid, sp, _Cache(), _Builder(), future_horizon=1, future_includes_target=True)
    assert all(f == [] for f in plain.fixed_batch(4).future)  # future_items never returns held-out targets
    src = RLPromptSource(sp.valid, sp, _Cache(), _Builder(), future_horizon=1, future_includes_target=True,
                         held_out_targets=True)
    batch = src.fixed_batch(4)
    for h, fut in zip(batch.history, batch.future):
        (ex,) = [e for e in sp.valid if list(e.history) == h]
        assert fut == [ex.target] and ex.target not in sp.train_sequences[ex.user_id]
    with pytest.raises(ValueError, match="valid/test examples only"):
        RLPromptSource(sp.train, sp, _Cache(), _Builder(), held_out_targets=True)
