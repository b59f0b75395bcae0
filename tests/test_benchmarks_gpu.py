import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_check_mode_runs_and_ends_with_json():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    ops = {r["op"] for r in last["rows"]}
    assert {"sample_cfg_topp", "token_logprobs_fwd", "rms_norm", "apply_rotary"} <= ops
    assert all(r["ms"] > 0 for r in last["rows"] if r["op"] != "check")
    checks = [r for r in last["rows"] if r["op"] == "check"]
    assert checks and all(r["ok"] for r in checks)  # graph-ready decode == eager == transformers tokens
    backends = {r["backend"] for r in last["rows"] if r["op"] == "generate"}
    assert {"transformers", "pgen-static", "pgen-eager"} <= backends
    assert (results.read_text() if results.exists() else None) == before  # check mode never appends


def test_decode_traffic_bound_counts_weights_and_kv_bytes():
    """The bound's byte count equals a hand count on a small geometry (MHA and GQA)."""
    import torch

    import pgen_engine as pg
    from benchmarks.gpu_generation import decode_traffic_bound
    from pgen_engine.models.tiny import make_tiny_checkpoint

    for kv_heads in (4, 2):
        geo = dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=kv_heads, intermediate_size=96,
                   vocab_size=300, image_size=32, patch_size=8, codebook_size=64)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model = pg.load_model(make_tiny_checkpoint(d, **geo))
        lm = (model.language_model, model.generation_head, model.generation_aligner)
        params = sum(p.numel() for m in lm for p in m.parameters()) - model.language_model.embed_tokens.weight.numel()
        T, P, B = 16, 10, 3
        per_tok = 3 * 2 * kv_heads * 16  # layers * (K, V) * kv heads * head_dim
        ctx = [P + t + 1 for t in range(T)]  # tokens a row attends to at step t
        full = 2 * B * sum(ctx) / T * per_tok * 2
        shared = (B * sum(ctx) / T + B * sum(c - P for c in ctx) / T + P) * per_tok * 2
        rows = decode_traffic_bound(geo, B, P, hf_seconds=1.0, prefill_seconds=0.0, bandwidths_tbs=(1.0,))
        got = {r["variant"]: r for r in rows}
        assert torch.isclose(torch.tensor(got["bf16 K/V, one copy per row"]["bytes_per_step"]),
                             torch.tensor(2.0 * params + full), rtol=1e-9)
        assert torch.isclose(torch.tensor(got["bf16 K/V, uncond prompt shared"]["bytes_per_step"]),
                             torch.tensor(2.0 * params + shared), rtol=1e-9)
        assert abs(got["fp8 K/V, uncond prompt shared"]["kv_bytes_per_step"] - shared / 2) < 1e-6 * shared
        r = got["bf16 K/V, one copy per row"]
        assert abs(r["best_speedup"] - 1.0 / (T * r["step_s"])) < 1e-9 * r["best_speedup"]
        # shared blocks: B distinct prompts + 1 pad prompt once, every row's image tokens
        blocks = ((B + 1) * P + 2 * B * sum(c - P for c in ctx) / T) * per_tok
        assert abs(got["bf16 K/V, shared blocks read once per group"]["kv_bytes_per_step"] - 2 * blocks) < 1e-6 * blocks
        assert abs(got["fp8 K/V, shared blocks read once per group"]["kv_bytes_per_step"] - blocks) < 1e-6 * blocks
        grp = {r["variant"]: r for r in decode_traffic_bound(geo, 4, P, hf_seconds=1.0, prefill_seconds=0.0,
                                                             bandwidths_tbs=(1.0,), samples_per_prompt=4)}
        one = ((1 + 1) * P + 2 * 4 * sum(c - P for c in ctx) / T) * per_tok * 2
        assert abs(grp["bf16 K/V, shared blocks read once per group"]["kv_bytes_per_step"] - one) < 1e-6 * one
