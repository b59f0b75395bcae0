"""float8 (e4m3) KV cache quality on a small random Janus model with realistic proportions
(:mod:`benchmarks.kv_quality`: MLP 4 x hidden, 1024-code codebook, 64 image tokens, CFG 5).

Measured on this model (2 prompts x 2-4 samples, teacher-forced on the float32 cache's greedy
rollout): float8 log-prob gap 0.007-0.01 nats mean, greedy agreement 0.92-0.96; a bfloat16 cache
0.98-1.0 and float16 0.99 on the same rollout -- random weights give near-uniform logits
(mean log-prob ~-6.3 of -6.9 for uniform) whose argmax flips under any perturbation, so the
issue's >= 99 % target is not reached here (see the report). The bounds below catch a broken
quantisation (a wrong scale or a misread pool gives gaps of nats and agreement near chance).
"""
import json
import math
import tempfile

import pytest
import torch

from benchmarks.kv_quality import REALISTIC, fp8_quality, main, quality_model, quality_prompts
from pgen_engine.models.tiny import make_tiny_checkpoint


def test_fp8_kv_cache_log_prob_gap_and_greedy_agreement():
    with tempfile.TemporaryDirectory() as tmp:
        model = quality_model(tmp)
        prompts = quality_prompts(model, [40, 56])
        res = fp8_quality(model, prompts, num_samples=2, guidance_scale=5.0, ref_dtype=torch.float32)
    # this run (2 prompts x 2 samples): gap 0.0066 mean / 0.024 max nats, agreement 0.961
    print("fp8 KV quality", res)
    assert res["tokens"] == 4 * model.num_image_tokens
    assert res["ref_self_agreement"] >= 0.99, res  # the scorer reproduces the Generator's greedy path
    assert math.isfinite(res["lp_gap_max"]) and res["lp_gap_mean"] <= 0.03, res
    assert res["greedy_agreement"] >= 0.85, res


def test_kv_quality_cli_runs_a_given_checkpoint_and_checks_its_flags(tmp_path, capsys):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=1, init_std=0.04, **{**REALISTIC, "image_size": 32})
    rc = main(["--checkpoint", str(path), "--prompt-lens", "12,20", "--num-prompts", "3", "--samples", "1",
               "--min-agreement", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["model"] == str(path) and out["prompts"] == "random text"
    assert out["tokens"] == 3 * 16 and math.isfinite(out["lp_gap_mean"])
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path)])  # --data needs the checkpoint trained on it
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "missing")])
