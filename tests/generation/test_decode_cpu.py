"""The C++ wave decode loop on CPU (``pgen_engine.generation.decode_cpu``)."""
from __future__ import annotations

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator, decode_cpu
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.ops._backend import extension

pytestmark = pytest.mark.skipif(not hasattr(extension(), "decode_loop_cpu"), reason="pgen_engine._C not built")
PROMPTS = [[1, 40, 41, 3], [1, 9, 3], [1, 7, 8, 9, 10, 3]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """GQA (4 query / 2 KV heads), a 2-layer generation aligner, 16 image tokens."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("loop") / "m", seed=7, init_std=0.2, image_size=32,
                                patch_size=8, num_heads=4, num_kv_heads=2)
    return pg.load_model(path)


def _record_calls(monkeypatch, calls: list):
    ext = extension()
    real = ext.decode_loop_cpu
    monkeypatch.setattr(ext, "decode_loop_cpu", lambda *a, **k: calls.append(a[5:7]) or real(*a, **k))


@pytest.mark.parametrize("kw", [dict(top_k=5, top_p=0.9), dict(greedy=True), dict(guidance_scale=1.0, top_k=3),
                                dict(temperature=0.6, return_logprobs=True), dict(uncond_mode="short")])
def test_one_call_per_wave_with_the_python_loop_codes(model, monkeypatch, kw):
    """A wave's decode is one C++ call (no per-step Python) and gives the codes (log-probs to
    rounding) of the Python loop; a progress bar splits it into chunks of 8 steps."""
    kw = dict(kw, seed=[1, 2, 3], num_samples=2)
    g = Generator(model, max_batch_size=4, max_seq_len=32, uncond_mode=kw.pop("uncond_mode", "pad"))  # 2 waves
    T = model.num_image_tokens
    calls: list = []
    _record_calls(monkeypatch, calls)
    monkeypatch.setattr(model, "decode_step", lambda *a, **k: pytest.fail("per-step Python decode on CPU"))
    fast = g.generate(PROMPTS, **kw)
    assert calls == [(1, T), (1, T)]
    monkeypatch.undo()
    monkeypatch.setattr(decode_cpu, "applies", lambda *a: False)
    slow = g.generate(PROMPTS, **kw)
    lp = kw.get("return_logprobs", False)
    if lp:
        torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)
        fast, slow = fast[0], slow[0]
    assert torch.equal(fast, slow)
    monkeypatch.undo()
    calls.clear()
    _record_calls(monkeypatch, calls)
    with_bar = g.generate(PROMPTS, progress=True, **kw)
    assert len(calls) == 2 * -(-(T - 1) // 8) and calls[:2] == [(1, 9), (9, min(T, 17))]
    assert torch.equal(with_bar[0] if lp else with_bar, slow)


@pytest.fixture(scope="module")
def rl_model(tmp_path_factory):
    """A shape no other test decodes: hidden 40, 3 layers, 4 query / 2 KV heads, 53 codes, 9
    image tokens; weights at RL-policy scale (std 0.1: the rollout tests' scale)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("guided") / "m", seed=3, init_std=0.1, hidden_size=40,
                                num_layers=3, num_heads=4, num_kv_heads=2, codebook_size=53, image_size=24,
                                patch_size=8)
    return pg.load_model(path)


