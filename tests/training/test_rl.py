"""RL trainer: zero-advantage invariance, metrics, no ledger growth, config validation."""
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pgen_engine as pg
from pgen_engine.config import load_config
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.training import grpo
from pgen_engine.training import rl as rl_mod
from pgen_engine.training.memory_ledger import MemoryLedger
from pgen_engine.training.reference import ReferencePolicy
from pgen_engine.training.rl import (PromptBatch, RLConfig, RLConfigError, RLStage, RLTrainer, TorchOptimizerEngine,
                                     build_sequences, guided_policy_logprobs, policy_logprobs,
                                     sampling_params)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_rl"), seed=5, init_std=0.1, hidden_size=32,
                                num_layers=2, num_heads=4, num_kv_heads=2, codebook_size=23, image_size=16,
                                patch_size=4)


def _model(ckpt):
    return pg.load_model(ckpt, device="cpu", dtype=torch.float32)


class ColourReward:
    """Toy reward: fraction of codes below K/2 (deterministic, cheap). Components: 'low' and 'first'."""

    def __init__(self, K):
        self.K = K

    def __call__(self, batch, tokens, G):
        low = (tokens < self.K // 2).float().mean(1)
        first = (tokens[:, 0] % 2 == 0).float()
        return low + 0.5 * first, {"low": low, "first": first}


def _batch(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    sp = model.special_tokens
    prompts, masks = [], []
    for _ in range(B):
        n = int(torch.randint(3, 8, (), generator=g))
        prompts.append([sp.bos] + torch.randint(6, 200, (n,), generator=g).tolist() + [sp.boi])
        masks.append([False] * (n + 2))
    return PromptBatch(prompts, masks, list(range(seed, seed + B)), [[] for _ in range(B)], [[] for _ in range(B)])


def _trainer(model, rl, opt_cls=torch.optim.SGD, lr=0.05, ref=True, ledger=None, **opt_kw):
    eng = TorchOptimizerEngine(model, opt_cls(model.parameters(), lr=lr, **opt_kw), grad_accum=1)
    reference = ReferencePolicy.from_policy(model, "cpu") if ref else None
    G = rl.group_size
    return RLTrainer(eng, rl, ColourReward(model.codebook_size), reference, micro_batch_size=2 * G,
                     minibatch_size=2 * G, pad_id=model.special_tokens.pad, ledger=ledger)


def _rollout_inputs(tr, batch):
    ro = tr.hybrid.rollout(batch.prompts, batch.code_masks, sampling_params(tr.rl), batch.seeds)
    seqs = build_sequences(batch.prompts, batch.code_masks, ro.tokens, tr.rl.group_size, tr.pad_id)
    old = tr.score_logprobs(tr.module, seqs, ro.tokens)
    ref = tr.score_logprobs(tr.reference.module, seqs, ro.tokens) if tr.reference else None
    return seqs, ro.tokens, old, ref


def test_zero_advantage_leaves_weights_unchanged_without_kl(ckpt):
    model = _model(ckpt)
    rl = RLConfig(group_size=3, prompts_per_step=2, beta=0.0, reference="none", guidance_scale=2.0,
                  rewards={"preference": {"weight": 1.0}}, rollout_batch_size=6)
    tr = _trainer(model, rl, torch.optim.AdamW, lr=1e-2, ref=False, weight_decay=0.0)  # decay would move weights
    before = copy.deepcopy(model.state_dict())
    seqs, toks, old, _ = _rollout_inputs(tr, _batch(model, 2, 0))
    tr.update(seqs, toks, old, None, torch.zeros(toks.shape[0]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_zero_advantage_update_is_pure_kl_step(ckpt):
    m1 = _model(ckpt)
    rl = RLConfig(group_size=2, prompts_per_step=2, beta=0.3, guidance_scale=1.0,
                  rewards={"preference": {"weight": 1.0}}, rollout_batch_size=4)
    tr = _trainer(m1, rl, lr=0.5)
    # move the policy away from the reference so the KL gradient is non-zero
    with torch.no_grad():
        for p in m1.generation_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m2 = copy.deepcopy(m1)
    seqs, toks, old, ref = _rollout_inputs(tr, _batch(m1, 2, 1))
    tr.update(seqs, toks, old, ref, torch.zeros(toks.shape[0]))
    # hand-made step with only the k3 term
    opt = torch.optim.SGD(m2.parameters(), lr=0.5)
    lp, _ = policy_logprobs(m2, *seqs, toks, rl.temperature)
    kl = grpo.aggregate(grpo.k3_kl(lp, ref), torch.ones_like(lp, dtype=torch.bool), "token")
    assert float(kl.detach()) > 1e-4
    (0.3 * kl).backward()
    opt.step()
    s1, s2 = m1.state_dict(), m2.state_dict()
    changed = [k for k in s1 if not torch.equal(s1[k], ckpt_state(ckpt)[k])]
    assert changed, "the KL term should move the weights"
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-6, rtol=1e-5), k


_STATE = {}


def ckpt_state(ckpt):
    if ckpt not in _STATE:
        _STATE[ckpt] = _model(ckpt).state_dict()
    return _STATE[ckpt]


def test_step_metrics_and_no_ledger_growth_over_20_steps(ckpt):
    model = _model(ckpt)
    rl = RLConfig(group_size=2, prompts_per_step=2, beta=0.05, guidance_scale=2.0,
                  rewards={"preference": {"weight": 1.0}}, rollout_batch_size=4)
    tr = _trainer(model, rl, lr=0.01, ledger=MemoryLedger("cpu", scan_every=1))
    rows = []
    for s in range(20):
        b = _batch(model, 2, 100)  # same shapes every step, fresh sampling seeds
        b.seeds = [1000 + 2 * s, 1001 + 2 * s]
        rows.append(tr.step(s, b))
    r = rows[-1]
    for key in ("step", "reward", "reward/low", "reward/first", "kl", "logprob_gap_max", "logprob_gap_mean",
                "mem/rollout_kv_bytes", "mem/rollout_gathered_weights_bytes", "mem/update_activations_bytes",
                "mem/update_optimizer_states_bytes", "mem/total_bytes", "time/rollout_s", "time/update_s"):
        assert key in r, key
    assert all(row["logprob_gap_max"] <= 1e-5 for row in rows)
    totals = [row["mem/total_bytes"] for row in rows[1:]]
    assert max(totals) == min(totals)  # same shapes every step: identical accounting
    live = [row["mem/live_tensor_bytes"] for row in rows]
    # allow small noise (autograd/optimizer scalars), never a per-step leak
    assert live[-1] - live[2] < 64 * 1024, live
    assert rows[-1]["kl"] > 0


def test_rl_config_validation():
    with pytest.raises(RLConfigError, match="group_size"):
        RLConfig(group_size=1)
    with pytest.raises(RLConfigError, match="reference='none'"):
        RLConfig(reference="none", beta=0.1)
    with pytest.raises(RLConfigError, match="clip_eps"):
        RLConfig(clip_eps=1.5)
    with pytest.raises(RLConfigError, match="rewards"):
        RLConfig(rewards={})
    assert RLConfig(algorithm="ppo", group_size=1, rollout_batch_size=1).group_size == 1


def test_ppo_advantages_whiten_batch(ckpt):
    model = _model(ckpt)
    rl = RLConfig(algorithm="ppo", group_size=2, beta=0.0, reference="none", rollout_batch_size=4)
    tr = _trainer(model, rl, ref=False)
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    a = tr.advantages(r)
    assert torch.allclose(a, (r - 3.0) / (r.std(unbiased=False) + 1e-6))
    rl2 = RLConfig(group_size=2, beta=0.0, reference="none", rollout_batch_size=4)
    tr2 = _trainer(model, rl2, ref=False)
    assert torch.allclose(tr2.advantages(r), torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)


def test_build_sequences_alignment(ckpt):
    model = _model(ckpt)
    toks = torch.randint(0, model.codebook_size, (4, model.num_image_tokens))
    prompts = [[1, 7, 8, 3], [1, 3]]
    ids, cm, att = build_sequences(prompts, None, toks, 2, 0)
    T = model.num_image_tokens
    assert ids.shape == (4, 4 + T - 1)
    assert ids[2, -T:].tolist() == [3] + toks[2, :T - 1].tolist()  # boi then the codes it teacher-forces
    assert att[2].sum() == 2 + T - 1 and att[0].sum() == 4 + T - 1
    assert cm[:, -(T - 1):].all() and not cm[:, :-(T - 1)].any()
    with pytest.raises(ValueError, match="group_size"):
        build_sequences(prompts, None, toks, 3, 0)


def test_guided_ratio_is_one_before_the_first_update(ckpt):
    """rl.policy_distribution="guided" (the default at guidance 2): the rollout's guided
    log-probs equal the trainer's two-forward recomputation to fp32 rounding, so the first
    update's ratio is 1; the reference KL is on the guided distribution too."""
    model = _model(ckpt)
    rl = RLConfig(group_size=3, prompts_per_step=2, beta=0.05, guidance_scale=2.0, temperature=0.8,
                  rewards={"preference": {"weight": 1.0}}, rollout_batch_size=6)
    assert rl.policy_distribution == "guided" and sampling_params(rl).policy_distribution == "guided"
    tr = _trainer(model, rl, lr=0.05)
    rows = [tr.step(s, _batch(model, 2, 7 + s)) for s in range(3)]
    for r in rows:
        assert r["logprob_gap_max"] <= grpo.FP32_LOGPROB_GAP_TOL, r["logprob_gap_max"]
        # one minibatch per step: the ratio is taken before the optimizer moves the policy
        assert abs(r["ratio_max"] - 1.0) <= 1e-5 and abs(r["ratio_mean"] - 1.0) <= 1e-5
    assert rows[0]["kl"] < 1e-9 < rows[-1]["kl"]  # the policy starts at the reference, then moves
    # the trainer's old log-probs are the guided ones (not the conditional branch's)
    b = _batch(model, 2, 50)
    ro = tr.hybrid.rollout(b.prompts, b.code_masks, sampling_params(rl), b.seeds)
    seqs = build_sequences(b.prompts, b.code_masks, ro.tokens, 3, tr.pad_id)
    useqs = tr.uncond_sequences(b, ro.tokens)
    old = tr.score_logprobs(tr.module, seqs, ro.tokens, useqs)
    with torch.no_grad():
        lp, _ = guided_policy_logprobs(model, *seqs, *useqs, ro.tokens, 0.8, 2.0)
        cond, _ = policy_logprobs(model, *seqs, ro.tokens, 0.8)
    assert torch.equal(old, lp) and float((old - ro.logprobs).abs().max()) <= grpo.FP32_LOGPROB_GAP_TOL
    assert float((cond - ro.logprobs).abs().max()) > 1e-3
    # the update's gradient flows through the unconditional forward as well
    model.zero_grad()
    lp_g, _ = guided_policy_logprobs(model, *seqs, *useqs, ro.tokens, 0.8, 2.0)
    lp_g.sum().backward()
    assert model.generation_head.vision_head.weight.grad.abs().sum() > 0


def test_conditional_policy_distribution_keeps_conditional_logprobs(ckpt):
    """rl.policy_distribution="conditional" at guidance 2: no unconditional forward, the rollout
    records log_softmax(c / T) and the trainer scores exactly policy_logprobs."""
    model = _model(ckpt)
    rl = RLConfig(group_size=2, prompts_per_step=2, beta=0.05, guidance_scale=2.0, policy_distribution="conditional",
                  rewards={"preference": {"weight": 1.0}}, rollout_batch_size=4)
    assert sampling_params(rl).policy_distribution == "conditional"
    tr = _trainer(model, rl)
    b = _batch(model, 2, 3)
    ro = tr.hybrid.rollout(b.prompts, b.code_masks, sampling_params(rl), b.seeds)
    assert tr.uncond_sequences(b, ro.tokens) is None
    seqs = build_sequences(b.prompts, b.code_masks, ro.tokens, 2, tr.pad_id)
    with torch.no_grad():
        lp, _ = policy_logprobs(model, *seqs, ro.tokens, rl.temperature)
    assert torch.equal(tr.score_logprobs(tr.module, seqs, ro.tokens), lp)
    assert float((lp - ro.logprobs).abs().max()) <= grpo.FP32_LOGPROB_GAP_TOL
    # guidance 1: the guided distribution is the conditional one; no second forward either
    assert RLConfig(guidance_scale=1.0).policy_distribution == "conditional"


def test_rl_config_policy_distribution_validation():
    assert RLConfig(guidance_scale=3.0).policy_distribution == "guided"
    assert RLConfig(guidance_scale=3.0, policy_distribution="conditional").policy_distribution == "conditional"
    with pytest.raises(RLConfigError, match="rl.policy_distribution='cfg'"):
        RLConfig(policy_distribution="cfg")


def test_eval_prompts_fewer_than_ranks_is_a_config_error():
    # rl.eval_prompts=1 on 2 ranks: RLPromptSource.fixed_batch rounded it down to 0 prompts and
    # raised a plain ValueError (a traceback) after data preparation and the engine build
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_rl.yaml",
                      ["rl.eval_prompts=1", "train.global_batch_size=8", "rl.prompts_per_step=4", "rl.group_size=2"])
    stage = RLStage(cfg)
    stage.check_world(cfg, SimpleNamespace(world_size=1, device=torch.device("cpu")))  # 1 prompt on 1 rank: fine
    with pytest.raises(RLConfigError, match=r"rl\.eval_prompts=1: expected 0 \(off\) or >= the 2 ranks"):
        stage.check_world(cfg, SimpleNamespace(world_size=2, device=torch.device("cpu")))


@pytest.mark.parametrize("embedder, needle", [
    ({"type": "pixel_stats", "bogus": 1}, "rl.embedder: embedder spec type='pixel_stats': unknown field(s) ['bogus']"),
    ({"type": "pixel_stats", "batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"type": "model_vision", "image_size": 32}, "rl.embedder.type='model_vision': expected one of"),
])
def test_rl_embedder_spec_is_checked_with_the_config(embedder, needle):
    # these failed only when the RL stage built the reward (after data preparation and the engine
    # build) or, batch_size 0, at the first reward of the first step; model_vision can never work
    # in RL (build_reward_env passes no vision_model)
    with pytest.raises(RLConfigError) as e:
        RLConfig(embedder=embedder)
    assert needle in str(e.value)
    RLConfig(embedder={"type": "pixel_stats", "grid": 2, "bins": 4, "batch_size": 8})  # a good spec still passes


def test_diversity_reward_with_one_sample_per_prompt_is_a_config_error():
    # PPO with rl.group_size=1: DiversityReward scores an image alone in its group 0, so a weighted
    # diversity term was silently 0 on every step (measured: reward/diversity 0.0 throughout)
    with pytest.raises(RLConfigError, match=r"rl\.rewards\.diversity: in-group diversity needs rl\.group_size >= 2"):
        RLConfig(algorithm="ppo", group_size=1, rewards={"preference": {"weight": 1.0}, "diversity": {"weight": 0.1}})
    RLConfig(algorithm="ppo", group_size=1, rewards={"preference": {"weight": 1.0}, "diversity": {"weight": 0.0}})
    RLConfig(algorithm="ppo", group_size=2, rewards={"diversity": {"weight": 0.1}})
