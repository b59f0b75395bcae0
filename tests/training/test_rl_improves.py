"""RL raises a reward: GRPO through the real trainer (hybrid rollout -> reward -> training-numerics
log-probs -> clipped update) on a tiny random Janus.

Reward: the fraction of an image's codes in the lower half of the codebook (a per-token
learnable signal; deterministic). Measured on this CPU (AdamW lr 1e-3, G=8, 4 prompts/step,
no KL, 24 steps), mean reward of the first two steps -> last two steps: seed 0 went
0.47 -> 0.73; seeds 0 and 1 both clear the asserted +0.1 margin. The synthetic
attribute-match reward from the demo SFT policy is NOT asserted here: with the current
demo SFT checkpoint the policy samples at chance level and 40 GRPO steps did not move it
(numbers in the RL stage report).
"""
from __future__ import annotations

import pytest
import torch

import pgen_engine as pg
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.training.rl import PromptBatch, RLConfig, RLTrainer, TorchOptimizerEngine

pytestmark = pytest.mark.e2e
STEPS = 24


class LowCodesReward:
    """Reward = fraction of codes < K/2 per image; components {"low"}."""

    def __init__(self, K: int):
        self.K = K

    def __call__(self, batch, tokens, G):
        low = (tokens < self.K // 2).float().mean(1)
        return low, {"low": low}


def _batch(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    sp = model.special_tokens
    prompts = []
    for _ in range(B):
        n = int(torch.randint(3, 9, (), generator=g))
        prompts.append([sp.bos] + torch.randint(6, 200, (n,), generator=g).tolist() + [sp.boi])
    return PromptBatch(prompts, [[False] * len(p) for p in prompts], [seed * 100 + i for i in range(B)],
                       [[] for _ in range(B)], [[] for _ in range(B)])


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_reward(tmp_path, seed):
    torch.manual_seed(seed)
    ck = make_tiny_checkpoint(tmp_path / "ck", seed=seed + 5, init_std=0.1, hidden_size=32, num_layers=2,
                              num_heads=4, num_kv_heads=2, codebook_size=23, image_size=16, patch_size=4)
    model = pg.load_model(ck, device="cpu", dtype=torch.float32)
    rl = RLConfig(group_size=8, prompts_per_step=4, beta=0.0, reference="none", guidance_scale=1.0,
                  rollout_batch_size=32)
    eng = TorchOptimizerEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    tr = RLTrainer(eng, rl, LowCodesReward(model.codebook_size), None, micro_batch_size=16, minibatch_size=32,
                   pad_id=model.special_tokens.pad)
    rewards = [tr.step(s, _batch(model, 4, 1000 * seed + s))["reward"] for s in range(STEPS)]
    before, after = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert after > before + 0.1, f"seed {seed}: reward {before:.3f} -> {after:.3f} ({[round(r, 3) for r in rewards]})"
