"""Rollouts (hybrid engine) through the Generator on the policy's own weights, and the reference policy."""
import gc

import pytest
import torch

import pgen_engine as pg
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.training.engine import gathered_module, is_zero3
from pgen_engine.training.grpo import FP32_LOGPROB_GAP_TOL
from pgen_engine.training.reference import ReferencePolicy
from pgen_engine.generation import SamplingParams
from pgen_engine.training.rollout import HybridEngine, RolloutParams, generator_rows
from pgen_engine.training.memory_ledger import MemoryLedger, live_tensor_bytes
from pgen_engine.training.rl import build_sequences, policy_logprobs


@pytest.fixture(scope="module")
def tiny_ckpt_path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11, init_std=0.1, hidden_size=48, num_layers=2,
                                num_heads=4, num_kv_heads=2, codebook_size=37, image_size=16, patch_size=4)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt_path):
    return pg.load_model(tiny_ckpt_path, device="cpu", dtype=torch.float32)


def _params(G: int, guidance: float, temperature: float, mode: str = "pad") -> RolloutParams:
    return RolloutParams(G, SamplingParams(guidance_scale=guidance, temperature=temperature), mode)


def _prompts(model, B, g):
    sp = model.special_tokens
    prompts, masks = [], []
    for _ in range(B):
        n_txt = int(torch.randint(2, 9, (), generator=g))
        n_code = int(torch.randint(0, 7, (), generator=g))
        txt = torch.randint(6, 200, (n_txt,), generator=g).tolist()
        codes = torch.randint(0, model.codebook_size, (n_code,), generator=g).tolist()
        prompts.append([sp.bos] + txt + [sp.boi] + codes + [sp.eoi, sp.boi])
        masks.append([False] * (2 + n_txt) + [True] * n_code + [False, False])
    return prompts, masks


@pytest.mark.parametrize("guidance,temperature,mode", [(3.0, 0.7, "pad"), (1.0, 1.3, "pad"), (4.0, 1.0, "short")])
def test_rollout_logprob_gap_fp32(tiny, guidance, temperature, mode):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    B, G = 3, 4
    prompts, masks = _prompts(tiny, B, g)
    hy = HybridEngine(tiny, max_batch_size=8)  # 2 prompts per Generator call: exercises chunking
    ro = hy.rollout(prompts, masks, _params(G, guidance, temperature, mode), seeds=[5, 6, 7])
    T = tiny.num_image_tokens
    assert ro.tokens.shape == (B * G, T) and ro.logprobs.shape == (B * G, T)
    assert (ro.logprobs <= 0).all() and ro.kv_bytes > 0
    seqs = build_sequences(prompts, masks, ro.tokens, G, tiny.special_tokens.pad)
    with torch.no_grad():
        lp, _ = policy_logprobs(tiny, *seqs, ro.tokens, temperature)
    gap = (lp - ro.logprobs).abs()
    assert float(gap.max()) <= FP32_LOGPROB_GAP_TOL, float(gap.max())
    # samples of one prompt differ (they are sampled, not copies)
    assert not torch.equal(ro.tokens[0], ro.tokens[1])


def test_rollout_is_deterministic_and_batch_independent(tiny):
    g = torch.Generator().manual_seed(1)
    prompts, masks = _prompts(tiny, 3, g)
    p = _params(2, 2.0, 1.0)
    a = HybridEngine(tiny, max_batch_size=6).rollout(prompts, masks, p, seeds=[1, 2, 3])
    b = HybridEngine(tiny, max_batch_size=2).rollout(prompts[1:], masks[1:], p, seeds=[2, 3])
    assert torch.equal(a.tokens[2:], b.tokens)
    assert torch.allclose(a.logprobs[2:], b.logprobs, atol=1e-6)


def test_generator_rows_counts_what_this_rank_generates():
    assert generator_rows(4, 8, 64) == 32  # 4 prompts on this rank x 8 samples, not the 64-row budget
    assert generator_rows(16, 8, 64) == 64  # more prompts than one call holds: 8 per call
    assert generator_rows(3, 8, 12) == 8  # budget below two groups: one whole group per call
    with pytest.raises(ValueError, match="num_prompts"):
        generator_rows(0, 8, 64)


