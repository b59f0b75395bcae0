"""RL steps with pixels history: how often the vision tower runs, and that sharing its
outputs changes neither the samples nor the gradients."""
import copy

import pytest
import torch

import pgen_engine as pg
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.training.reference import ReferencePolicy
from pgen_engine.training.rl import (PromptBatch, RLConfig, RLTrainer, TorchOptimizerEngine, build_sequences,
                                     policy_logprobs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hist"), seed=9, init_std=0.1, hidden_size=32,
                                num_layers=2, num_heads=4, num_kv_heads=2, codebook_size=23, image_size=16,
                                patch_size=4)


def _model(ckpt, tower_trains: bool):
    m = pg.load_model(ckpt, device="cpu", dtype=torch.float32)
    for p in m.vision_model.parameters():
        p.requires_grad_(tower_trains)
    return m


class _Reward:
    def __call__(self, batch, tokens, G):
        low = (tokens < 11).float().mean(1)
        return low, {"low": low}


# three prompts over five catalogue items; items "b" and "c" appear in several prompts
HISTORIES = [["a", "b"], ["b", "c", "d"], ["c", "e", "b"]]
DISTINCT = 5


def _batch(model, cached: bool) -> PromptBatch:
    sp, T, S = model.special_tokens, model.num_image_tokens, model.image_size
    g = torch.Generator().manual_seed(0)
    images = {i: torch.rand(3, S, S, generator=g) * 2 - 1 for i in "abcde"}
    prompts = [[sp.bos, 40 + k] + ([sp.boi] + [sp.image] * T + [sp.eoi]) * len(h) + [sp.boi]
               for k, h in enumerate(HISTORIES)]
    px = [torch.stack([images[i] for i in h]) for h in HISTORIES]
    feats = None
    if cached:
        with torch.no_grad():
            feats = [model.vision_hidden(p) for p in px]
    return PromptBatch(prompts, None, [1, 2, 3], [list(h) for h in HISTORIES], [[] for _ in HISTORIES],
                       pixel_values=px, image_features=feats)


def _trainer(model, G: int, micro: int):
    rl = RLConfig(group_size=G, prompts_per_step=len(HISTORIES), beta=0.05, guidance_scale=2.0,
                  rewards={"preference": {"weight": 1.0}}, rollout_batch_size=2 * G)
    eng = TorchOptimizerEngine(model, torch.optim.SGD(model.parameters(), lr=0.05), grad_accum=1)
    return RLTrainer(eng, rl, _Reward(), ReferencePolicy.from_policy(model, "cpu"), micro_batch_size=micro,
                     minibatch_size=micro, pad_id=model.special_tokens.pad)


class _Count:
    """Images through a module's vision tower, by grad mode."""

    def __init__(self, model):
        self.grad, self.nograd = [], []
        self.h = model.vision_model.register_forward_hook(
            lambda mod, inp, out: (self.grad if torch.is_grad_enabled() else self.nograd).append(inp[0].shape[0]))

    def close(self):
        self.h.remove()


def test_frozen_tower_rl_step_never_calls_the_tower(ckpt):
    """Cached features (frozen tower): rollout, log-probs, reference and update run without the tower."""
    model = _model(ckpt, tower_trains=False)
    tr = _trainer(model, G=2, micro=2)
    batch = _batch(model, cached=True)
    pol, ref = _Count(model), _Count(tr.reference.module)
    try:
        row = tr.step(1, batch)
    finally:
        pol.close()
        ref.close()
    assert pol.grad == pol.nograd == ref.grad == ref.nograd == []
    assert row["logprob_gap_max"] <= 1e-5  # the rollout read the same features as the trainer


def test_trainable_tower_encodes_each_distinct_item_once_per_pass(ckpt):
    """Trainable tower: the rollout + policy log-probs share one no-grad encoding of each distinct
    item, the reference one of its own, and the update one with grad per micro-batch (here the
    whole batch) — instead of one per row (3 prompts x G=4 rows x 2-3 images = 32 encodings)."""
    model = _model(ckpt, tower_trains=True)
    G = 4
    tr = _trainer(model, G=G, micro=len(HISTORIES) * G)
    batch = _batch(model, cached=False)
    pol, ref = _Count(model), _Count(tr.reference.module)
    try:
        row = tr.step(1, batch)
    finally:
        pol.close()
        ref.close()
    assert sum(pol.nograd) == DISTINCT and sum(ref.nograd) == DISTINCT and ref.grad == []
    assert pol.grad == [DISTINCT]
    assert tr.history_features.policy_encoded == DISTINCT
    assert row["logprob_gap_max"] <= 1e-5
    # the update changed the tower: the next step's features are encoded again, from the new weights
    pol = _Count(model)
    try:
        tr.evaluate(batch)
    finally:
        pol.close()
    assert sum(pol.nograd) == DISTINCT and tr.history_features.policy_encoded == 2 * DISTINCT


def test_update_gradients_equal_per_row_reencode(ckpt):
    """Encoding each distinct item once with grad and indexing it per row gives the gradients of
    re-encoding every row's images (summed over every use, not detached)."""
    m1 = _model(ckpt, tower_trains=True)
    m2 = copy.deepcopy(m1)
    G, T = 3, m1.num_image_tokens
    batch = _batch(m1, cached=False)
    tokens = torch.randint(0, m1.codebook_size, (len(HISTORIES) * G, T), generator=torch.Generator().manual_seed(1))
    seqs = build_sequences(batch.prompts, None, tokens, G, m1.special_tokens.pad, batch.pixel_values,
                           history_items=batch.history)
    rows, dev = slice(0, tokens.shape[0]), torch.device("cpu")
    weights = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(2))
    pixels, none, index = seqs.tower_history(rows, dev)
    assert none is None and pixels.shape[0] == DISTINCT and index.numel() == G * sum(map(len, HISTORIES))
    c1 = _Count(m1)
    try:
        lp1, _ = policy_logprobs(m1, *seqs.rows(rows, dev), tokens, 1.0, pixels, None, index)
    finally:
        c1.close()
    lp2, _ = policy_logprobs(m2, *seqs.rows(rows, dev), tokens, 1.0, *seqs.history(rows, dev))
    assert c1.grad == [DISTINCT]
    assert float((lp1 - lp2).detach().abs().max()) <= 1e-5
    (lp1 * weights).sum().backward()
    (lp2 * weights).sum().backward()
    g1 = dict(m1.vision_model.named_parameters())
    worst = max(float((p.grad - g1[n].grad).abs().max()) for n, p in m2.vision_model.named_parameters())
    assert worst <= 1e-5
    assert max(float(p.grad.abs().max()) for p in m1.vision_model.parameters()) > 1e-4  # the tower does train
    with pytest.raises(ValueError, match="pixel_index"):
        policy_logprobs(m1, *seqs.rows(rows, dev), tokens, 1.0, None, None, index)