@pytest.mark.parametrize("uncond_mode", ["pad", "short"])
@pytest.mark.parametrize("greedy", [False, True])
def test_guided_logprobs_come_from_the_cpp_loop_and_match_static_and_eager(rl_model, monkeypatch, uncond_mode,
                                                                           greedy):
    """A CFG wave recording guided log-probs (RL on the guided distribution) runs as one C++ call
    per wave, never the Python loop, and gives the codes and log_softmax((u + s (c - u)) / T)[code]
    of the Python loop over the same C++ step (the former path), the static step and eager torch
    (to 1e-5); 10 rows in waves of 6 and 4, T 0.8, s 3."""
    from pgen_engine.generation.backends import DecodeBackend, EagerBackend
    from pgen_engine.training.grpo import FP32_LOGPROB_GAP_TOL

    model = rl_model
    prompts = [[1, 40, 41, 42, 3], [1, 9, 3], [1, 7, 8, 9, 10, 11, 12, 3], [1, 30, 3], [1, 15, 16, 3]]
    kw = dict(seed=[11, 12, 13, 14, 15], num_samples=2, guidance_scale=3.0, temperature=0.8, greedy=greedy,
              return_logprobs=True)
    T = model.num_image_tokens

    def gen(mode="eager"):
        return Generator(model, max_batch_size=6, max_seq_len=40, uncond_mode=uncond_mode, decode_mode=mode)

    calls: list = []
    _record_calls(monkeypatch, calls)
    monkeypatch.setattr(DecodeBackend, "decode_wave", lambda *a, **k: pytest.fail("guided wave ran the Python loop"))
    g = gen()
    assert g.backend == "cpp"
    toks, lp = g.generate(prompts, logprob_distribution="guided", **kw)
    assert calls == [(1, T), (1, T)]
    toks_c, lp_c = g.generate(prompts, **kw)  # the conditional branch's, from the same loop
    monkeypatch.undo()
    assert torch.equal(toks_c, toks)
    # the guided log-probs are not the conditional ones (a loop writing those would fail below)
    assert float((lp - lp_c).abs().max()) > 100 * FP32_LOGPROB_GAP_TOL
    py_loop = gen()  # what a guided wave ran before: the Python loop over the C++ step
    monkeypatch.setattr(py_loop._backend, "decode_wave",
                        lambda cache, wave: DecodeBackend.decode_wave(py_loop._backend, cache, wave))
    eager = gen()
    eager._backend = EagerBackend(model)
    # (bitwise equal to the Python loop on one thread; with more, each thread's rows go through
    # the head GEMM as their own block, which may round apart)
    for other in (py_loop, gen("static"), eager):
        o_toks, o_lp = other.generate(prompts, logprob_distribution="guided", **kw)
        assert torch.equal(o_toks, toks), other.backend
        assert float((o_lp - lp).abs().max()) <= FP32_LOGPROB_GAP_TOL, other.backend


def test_falls_back_to_python_when_it_does_not_apply(model, monkeypatch):
    calls: list = []
    _record_calls(monkeypatch, calls)
    g = Generator(model, max_batch_size=4, max_seq_len=32)
    want = g.generate(PROMPTS, seed=4, top_k=5)
    assert calls
    calls.clear()
    monkeypatch.setattr(model.generation_head, "act_name", "quick_gelu")  # no ATen twin: Python loop
    assert not decode_cpu.applies(model, g._cache_view(2, 20))
    assert torch.equal(g.generate(PROMPTS, seed=4, top_k=5), want) and not calls
    bf16 = Generator(model.to(torch.bfloat16), max_batch_size=2, max_seq_len=32)
    try:
        assert not decode_cpu.applies(bf16.model, bf16._cache_view(2, 20))
    finally:
        model.to(torch.float32)