def test_rollout_cache_is_sized_by_the_prompts_this_rank_holds(tiny):
    """2 prompts x 2 samples with a 64-row budget: the Generator holds 4 rows, not 64."""
    g = torch.Generator().manual_seed(3)
    prompts, masks = _prompts(tiny, 2, g)
    p = _params(2, 2.0, 1.0)
    small = HybridEngine(tiny, max_batch_size=64).rollout(prompts, masks, p, seeds=[0, 1])
    exact = HybridEngine(tiny, max_batch_size=4).rollout(prompts, masks, p, seeds=[0, 1])
    assert small.kv_bytes == exact.kv_bytes
    assert torch.equal(small.tokens, exact.tokens)
    c = tiny.config.text
    lens = [len(q) for q in prompts]
    # shared pool: each prompt once + one pad prompt per distinct length (Lp = longest); then
    # 4 conditional + 4 unconditional rows of T - 1 own image tokens; fp32
    tokens = (2 + len(set(lens))) * max(lens) + 8 * (tiny.num_image_tokens - 1)
    assert small.kv_bytes == tokens * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4


def test_rollout_releases_kv_cache_and_restores_mode(tiny):
    g = torch.Generator().manual_seed(2)
    prompts, masks = _prompts(tiny, 2, g)
    hy = HybridEngine(tiny, max_batch_size=4, ledger=MemoryLedger())
    tiny.train()
    hy.rollout(prompts, masks, _params(2, 2.0, 1.0), seeds=[0, 1])  # warm-up (lazy imports, caches)
    base = live_tensor_bytes()
    ro = hy.rollout(prompts, masks, _params(2, 2.0, 1.0), seeds=[0, 1])
    del ro
    assert tiny.training  # the policy is back in training mode
    gc.collect()
    # nothing the size of the KV cache survived the rollout
    assert live_tensor_bytes() - base < 4096
    m = hy.ledger.metrics()
    assert m["mem/rollout_kv_bytes"] > 0 and m["mem/rollout_gathered_weights_bytes"] > 0


def test_rollout_bad_input(tiny):
    hy = HybridEngine(tiny, max_batch_size=4)
    with pytest.raises(ValueError, match="seeds"):
        hy.rollout([[1, 3]], None, _params(2, 2.0, 1.0), seeds=[1, 2])
    with pytest.raises(ValueError, match="exceeds max_batch_size"):
        hy.rollout([[1, 3]], None, _params(8, 2.0, 1.0), seeds=[1])
    with pytest.raises(ValueError, match="offload_states"):
        HybridEngine(tiny, offload_optimizer_states=True)


def test_gathered_module_noop_without_zero3(tiny):
    assert not is_zero3(tiny)
    with gathered_module(tiny) as m:
        assert m is tiny


def test_reference_policy_is_frozen_copy(tiny):
    ref = ReferencePolicy.from_policy(tiny, "cpu")
    assert all(not p.requires_grad for p in ref.module.parameters())
    p0 = next(tiny.parameters())
    r0 = next(ref.module.parameters())
    assert r0.data_ptr() != p0.data_ptr() and torch.equal(r0, p0)
    assert ref.nbytes() == sum(p.numel() * 4 for p in {id(p): p for p in tiny.parameters()}.values())
    with pytest.raises(ValueError, match="mode"):
        ReferencePolicy.from_policy(tiny, "gpu")


