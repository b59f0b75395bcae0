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
    assert paired_speedups(four) == {"speedup_wall": 3.5, "speedup_cpu": 1.5, "speedup_best": 2.0}
    assert paired_speedups(four[:3]) == {"speedup_wall": 3.0, "speedup_cpu": 1.0, "speedup_best": 2.0}


def test_paired_rounds_alternate_which_side_runs_first():
    from benchmarks.test_bench_generation import paired_round

    calls: list[str] = []
    got = [paired_round(i, lambda impl: calls.append(impl) or impl) for i in range(4)]
    assert calls == ["pgen", "transformers", "transformers", "pgen"] * 2
    assert all(r == {"pgen": "pgen", "transformers": "transformers"} for r in got)


class _FakeLM(torch.nn.Module):
    def forward(self, **kw):
        return None


class _FakeHF:
    """Records transformers-style ``generate`` calls; returns valid codes."""

    def __init__(self, T: int = 4, codebook: int = 8):
        self.calls: list[tuple[torch.Tensor, dict]] = []
        self.T = T
        self.model = type("M", (), {})()
        self.model.language_model = _FakeLM()

    def generate(self, ids, **kw):
        self.calls.append((ids.clone(), kw))
        return torch.zeros((ids.shape[0], self.T), dtype=torch.long)


class _FakeGen:
    """Records ``Generator.generate`` calls; returns valid codes and stats."""

    def __init__(self, T: int = 4):
        self.calls: list[tuple[torch.Tensor, dict]] = []
        self.T = T
        self.last_stats = {}

    def generate(self, ids, **kw):
        self.calls.append((ids.clone(), kw))
        self.last_stats = {"prefill_s": 0.0, "decode_s": 0.0}
        return torch.zeros((ids.shape[0], self.T), dtype=torch.long)


def _sampling(hf_kw: dict) -> tuple:
    """(guidance, temperature, top_k, top_p, greedy) of a transformers generate call's keywords."""
    greedy = not hf_kw.get("do_sample", False)
    return (hf_kw["guidance_scale"], hf_kw.get("temperature", 1.0), hf_kw.get("top_k", 0), hf_kw.get("top_p", 1.0),
            greedy)


def _pgen_sampling(kw: dict) -> tuple:
    from pgen_engine.generation.sampling_params import SamplingParams

    sp = SamplingParams(**{k: v for k, v in kw.items() if k in ("guidance_scale", "temperature", "top_k", "top_p",
                                                                "greedy")})
    return sp.guidance_scale, sp.temperature, sp.top_k, sp.top_p, sp.greedy


@pytest.mark.parametrize("suite", ["cpu", "gpu"])
def test_timed_calls_give_both_sides_the_same_prompts_and_pgen_default_sampling(suite):
    """The timed calls of both suites, through their own helpers: same prompt tensor (no padding, all-ones
    mask for transformers), same CFG scale and sampling settings on both sides, and those settings are
    pgen's defaults (what `pgen generate` uses): temperature 1, no top-k / top-p shortcut."""
    from pgen_engine.generation.sampling_params import SamplingParams

    ids = torch.randint(6, 100, (3, 10))
    hf, gen = _FakeHF(), _FakeGen()
    if suite == "cpu":
        import benchmarks.test_bench_generation as b

        b._run_pgen(gen, ids, seed=1)
        b._run_hf(hf, ids, seed=1)
    else:
        import benchmarks.gpu_generation as g

        g._time_pgen(gen, ids, rounds=1)
        g._time_hf(hf, ids)
    (hf_ids, hf_kw), (pg_ids, pg_kw) = hf.calls[-1], gen.calls[-1]
    assert torch.equal(hf_ids, ids) and torch.equal(pg_ids, ids)
    assert torch.equal(hf_kw["attention_mask"], torch.ones_like(ids)) and hf_kw["generation_mode"] == "image"
    assert pg_kw.get("attention_mask") is None and "sampling" not in pg_kw
    assert _sampling(hf_kw) == _pgen_sampling(pg_kw)
    d = SamplingParams()
    assert _pgen_sampling(pg_kw) == (d.guidance_scale, d.temperature, d.top_k, d.top_p, d.greedy) == (5.0, 1.0, 0, 1.0,
                                                                                                       False)