def test_bad_inputs_get_clear_errors(model):
    g = Generator(model, max_batch_size=2, max_seq_len=32)
    T = model.num_image_tokens
    cache = g._cache_view(4, 24)
    out = torch.zeros(2, T, dtype=torch.long)
    seeds = torch.zeros(T, 2, dtype=torch.long)
    base = torch.full((4,), 4, dtype=torch.long)
    slot0 = torch.arange(4) * 24 + base
    kw = dict(guidance_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, greedy=False)
    decode_cpu.run_decode_loop(model, cache, True, out, None, seeds, base, slot0, **kw)  # valid
    assert bool(((out >= 0) & (out < model.codebook_size)).all())
    bad = out.clone()
    bad[1, 0] = model.codebook_size
    with pytest.raises(RuntimeError, match=r"code 64 of row 1 at step 0 is outside \[0, 64\)"):
        decode_cpu.run_decode_loop(model, cache, True, bad, None, seeds, base, slot0, **kw)
    with pytest.raises(RuntimeError, match="outside its cache row"):
        decode_cpu.run_decode_loop(model, cache, True, out, None, seeds, base, slot0 + 24, **kw)
    with pytest.raises(RuntimeError, match="beyond the cache length"):
        decode_cpu.run_decode_loop(model, cache, True, out, None, seeds, base + 10, slot0 + 10, **kw)
    with pytest.raises(RuntimeError, match=r"step_seeds must be .* shape \[16, 2\]"):
        decode_cpu.run_decode_loop(model, cache, True, out, None, seeds[:3], base, slot0, **kw)
    with pytest.raises(RuntimeError, match="rows for a cache of 4"):
        decode_cpu.run_decode_loop(model, cache, True, torch.zeros(3, T, dtype=torch.long), None,
                                   torch.zeros(T, 3, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                                   torch.arange(6) * 24, **kw)


def test_rows_per_pass_changes_nothing_but_speed(model, monkeypatch):
    """Rows decoded in passes of 1 give bitwise the codes and log-probs of one pass."""
    g = Generator(model, max_batch_size=6, max_seq_len=32)
    kw = dict(seed=[5, 6, 7], num_samples=2, top_k=6, top_p=0.95, return_logprobs=True)
    monkeypatch.setenv("PGEN_ROWS_PER_PASS", "0")
    one = g.generate(PROMPTS, **kw)
    monkeypatch.setenv("PGEN_ROWS_PER_PASS", "1")
    many = g.generate(PROMPTS, **kw)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    monkeypatch.setenv("PGEN_ROWS_PER_PASS", "two")
    with pytest.raises(ValueError, match="PGEN_ROWS_PER_PASS='two': expected an integer >= 0"):
        g.generate(PROMPTS, **kw)


def test_rows_per_pass_heuristic_keeps_the_kv_in_cache(model, monkeypatch):
    monkeypatch.delenv("PGEN_ROWS_PER_PASS", raising=False)
    monkeypatch.setattr(decode_cpu, "last_level_cache_bytes", lambda: 32 << 20)
    g = Generator(model, max_batch_size=8, max_seq_len=400)
    T = model.num_image_tokens
    small, big = g._cache_view(16, 40), g._cache_view(16, 400)
    assert decode_cpu.rows_per_pass(model, big, True, T) >= 2
    assert decode_cpu.rows_per_pass(model, small, True, T) > decode_cpu.rows_per_pass(model, big, True, T)
    cfg = model.config.text
    per_row = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 2 * 800  # cond + uncond, no shared prefix
    want = max(2, (8 << 20) // (torch.get_num_threads() * per_row))
    assert decode_cpu.rows_per_pass(model, big, True, T) == want


def test_a_bfloat16_cache_under_a_float32_model_takes_the_eager_path(model, monkeypatch):
    """The C++ stack needs a float32 cache; a bfloat16 one decodes through the torch layers."""
    calls: list = []
    _record_calls(monkeypatch, calls)
    g = Generator(model, max_batch_size=2, max_seq_len=32, cache_dtype=torch.bfloat16)
    out = g.generate(PROMPTS[:2], seed=3, top_k=5)
    assert out.shape == (2, model.num_image_tokens) and not calls
    assert not decode_cpu.applies(model, g._cache_view(2, 20))


def test_weights_larger_than_the_budget_decode_in_one_pass(model, monkeypatch):
    monkeypatch.delenv("PGEN_ROWS_PER_PASS", raising=False)
    g = Generator(model, max_batch_size=8, max_seq_len=40)
    cache = g._cache_view(16, 40)
    monkeypatch.setattr(decode_cpu, "last_level_cache_bytes", lambda: 32 << 20)
    assert decode_cpu.rows_per_pass(model, cache, True, model.num_image_tokens) >= 2
    monkeypatch.setattr(decode_cpu, "last_level_cache_bytes", lambda: 4 * 1024)  # weights >> a quarter of it
    assert decode_cpu.rows_per_pass(model, cache, True, model.num_image_tokens) == 0


def test_pack_limit_falls_back_to_the_blas(model, monkeypatch):
    """PGEN_CPU_PACK_MAX_MB caps the packed copy of the weights (0: never pack, use the BLAS)."""
    g = Generator(model, max_batch_size=6, max_seq_len=32)
    kw = dict(seed=[1, 2, 3], num_samples=2, top_k=6, top_p=0.95)
    packed = g.generate(PROMPTS, **kw)
    monkeypatch.setenv("PGEN_CPU_PACK_MAX_MB", "0")
    assert torch.equal(g.generate(PROMPTS, **kw), packed)
    monkeypatch.setenv("PGEN_CPU_PACK_MAX_MB", "lots")
    with pytest.raises(RuntimeError, match="PGEN_CPU_PACK_MAX_MB must be an integer >= 0"):
        g.generate(PROMPTS, **kw)


@pytest.fixture
def two_threads():
    """The team decode needs > 1 thread (CI machines have 2 cores; more threads than cores only
    slows the test down)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("which", ["model", "rl_model"])
@pytest.mark.parametrize("kw", [dict(top_k=6, top_p=0.95, return_logprobs=True),
                                dict(greedy=True, return_logprobs=True, logprob_distribution="guided"),
                                dict(guidance_scale=1.0, temperature=0.7, return_logprobs=True)])
def test_team_decode_gives_the_codes_and_logprobs_of_per_thread_groups(request, which, kw, monkeypatch,
                                                                      two_threads):
    """The team (every projection split by columns between the threads) and one group of rows
    per thread give bitwise the same codes and log-probs: 1, 3 and 5 prompts x 2 samples (a
    shared prompt prefix), CFG on and off, passes of 1 row; two geometries (GQA and hidden 40,
    53 codes: column shares that are not whole 16-column panels)."""
    model = request.getfixturevalue(which)
    if not extension().packed_gemm_available():
        pytest.skip("the team decode runs with the packed AVX-512 GEMM only")
    g = Generator(model, max_batch_size=10, max_seq_len=32)
    calls: list = []
    ext = extension()
    real = ext.decode_loop_cpu
    monkeypatch.setattr(ext, "decode_loop_cpu", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    prompts = PROMPTS + [[1, 12, 13, 3], [1, 11, 3]]
    for n in (1, 3, 5):
        for passes in ("0", "1"):
            monkeypatch.setenv("PGEN_ROWS_PER_PASS", passes)
            out = {}
            for mode in ("0", "1"):
                monkeypatch.setenv("PGEN_CPU_DECODE_TEAM", mode)
                calls.clear()
                out[mode] = g.generate(prompts[:n], seed=list(range(n)), num_samples=2, **kw)
                assert calls and all(c == (mode == "1") for c in calls)
            assert torch.equal(out["0"][0], out["1"][0]) and torch.equal(out["0"][1], out["1"][1])


def test_team_decode_policy(monkeypatch):
    """auto: a team where a thread's group would hold <= TEAM_MAX_ROWS (4) rows, CFG partners
    included, and there is more than one thread; 1 / 0 force it; anything else is an error."""
    monkeypatch.delenv("PGEN_CPU_DECODE_TEAM", raising=False)
    assert decode_cpu.team_decode(1, True, threads=2)
    assert decode_cpu.team_decode(4, True, threads=2)  # 2 + 2 rows per thread
    assert not decode_cpu.team_decode(5, True, threads=2)
    assert decode_cpu.team_decode(8, False, threads=2) and not decode_cpu.team_decode(9, False, threads=2)
    assert decode_cpu.team_decode(16, True, threads=8)
    assert not decode_cpu.team_decode(3, True, threads=1)
    monkeypatch.setenv("PGEN_CPU_DECODE_TEAM", "1")
    assert decode_cpu.team_decode(64, True, threads=2)
    monkeypatch.setenv("PGEN_CPU_DECODE_TEAM", "0")
    assert not decode_cpu.team_decode(1, True, threads=2)
    monkeypatch.setenv("PGEN_CPU_DECODE_TEAM", "yes")
    with pytest.raises(ValueError, match="PGEN_CPU_DECODE_TEAM='yes': expected auto, 0 or 1"):
        decode_cpu.team_decode(1, True, threads=2)


def test_packed_weights_buffer_is_reused_and_released(model):
    """The packed copy of the weights lives in one buffer reused across calls (no fresh pages
    each call) until release_cache() frees it; a second release frees nothing."""
    ext = extension()
    if not ext.packed_gemm_available():
        pytest.skip("no packed GEMM on this CPU")
    g = Generator(model, max_batch_size=4, max_seq_len=32)
    first = g.generate(PROMPTS, seed=[1, 2, 3], top_k=5)
    g.release_cache()
    assert ext.release_pack_arena() == 0  # release_cache freed it already
    again = g.generate(PROMPTS, seed=[1, 2, 3], top_k=5)
    assert torch.equal(first, again)
    lm = model.language_model
    per_layer = sum(-(-w.shape[0] // 16) * 16 * w.shape[1] for w in
                    (lm.layers[0].self_attn.q_proj.weight, lm.layers[0].self_attn.k_proj.weight,
                     lm.layers[0].self_attn.v_proj.weight, lm.layers[0].self_attn.o_proj.weight,
                     lm.layers[0].mlp.gate_proj.weight, lm.layers[0].mlp.up_proj.weight,
                     lm.layers[0].mlp.down_proj.weight))
    assert ext.release_pack_arena() == 4 * per_layer * len(lm.layers)
    assert ext.release_pack_arena() == 0