def test_pixels_history_rollout_matches_trainer_logprobs(tiny):
    """Pixels history: the rollout feeds each prompt's images through the vision tower; the
    trainer's log-probs (per-row pixels, or the tower's cached outputs) match it."""
    g = torch.Generator().manual_seed(3)
    sp, T = tiny.special_tokens, tiny.num_image_tokens
    n_imgs, G = [1, 3, 2], 2
    prompts = [[sp.bos, 40] + ([sp.boi] + [sp.image] * T + [sp.eoi]) * n + [sp.boi] for n in n_imgs]
    px = [torch.rand(n, 3, tiny.image_size, tiny.image_size, generator=g) * 2 - 1 for n in n_imgs]
    hy = HybridEngine(tiny, max_batch_size=4)  # 2 prompts per Generator call: pixels are split per chunk
    ro = hy.rollout(prompts, None, _params(G, 3.0, 1.0), seeds=[1, 2, 3], pixel_values=px)
    with torch.no_grad():
        feats = [tiny.vision_hidden(p) for p in px]
    by_pixels = build_sequences(prompts, None, ro.tokens, G, sp.pad, pixel_values=px)
    by_features = build_sequences(prompts, None, ro.tokens, G, sp.pad, pixel_values=px, image_features=feats)
    rows, dev = slice(0, len(n_imgs) * G), torch.device("cpu")
    with torch.no_grad():
        a, _ = policy_logprobs(tiny, *by_pixels.rows(rows, dev), ro.tokens, 1.0, *by_pixels.history(rows, dev))
        b, _ = policy_logprobs(tiny, *by_features.rows(rows, dev), ro.tokens, 1.0, *by_features.history(rows, dev))
    assert float((a - ro.logprobs).abs().max()) <= 1e-5 and float((b - ro.logprobs).abs().max()) <= 1e-5
    # the same rollout from the tower's cached outputs: same tokens, same log-probs, no tower call
    calls = []
    hook = tiny.vision_model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        cached = hy.rollout(prompts, None, _params(G, 3.0, 1.0), seeds=[1, 2, 3], image_features=feats)
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(cached.tokens, ro.tokens)
    assert float((cached.logprobs - ro.logprobs).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="not both"):
        hy.rollout(prompts, None, _params(G, 3.0, 1.0), seeds=[1, 2, 3], pixel_values=px, image_features=feats)
    with pytest.raises(ValueError, match="image_features entries"):
        hy.rollout(prompts, None, _params(G, 3.0, 1.0), seeds=[1, 2, 3], image_features=feats[:2])
    # the images matter: other pixels give other samples under the same seeds
    other = hy.rollout(prompts, None, _params(G, 3.0, 1.0), seeds=[1, 2, 3],
                       pixel_values=[p.flip(-1) for p in px])
    assert not torch.equal(other.tokens, ro.tokens)
    with pytest.raises(ValueError, match="pixel_values"):
        hy.rollout(prompts, None, _params(G, 3.0, 1.0), seeds=[1, 2, 3], pixel_values=px[:2])