def test_gpu_suite_warms_up_and_times_both_sides_alike():
    """transformers gets what pgen gets: a full warm-up call at the timed shape, then the best of the same
    number of timed calls with the same seeds; a timed call's codes outside the codebook fail the row."""
    import benchmarks.gpu_generation as g

    ids = torch.randint(6, 100, (2, 10))
    hf, gen = _FakeHF(T=4), _FakeGen(T=4)
    r_hf = g._time_hf(hf, ids, 3, T=4, codebook=8)
    r_pg = g._time_pgen(gen, ids, 3, T=4, codebook=8)
    assert len(hf.calls) == len(gen.calls) == 4
    assert [kw["seed"] for _, kw in gen.calls] == list(range(4))
    assert all(torch.equal(a, ids) for a, _ in hf.calls + gen.calls)
    for r in (r_hf, r_pg):
        assert r["decode"] == pytest.approx(r["wall"] - r["prefill"])
    with pytest.raises(AssertionError, match="codes outside"):
        g._time_hf(hf, ids, 1, T=4, codebook=0)
    with pytest.raises(AssertionError, match="shape"):
        g._time_pgen(gen, ids, 1, T=5, codebook=8)


def test_roofline_columns_use_the_runs_best_rates(monkeypatch):
    """A measurement taken during a load spike must not set the peak: the run's best is used, and the
    columns follow the module docstring's definitions."""
    import benchmarks.test_bench_generation as b

    monkeypatch.setattr(b, "_PEAK", [150e9, 330e9, 300e9])
    monkeypatch.setattr(b, "_BW", {2 ** 24: [20e9, 50e9]})
    assert b.gemm_peak_flops() == 330e9 and b.read_bandwidth(2 ** 24) == 50e9
    cols = b.roofline_columns(flops=4e9, matmul_flops=3e9, kv_bytes=1e9, loop_s=0.1, prefill_s=0.05, hf_wall_s=0.6,
                              peak=300e9, bandwidth=50e9)
    bound = 3e9 / 300e9 + 1e9 / 50e9  # 0.03 s
    assert cols == pytest.approx(dict(gemm_fraction=4e9 / 0.1 / 300e9, roofline_fraction=bound / 0.1,
                                      gemm_fraction_cap=4e9 / bound / 300e9, speedup_cap=0.6 / (0.05 + bound)))


def test_generate_flops_count_each_matrix_where_it_runs():
    """A call's nominal matrix work: decoder layers over 2 rows x (prompt + T - 1) positions per image,
    the head on T positions per row, the aligner on T - 1 codes per image (not the head / aligner on
    prompt tokens, nor norm weights and biases, as 2 x all parameters x (prompt + T) counted)."""
    from benchmarks.test_bench_generation import generate_matmul_flops

    H, L, Hq, kv, D, F, K, E = 64, 3, 4, 2, 16, 256, 1024, 8
    model = _meta_model(hidden_size=H, num_layers=L, num_heads=Hq, num_kv_heads=kv, intermediate_size=F,
                        codebook_size=K, vq_embed_dim=E, image_size=32, patch_size=8)
    depth = 1 + len(model.generation_aligner.hidden_layers)
    layers = L * (H * Hq * D + 2 * H * kv * D + Hq * D * H + 3 * H * F)
    head, aligner = H * H + H * K, E * H + (depth - 1) * H * H
    T, P, B = model.num_image_tokens, 20, 3
    for cfg, rows in ((True, 2 * B), (False, B)):
        want = 2 * (rows * (P + T - 1) * layers + rows * T * head + B * (T - 1) * aligner)
        assert generate_matmul_flops(model, B, P, cfg) == want


def test_the_roofline_peak_is_the_faster_of_torch_mm_and_the_packed_kernel(monkeypatch):
    """On a CPU whose BLAS is slower than the decode's own GEMM (an AMD EPYC VM: torch.mm 192 GFLOP/s,
    the packed kernel 350) a bound at torch.mm's rate is slower than pgen's decode itself."""
    import benchmarks.test_bench_generation as b

    monkeypatch.setattr(b, "_PEAK", [192e9])
    monkeypatch.setattr(b, "_PACKED", [350e9, 300e9])
    assert b.best_gemm_flops() == 350e9
    monkeypatch.setattr(b, "_PACKED", [])  # not measured (no AVX-512, a GPU run): torch.mm's
    assert b.best_gemm_flops() == 192e9


def test_packed_gemm_rate_is_measured_where_the_kernel_runs(monkeypatch):
    import benchmarks.test_bench_generation as b

    monkeypatch.setattr(b, "_PACKED", [])
    rate = b.packed_gemm_flops(n=256, reps=1, measure=True)
    try:
        from pgen_engine import _C
        runs = _C.packed_gemm_available() and b.DEVICE.startswith("cpu")
    except ImportError:
        runs = False
    assert (rate is not None and rate > 0) if runs else rate is None
