"""float8 (e4m3) KV cache in the Generator, and the Triton shared-prefix decode kernel inside it.

The wave layout (shared-prefix pool + own rows) with ``cache_dtype=torch.float8_e4m3fn`` runs
the torch reference of :func:`pgen_engine.ops.decode_shared.shared_prefix_decode` on CPU (the
Triton kernel on CUDA); here: decode modes agree, the decode step never reads back to the
host, bytes are a quarter of float32, and the Triton kernel (CPU interpreter) gives the torch
path's tokens inside the model.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator, layers_cpu
from pgen_engine.models import op_dispatch
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.ops import kv_quant
from tests.generation._host_sync import forbid_host_reads

FP8 = kv_quant.FP8_DTYPE
PROMPTS = [[1, 40, 41, 77, 3], [1, 9, 3], [1, 50, 60, 70, 80, 90, 3]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "m", seed=5, init_std=0.2, image_size=32,
                                patch_size=8, num_heads=4, num_kv_heads=2)
    return pg.load_model(path)


def test_fp8_cache_decode_modes_agree_and_hold_a_quarter_of_the_bytes(model):
    T = model.num_image_tokens
    kw = dict(num_samples=2, guidance_scale=3.0, greedy=True)
    g32 = Generator(model, max_batch_size=4, max_seq_len=7 + T)
    ref = g32.generate(PROMPTS, **kw)
    eager = Generator(model, max_batch_size=4, max_seq_len=7 + T, cache_dtype=FP8)
    static = Generator(model, max_batch_size=4, max_seq_len=7 + T, cache_dtype=FP8, decode_mode="static")
    a = eager.generate(PROMPTS, **kw)
    b = static.generate(PROMPTS, **kw)
    assert eager._k[0].dtype == FP8
    assert torch.equal(a, b)  # the CUDA-graph-ready step and the eager loop: same tokens
    assert torch.equal(a, eager.generate(PROMPTS, **kw))  # scales are reset per wave: a rerun repeats
    assert torch.equal(a[:, 0], ref[:, 0])  # code 0 comes from the prefill's own attention
    assert bool(((a >= 0) & (a < model.config.codebook_size)).all())
    # later codes read the float8 K/V; a free run drifts after a flip (quality: benchmarks/kv_quality.py)
    assert eager.last_stats["kv_bytes_peak"] * 4 == g32.last_stats["kv_bytes_peak"]
    assert eager.kv_bytes([len(p) for p in PROMPTS], num_samples=2, guidance_scale=3.0) * 4 == \
        g32.kv_bytes([len(p) for p in PROMPTS], num_samples=2, guidance_scale=3.0)
    # the last wave's pool scales (rows [0, P)) were set by its prefill, its own rows' (from row
    # 2 * max_batch_size on) by its first decode write
    assert eager.backend == "eager"
    ks = eager._kv.scales.k[0]
    assert bool((ks[0] > 0).all()) and bool((ks[8:12] > 0).all())


def test_fp8_decode_step_never_reads_back_to_the_host(model, monkeypatch):
    g = Generator(model, max_batch_size=4, max_seq_len=40, cache_dtype=FP8)
    trap = {"on": False, "calls": 0}
    real_step = model.decode_step

    def step(*args, **kwargs):
        trap["on"] = True
        trap["calls"] += 1
        try:
            return real_step(*args, **kwargs)
        finally:
            trap["on"] = False

    monkeypatch.setattr(model, "decode_step", step)
    forbid_host_reads(monkeypatch, lambda: trap["on"], "inside a float8 decode step")
    g.generate(PROMPTS[:2], num_samples=2, guidance_scale=3.0, top_k=5, seed=1)
    assert trap["calls"] == model.num_image_tokens - 1


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8])
def test_triton_shared_prefix_kernel_inside_the_generator(model, monkeypatch, cache_dtype):
    """The fused-op path (CUDA's) with the Triton kernel under the CPU interpreter gives the
    torch path's greedy tokens (3 prompts x 2 samples, CFG: groups of 2 and one pad prompt per length)."""
    pytest.importorskip("triton")
    if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from pgen_engine.ops import _backend

    if not _backend.triton_available():
        pytest.skip("Triton cannot run here")
    monkeypatch.setattr(layers_cpu, "_CPU_DECODE", False)  # the model's torch layers, not the C++ backend
    T = model.num_image_tokens
    kw = dict(num_samples=2, guidance_scale=3.0, greedy=True)
    torch_path = Generator(model, max_batch_size=6, max_seq_len=7 + T, cache_dtype=cache_dtype,
                           decode_mode="static").generate(PROMPTS, **kw)
    calls = {"n": 0}
    real = op_dispatch._shared_prefix_decode

    def triton(*a, **k):
        calls["n"] += 1
        return real(*a, **{**k, "backend": "triton"})

    monkeypatch.setattr(op_dispatch, "_FORCE_FUSED", True)
    monkeypatch.setattr(op_dispatch, "_shared_prefix_decode", functools.wraps(real)(triton))
    got = Generator(model, max_batch_size=6, max_seq_len=7 + T, cache_dtype=cache_dtype,
                    decode_mode="static").generate(PROMPTS, **kw)
    assert calls["n"] == model.config.text.num_layers * (T - 1)
    assert torch.equal(got, torch_path), (got != torch_path).sum()
