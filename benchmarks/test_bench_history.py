"""Share of history encoding (pixels history mode) in an SFT step and an RL step, CPU.

    python -m pytest benchmarks/test_bench_history.py -q -s

Geometry (scaled-down Janus-Pro proportions, CPU-sized): LM hidden 256 x 4 layers, vision
tower hidden 256 x 2 layers (the tower is ~1/2 of the LM's depth, as SigLIP-L 24 layers vs
the 1B LM's 24 at a narrower width), 64-px images in 8-px patches = 64 tokens per image,
k = 4 history images per user. Cases, all in one run (the baseline is the pixels path):

* ``sft``: one forward + backward of the SFT loss over ``B = 8`` users, history given as
  ``pixel_values`` (the tower runs every step) vs cached ``image_features`` (the frozen
  tower's outputs from :mod:`pgen_engine.data.vision_cache`); encoding share = tower forward
  time / pixels-step time.
* ``rl``: one rollout (``B = 4`` prompts x ``G = 4`` samples, Generator, CFG 5) + the
  trainer's log-prob pass over the ``B * G`` rows. Baseline: pixels (the rollout's tower runs
  once per prompt, the log-prob pass re-encodes per row). Cached: the rollout takes the
  aligned cached features (``Generator.generate(image_embeds=...)``, what
  ``HybridEngine.rollout(image_features=...)`` passes; the aligner's time is included) and
  the log-prob pass reads the cached features: the tower does not run at all.

Times are medians of ``ROUNDS`` (the two rollouts: of 5 alternating pairs); ends with one JSON line.
"""
from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

ROUNDS = 3
B, K, G = 8, 4, 4
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import pgen_engine as pg
    from pgen_engine.models.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("bh") / "ckpt", seed=0, init_std=0.05, hidden_size=256,
                                num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512, image_size=64,
                                patch_size=8, codebook_size=256, vision_hidden_size=256, vision_layers=2,
                                vision_heads=4, max_position_embeddings=2048)
    model = pg.load_model(path)
    torch.manual_seed(0)
    return model


def _median(fn) -> float:
    ts = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _paired_medians(a, b, rounds: int = 5) -> tuple[float, float]:
    """Medians of ``a`` and ``b`` timed alternately (a shared, loaded machine drifts: pairing
    keeps the baseline and the variant under the same load)."""
    ta, tb = [], []
    for _ in range(rounds):
        for fn, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _prompts(model, n: int) -> list[list[int]]:
    img, T = model.config.image_token_id, model.num_image_tokens
    return [[1, 40, 41] + ([2] + [img] * T + [4]) * K + [50, 3] for _ in range(n)]


def test_encoding_share_sft_step(benchmark, setup):
    from pgen_engine.training.rl import build_sequences
    from pgen_engine.training.sft import sft_loss

    model = setup
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(("vision_model", "vqmodel")))
    T = model.num_image_tokens
    rows = _prompts(model, B)
    toks = torch.randint(0, model.codebook_size, (B, T))
    ids, cm, att = build_sequences(rows, None, toks, 1, 0)
    ids = torch.cat([ids, toks[:, -1:]], 1)
    cm = torch.cat([cm, torch.ones(B, 1, dtype=torch.bool)], 1)
    att = torch.cat([att, torch.ones(B, 1, dtype=torch.long)], 1).bool()
    lmask = torch.zeros_like(cm)
    lmask[:, -T - 1:-1] = True
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(lmask[:, :-1], ids[:, 1:], -100)
    batch = {"input_ids": ids, "gen_code_mask": cm, "attention_mask": att,
             "position_ids": (att.long().cumsum(1) - 1).clamp_min(0), "loss_mask": lmask, "labels": labels}
    px = torch.rand(B * K, 3, model.image_size, model.image_size) * 2 - 1
    with torch.no_grad():
        feats = model.vision_hidden(px)

    def step(extra):
        model.zero_grad(set_to_none=True)
        loss, _ = sft_loss(model, {**batch, **extra})
        loss.backward()

    def run():
        t_px = _median(lambda: step({"pixel_values": px}))
        t_ft = _median(lambda: step({"image_features": feats}))
        with torch.no_grad():
            t_enc = _median(lambda: model.vision_hidden(px))
        return {"step_pixels_s": t_px, "step_cached_s": t_ft, "encode_s": t_enc,
                "encoding_share": t_enc / t_px, "speedup": t_px / t_ft}

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS["sft"] = res
    assert res["encode_s"] > 0 and res["step_cached_s"] > 0


def test_encoding_share_rl_step(benchmark, setup):
    from pgen_engine.generation import Generator
    from pgen_engine.training.rl import build_sequences, policy_logprobs

    model = setup
    model.eval()
    T = model.num_image_tokens
    nb = B // 2
    rows = _prompts(model, nb)
    px = torch.rand(nb * K, 3, model.image_size, model.image_size) * 2 - 1
    with torch.no_grad():
        feats = model.vision_hidden(px)
    gen = Generator(model, max_batch_size=nb * G, max_seq_len=len(rows[0]) + T)

    def rollout():
        return gen.generate(rows, None, px, num_samples=G, guidance_scale=5.0, seed=list(range(nb)))

    def rollout_cached():
        with torch.no_grad():
            emb = list(model.aligner(feats).split(K))  # HybridEngine.rollout aligns the cached outputs
        return gen.generate(rows, None, image_embeds=emb, num_samples=G, guidance_scale=5.0, seed=list(range(nb)))

    toks = rollout()
    assert torch.equal(rollout_cached(), toks)  # same samples from the cached features
    ids, cm, att = build_sequences(rows, None, toks, G, 0)
    px_rows = px.reshape(nb, K, *px.shape[1:]).repeat_interleave(G, 0).flatten(0, 1)
    ft_rows = feats.reshape(nb, K, *feats.shape[1:]).repeat_interleave(G, 0).flatten(0, 1)

    def logprobs(**kw):
        with torch.no_grad():
            policy_logprobs(model, ids, cm, att, toks, 1.0, **kw)

    def run():
        t_roll, t_roll_ft = _paired_medians(rollout, rollout_cached)
        t_lp_px = _median(lambda: logprobs(pixel_values=px_rows))
        t_lp_ft = _median(lambda: logprobs(image_features=ft_rows))
        with torch.no_grad():
            t_enc_prompts = _median(lambda: model.vision_hidden(px))
            t_enc_rows = _median(lambda: model.vision_hidden(px_rows))
        return {"rollout_s": t_roll, "rollout_encoding_share": t_enc_prompts / t_roll,
                "rollout_cached_s": t_roll_ft, "rollout_cached_encoding_share": 0.0,
                "rollout_speedup": t_roll / t_roll_ft,
                "logprobs_pixels_s": t_lp_px, "logprobs_cached_s": t_lp_ft,
                "logprobs_encoding_share": t_enc_rows / t_lp_px,
                "step_encoding_share_pixels": (t_enc_prompts + t_enc_rows) / (t_roll + t_lp_px),
                "step_cached_s": t_roll_ft + t_lp_ft, "step_encoding_share_cached": 0.0,
                "step_speedup": (t_roll + t_lp_px) / (t_roll_ft + t_lp_ft)}

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS["rl"] = res
    assert res["rollout_s"] > 0
    if len(RESULTS) == 2:
        print(json.dumps({"bench": "history_encoding_cpu", "B": B, "K": K, "G": G,
                          "image_tokens": model.num_image_tokens, **RESULTS}))
