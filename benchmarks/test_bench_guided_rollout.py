"""Guided-log-prob rollouts on CPU: the C++ wave loop vs the Python loop over the C++ step.

    python -m pytest benchmarks/test_bench_guided_rollout.py -q -s
    (knobs PGEN_BENCH_GUIDED_CASES=demo-rl,realistic and PGEN_BENCH_ROUNDS)

RL on the guided distribution (``rl.policy_distribution: guided``) rolls out with
``Generator.generate(..., return_logprobs=True, logprob_distribution="guided")``. Until the C++
loop wrote guided log-probs itself, such a CFG wave on the C++ backend ran the Python loop over
the C++ decode step (``DecodeBackend.decode_wave`` with the C++ layers): the baseline here,
reproduced in the same run by pointing the backend's ``decode_wave`` at that loop. Both give
the same codes and log-probs (asserted). Cases:

* "demo-rl": ``configs/demo_rl.yaml``'s model (hidden 128, 2 layers, 4 heads / 2 KV heads, MLP
  256, codebook 512, 4 image tokens), one rollout call of ``rl.rollout_batch_size`` 64 rows
  (8 prompts x 8 samples), 26-token prompts (4 history images of 4 codes and their tags), CFG 2,
  temperature 0.7;
* "realistic": hidden 256, 4 layers, MLP 1024 (4 x hidden), codebook 1024, 64 image tokens,
  8 prompts x 8 samples, 128-token prompts, CFG 2, temperature 0.7.

Each round runs the C++ loop then the baseline on the same prompts and seeds (paired, so
drifting load on this shared machine hits both); the speed-up is the median per-round ratio of
wall time. Ends with one JSON line per case.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator, SamplingParams
from pgen_engine.generation.backends import DecodeBackend
from pgen_engine.models.tiny import make_tiny_checkpoint

CASES = {
    "demo-rl": dict(model=dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                               codebook_size=512, vq_embed_dim=64, image_size=32, patch_size=16),
                    prompts=8, samples=8, prompt_len=26),
    "realistic": dict(model=dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=1024,
                                 codebook_size=1024, image_size=64, patch_size=8, max_position_embeddings=512),
                      prompts=8, samples=8, prompt_len=128),
}
SELECTED = [c for c in os.environ.get("PGEN_BENCH_GUIDED_CASES", "demo-rl,realistic").split(",") if c]
ROUNDS = int(os.environ.get("PGEN_BENCH_ROUNDS", "5"))
SAMPLING = SamplingParams(guidance_scale=2.0, temperature=0.7)


@pytest.mark.parametrize("case", SELECTED)
def test_guided_rollout_cpp_loop_vs_python_loop(benchmark, case, tmp_path):
    if case not in CASES:
        raise ValueError(f"PGEN_BENCH_GUIDED_CASES: unknown case {case!r}; expected some of {list(CASES)}")
    spec = CASES[case]
    model = pg.load_model(make_tiny_checkpoint(tmp_path / case, seed=0, init_std=0.05, **spec["model"]))
    T, B, G, S = model.num_image_tokens, spec["prompts"], spec["samples"], spec["prompt_len"]
    special = pg.SpecialTokens.builtin()
    ids = torch.randint(6, model.config.text.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, -1] = special.bos, special.boi
    gen = Generator(model, max_batch_size=B * G, max_seq_len=S + T)
    assert gen.backend == "cpp"
    python_loop = Generator(model, max_batch_size=B * G, max_seq_len=S + T)
    backend = python_loop._backend
    backend.decode_wave = lambda cache, wave: DecodeBackend.decode_wave(backend, cache, wave)
    rounds: list[dict] = []

    def timed(g: Generator, seed: int):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = g.generate(ids, num_samples=G, sampling=SAMPLING.replace(seed=seed), return_logprobs=True,
                             logprob_distribution="guided")
        return out, time.perf_counter() - t0, g.last_stats["decode_s"]

    def one_round():
        seed = len(rounds)
        (toks, lp), wall, dec = timed(gen, seed)
        (toks_b, lp_b), wall_b, dec_b = timed(python_loop, seed)
        assert torch.equal(toks, toks_b) and float((lp - lp_b).abs().max()) <= 1e-5
        rounds.append(dict(cpp=wall, python_loop=wall_b, cpp_decode=dec, python_loop_decode=dec_b))

    def all_rounds():  # one benchmark call (also under --benchmark-disable, which runs it once)
        for _ in range(ROUNDS + 1):
            one_round()

    benchmark.pedantic(all_rounds, rounds=1, iterations=1)
    measured = rounds[1:]  # rounds[0] is the warm-up
    res = {k: min(r[k] for r in measured) for k in measured[0]}
    res.update(case=case, rows=B * G, image_tokens=T, rounds=len(measured), threads=torch.get_num_threads(),
               speedup_wall=statistics.median(r["python_loop"] / r["cpp"] for r in measured),
               speedup_decode=statistics.median(r["python_loop_decode"] / r["cpp_decode"] for r in measured),
               cpp_images_per_s=B * G / res["cpp"], python_loop_images_per_s=B * G / res["python_loop"],
               load_avg_1min=os.getloadavg()[0])
    benchmark.extra_info.update(res)
    print(json.dumps({"bench": "guided_rollout_cpu", **res}))
    assert res["cpp"] > 0 and res["python_loop"] > 0