def test_bf16_rollout_logprob_gap_within_documented_tolerance(tiny_ckpt_path):
    """bf16 rollouts vs trainer log-probs: a real gap (bf16 logits), bounded by BF16_LOGPROB_GAP_TOL."""
    from pgen_engine.training.grpo import BF16_LOGPROB_GAP_TOL

    m = pg.load_model(tiny_ckpt_path, device="cpu", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    prompts, masks = _prompts(m, 3, g)
    ro = HybridEngine(m, max_batch_size=8).rollout(prompts, masks, _params(4, 1.0, 1.0), seeds=[1, 2, 3])
    seqs = build_sequences(prompts, masks, ro.tokens, 4, m.special_tokens.pad)
    with torch.no_grad():
        lp, _ = policy_logprobs(m, *seqs, ro.tokens, 1.0)
    gap = float((lp - ro.logprobs.float()).abs().max())
    assert FP32_LOGPROB_GAP_TOL < gap <= BF16_LOGPROB_GAP_TOL, gap


def test_rollout_params_wrap_the_generation_sampling_params():
    """One SamplingParams: the rollout's settings are the Generator's, plus G and the uncond mode."""
    sp = SamplingParams(guidance_scale=2.0, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    p = RolloutParams(4, sp, "short")
    assert p.sampling is sp and p.generation([7, 8]) == sp.replace(seed=(7, 8))
    for bad, match in [(dict(num_samples=0), "num_samples"), (dict(uncond_mode="blank"), "uncond_mode"),
                       (dict(sampling=SamplingParams(greedy=True)), "greedy"),
                       (dict(sampling=SamplingParams(guidance_scale=-1.0)), "guidance_scale")]:
        with pytest.raises(ValueError, match=match):
            RolloutParams(**{"num_samples": 2, "sampling": sp, **bad})
    with pytest.raises(TypeError, match="SamplingParams"):
        RolloutParams(2, {"temperature": 1.0})


@pytest.mark.parametrize("mode", ["pad", "short"])
def test_guided_rollout_logprob_gap_fp32_on_every_cpu_backend(tiny, mode):
    """Guided log-probs (the CFG mix the codes are sampled from): every CPU decode backend (the
    C++ wave loop, the static step, eager torch) records the same
    codes and log-probs, and the trainer's two-forward recomputation matches them to fp32 rounding."""
    from pgen_engine.generation import Generator
    from pgen_engine.generation.backends import EagerBackend
    from pgen_engine.training.sequences import guided_policy_logprobs, uncond_prompts

    g = torch.Generator().manual_seed(4)
    B, G, s, temp = 3, 4, 3.0, 0.7
    prompts, masks = _prompts(tiny, B, g)
    sp = SamplingParams(guidance_scale=s, temperature=temp, seed=[5, 6, 7])
    T = tiny.num_image_tokens
    results = {}
    for name in ("cpp", "static", "eager"):
        gen = Generator(tiny, max_batch_size=B * G, max_seq_len=max(map(len, prompts)) + T, uncond_mode=mode,
                        decode_mode="static" if name == "static" else "eager")
        if name == "eager":
            gen._backend = EagerBackend(tiny)
        assert gen.backend == name
        results[name] = gen.generate(prompts, gen_code_mask=masks, num_samples=G, sampling=sp, return_logprobs=True,
                                     logprob_distribution="guided")
    toks, lp_roll = results["cpp"]
    for name in ("static", "eager"):
        assert torch.equal(results[name][0], toks), name
        assert float((results[name][1] - lp_roll).abs().max()) <= FP32_LOGPROB_GAP_TOL, name
    seqs = build_sequences(prompts, masks, toks, G, tiny.special_tokens.pad)
    useqs = build_sequences(uncond_prompts(prompts, masks, tiny.special_tokens, mode), None, toks, G,
                            tiny.special_tokens.pad)
    with torch.no_grad():
        lp, ent = guided_policy_logprobs(tiny, *seqs, *useqs, toks, temp, s)
        lp_cond, _ = policy_logprobs(tiny, *seqs, toks, temp)
    assert float((lp - lp_roll).abs().max()) <= FP32_LOGPROB_GAP_TOL
    assert (ent > 0).all()
    # the recorded log-probs are the guided ones, not the conditional branch's (which would fail the gap)
    assert float((lp_cond - lp_roll).abs().max()) > 100 * FP32_LOGPROB_GAP_TOL
    # the same codes when the conditional log-probs are asked for (sampling does not depend on it)
    toks_c, lp_c = Generator(tiny, max_batch_size=B * G, max_seq_len=max(map(len, prompts)) + T,
                             uncond_mode=mode).generate(prompts, gen_code_mask=masks, num_samples=G, sampling=sp,
                                                        return_logprobs=True)
    assert torch.equal(toks_c, toks) and float((lp_c - lp_cond).abs().max()) <= FP32_LOGPROB_GAP_TOL
    with pytest.raises(ValueError, match="logprob_distribution"):
        Generator(tiny, max_batch_size=4, max_seq_len=64).generate(prompts[:1], gen_code_mask=masks[:1],
                                                                   sampling=sp.replace(seed=1), return_logprobs=True,
                                                                   logprob_distribution="cfg")


def test_guided_hybrid_rollout_logprobs(tiny):
    """RolloutParams.policy_distribution="guided" reaches the Generator; a bad value is refused."""
    from pgen_engine.training.sequences import guided_policy_logprobs, uncond_prompts

    g = torch.Generator().manual_seed(5)
    prompts, masks = _prompts(tiny, 2, g)
    p = RolloutParams(3, SamplingParams(guidance_scale=2.0, temperature=0.9), "pad", "guided")
    ro = HybridEngine(tiny, max_batch_size=3).rollout(prompts, masks, p, seeds=[1, 2])
    seqs = build_sequences(prompts, masks, ro.tokens, 3, tiny.special_tokens.pad)
    useqs = build_sequences(uncond_prompts(prompts, masks, tiny.special_tokens, "pad"), None, ro.tokens, 3,
                            tiny.special_tokens.pad)
    with torch.no_grad():
        lp, _ = guided_policy_logprobs(tiny, *seqs, *useqs, ro.tokens, 0.9, 2.0)
    assert float((lp - ro.logprobs).abs().max()) <= FP32_LOGPROB_GAP_TOL
    with pytest.raises(ValueError, match="policy_distribution"):
        RolloutParams(3, SamplingParams(guidance_scale=2.0), "pad", "mixed")
