"""The generation benchmarks' own arithmetic and settings (benchmarks/test_bench_generation.py,
benchmarks/gpu_generation.py): FLOP counts against the model geometry, the paired statistics, and
both sides of a comparison getting the same prompts and sampling settings."""
from __future__ import annotations

import pytest
import torch

import pgen_engine as pg


def _meta_model(**geo):
    """A JanusModel of geometry ``geo`` on the meta device (parameter shapes only)."""
    from pgen_engine.models.janus import JanusModel
    from pgen_engine.models.janus_config import JanusModelConfig
    from pgen_engine.models.tiny import tiny_janus_config

    cfg = JanusModelConfig.from_dict(tiny_janus_config(**geo).to_dict())
    with torch.device("meta"):
        return JanusModel(cfg, pg.SpecialTokens.builtin())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_flops_match_a_hand_count_of_the_geometry(kv_heads):
    """Decode FLOPs = 2 per matrix weight per row (q/o at query width, k/v at KV width: GQA; gate/up/down;
    the generation head's two matrices for every CFG row; the aligner for the conditional rows only)
    + attention 4 * keys * heads * head_dim; no norms, biases or embedding tables."""
    from benchmarks.test_bench_generation import decode_flops, decode_matmul_flops

    H, L, Hq, D, F, K, E = 64, 3, 4, 16, 256, 1024, 8  # hidden, layers, heads, head_dim, MLP, codebook, code dim
    model = _meta_model(hidden_size=H, num_layers=L, num_heads=Hq, num_kv_heads=kv_heads, intermediate_size=F,
                        codebook_size=K, vq_embed_dim=E, image_size=32, patch_size=8)
    depth = 1 + len(model.generation_aligner.hidden_layers)
    layer = H * Hq * D + 2 * H * kv_heads * D + Hq * D * H + 3 * H * F
    head = H * H + H * K  # proj_out, vision_head
    aligner = E * H + (depth - 1) * H * H
    T, P, B = model.num_image_tokens, 20, 3
    assert T == 16
    for cfg, rows in ((True, 2 * B), (False, B)):
        step = 2 * ((L * layer + head) * rows + aligner * B)
        assert decode_matmul_flops(model, B, cfg) == step
        attn = 4 * rows * L * Hq * D * sum(P + t for t in range(1, T))
        assert decode_flops(model, B, P, cfg) == step * (T - 1) + attn


def test_paired_speedup_is_the_true_median_of_per_round_ratios():
    """An even number of rounds must not report the upper of the two middle ratios (pgen's favour)."""
    from benchmarks.test_bench_generation import paired_speedups

    def rnd(hf, pg_, hf_cpu=1.0, pg_cpu=1.0):
        return {"transformers": {"wall": hf, "cpu": hf_cpu}, "pgen": {"wall": pg_, "cpu": pg_cpu}}

    four = [rnd(3.0, 1.0), rnd(4.0, 1.0), rnd(2.0, 1.0, 2.0, 1.0), rnd(5.0, 1.0, 6.0, 2.0)]
    assert paired_speedups(four) == {"speedup_wall": 3.5, "speedup_cpu": 1.5}
    assert paired_speedups(four[:3]) == {"speedup_wall": 3.0, "speedup_cpu": 1.0}


def test_paired_rounds_alternate_which_side_runs_first():
    from benchmarks.test_bench_generation import paired_round

    calls: list[str] = []
    got = [paired_round(i, lambda impl: calls.append(impl) or impl) for i in range(4)]
    assert calls == ["pgen", "transformers", "transformers", "pgen"] * 2
    assert all(r == {"pgen": "pgen", "transformers": "transformers"} for r in got)
