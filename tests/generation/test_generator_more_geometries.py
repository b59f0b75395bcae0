"""Generator on geometries / inputs past tests/generation/test_generator_geometries.py.

* greedy parity with ``transformers`` for head dims 40 / 80 / 128 (q width != hidden), MQA with
  8 query heads, 1 image token (8 px / 8 px) and codebooks of 1000 / 37, prompts of 1 token and
  around the C++ attention's 32-key blocks, batches of 33 rows sharing one unconditional prefix;
* a float64 model (``load_model`` refuses the dtype, ``.double()`` does not): a clear error
  naming ``cache_dtype``, and the model's tokens with a float32 cache.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pgen_engine as pg
from pgen_engine.models.checkpoint import CheckpointError
from pgen_engine.generation import Generator

from tests.generation.test_generator_geometries import _oracle
from tests.generation._geometry import build_pair, ragged_prompts

SPECIAL = pg.SpecialTokens.builtin()

GEOMETRIES = {
    # MQA, head_dim 40 (q width 120 vs H 45, odd hidden), 1 layer, K 1000, 5x5 image tokens
    "h45-hd40-mqa-k1000-t25": dict(hidden_size=45, num_layers=1, num_heads=3, num_kv_heads=1, head_dim=40,
                                   intermediate_size=70, codebook_size=1000, image_size=40, patch_size=8,
                                   vision_hidden_size=16),
    # 8 query heads on 1 KV head, head_dim 80, K 37, a single image token
    "hd80-gqa8to1-k37-t1": dict(hidden_size=80, num_heads=8, num_kv_heads=1, head_dim=80, intermediate_size=33,
                                codebook_size=37, image_size=8, patch_size=8, vision_hidden_size=16),
    # head_dim 128 on a 34-wide model, MQA, 6x6 image tokens
    "h34-hd128-mqa-k37-t36": dict(hidden_size=34, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=128,
                                  intermediate_size=31, codebook_size=37, image_size=48, patch_size=8,
                                  vision_hidden_size=16),
}

def _ragged(seed: int, lens: list[int]):
    return ragged_prompts(seed, lens, SPECIAL)


def _build(tmp_path_factory, name: str):
    """(engine model, transformers model) of a geometry, built once per session."""
    return build_pair(tmp_path_factory, name, GEOMETRIES[name])


@pytest.fixture(params=list(GEOMETRIES))
def geom(request, tmp_path_factory):
    return _build(tmp_path_factory, request.param)


@pytest.mark.parametrize("lens,num_samples", [([1], 3), ([31, 32, 33, 1], 2), ([40] * 33, 1)],
                         ids=["one-token", "around-32-keys", "33-rows-one-uncond-prefix"])
def test_greedy_matches_transformers(geom, lens, num_samples):
    model, hf = geom
    T = model.num_image_tokens
    ids, mask = _ragged(len(lens), lens)
    for scale in (1.0, 4.0):
        ref = _oracle(hf, ids, mask, scale, T).repeat_interleave(num_samples, 0)
        for mode in ("eager", "static"):
            out = Generator(model, max_batch_size=7, decode_mode=mode).generate(
                ids, mask, guidance_scale=scale, greedy=True, num_samples=num_samples)
            assert torch.equal(out, ref), f"scale={scale} {mode}: {(out != ref).sum()} of {ref.numel()} differ"


def test_float64_model_names_cache_dtype(tmp_path_factory):
    """A float64 model used to fail with 'cache_dtype must be one of ..., got torch.float64' although
    the caller passed no cache_dtype; the error now says the model's dtype chose it, and a float32
    cache gives the float64 model's tokens (those of transformers in float64)."""
    from benchmarks.hf_janus import load_hf_janus  # late import: image generate ready on this transformers

    model, _ = _build(tmp_path_factory, "h45-hd40-mqa-k1000-t25")
    m64 = copy.deepcopy(model).double()
    with pytest.raises(ValueError, match=r"cache_dtype .*got None, and the model's dtype torch.float64"):
        Generator(m64)
    hf64 = load_hf_janus(model.source_dir, dtype=torch.float64)
    ids, mask = _ragged(3, [5, 2, 9])
    ref = _oracle(hf64, ids, mask, 3.0, model.num_image_tokens)
    out = Generator(m64, max_batch_size=2, cache_dtype=torch.float32).generate(ids, mask, guidance_scale=3.0,
                                                                                greedy=True)
    assert torch.equal(out, ref)


def test_kv_bytes_refuses_the_lengths_generate_refuses(tmp_path_factory):
    """kv_bytes answered a byte count for prompts generate refuses (past max_seq_len, or past the
    model's max_position_embeddings with the image tokens); it now refuses them with the same message."""
    model, _ = _build(tmp_path_factory, "hd80-gqa8to1-k37-t1")
    T, max_pos = model.num_image_tokens, model.config.text.max_position_embeddings
    g = Generator(model, max_batch_size=2, max_seq_len=10)
    assert g.kv_bytes([10 - T, 3]) > 0
    for call in (lambda: g.kv_bytes([3, 11 - T]), lambda: g.generate([[SPECIAL.bos] * (10 - T) + [SPECIAL.boi]])):
        with pytest.raises(ValueError, match=f"a prompt of {11 - T} tokens \\+ {T} image tokens exceeds max_seq_len=10"):
            call()
    g = Generator(model, max_batch_size=2, max_seq_len=max_pos + 8)
    assert g.kv_bytes([max_pos - T]) > 0
    for call in (lambda: g.kv_bytes([3, max_pos + 1 - T]),
                 lambda: g.generate([[1], [SPECIAL.bos] * (max_pos - T) + [SPECIAL.boi]])):
        with pytest.raises(ValueError, match=f"prompt 1: {max_pos + 1 - T} tokens \\+ {T} image tokens exceed the "
                                             f"model's max_position_embeddings={max_pos}"):
            call()


def test_input_ids_dtype_error_names_the_accepted_dtypes(tmp_path_factory):
    """A uint8 / int16 / bool ids tensor was refused as 'must be an integer [B,S] tensor, got
    torch.uint8' (uint8 is an integer type); the message now names int64 / int32."""
    model, _ = _build(tmp_path_factory, "hd80-gqa8to1-k37-t1")
    g = Generator(model, max_batch_size=2)
    for dt in (torch.uint8, torch.int16, torch.bool):
        with pytest.raises(ValueError, match=r"input_ids must be an int64 or int32 \[B,S\] tensor, got torch\.\w+ "):
            g.generate(torch.tensor([[1, 7, 3]]).to(dt), greedy=True)
    ref = g.generate(torch.tensor([[1, 7, 3]]), greedy=True)
    assert torch.equal(g.generate(torch.tensor([[1, 7, 3]], dtype=torch.int32), greedy=True), ref)


def test_generation_aligner_narrower_than_hidden_is_refused(tmp_path):
    """A checkpoint whose vq_config.projection_dim (the generation aligner's output) is not the
    text hidden_size loaded, and Generator.generate failed inside the decode ('decode_loop_cpu:
    aligner output width 24 != hidden size 48', 'decode_layers_cpu: hidden has shape ...'); the
    loader now refuses it naming both fields (transformers' Janus cannot generate from it either)."""
    from transformers import JanusConfig, JanusForConditionalGeneration  # late import: seconds to import

    from pgen_engine.models.tiny import tiny_janus_config

    d = tiny_janus_config(hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=2, intermediate_size=40,
                          codebook_size=37, image_size=16, patch_size=8, vision_hidden_size=16).to_dict()
    d["vq_config"]["projection_dim"] = 24
    torch.manual_seed(0)
    hf = JanusForConditionalGeneration(JanusConfig(**{k: v for k, v in d.items() if k != "transformers_version"}))
    for k, v in SPECIAL.generation_config_dict().items():
        setattr(hf.generation_config, k, v)
    hf.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"vq_config.projection_dim=24 != text hidden_size=48"):
        pg.load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("path", ["cpp", "python", "static"])
def test_greedy_log_probs_past_float32_raise(tmp_path_factory, monkeypatch, path):
    """greedy=True with return_logprobs and a temperature so small that logits / temperature
    overflow float32 returned the greedy codes with NaN log-probs and no error (sampling raises
    NonFiniteLogitsError there); the call now raises it too, naming the row and token."""
    from pgen_engine.generation import NonFiniteLogitsError, decode_cpu

    model, _ = _build(tmp_path_factory, "h45-hd40-mqa-k1000-t25")
    if path == "python":
        monkeypatch.setattr(decode_cpu, "applies", lambda *a: False)
    g = Generator(model, max_batch_size=4, decode_mode="static" if path == "static" else "eager")
    prompts = [[SPECIAL.bos, 7, SPECIAL.boi], [SPECIAL.bos, 9, 9, SPECIAL.boi]]
    codes, lp = g.generate(prompts, greedy=True, guidance_scale=3.0, temperature=1e-30, return_logprobs=True)
    assert torch.isfinite(lp).all() and torch.equal(codes, g.generate(prompts, greedy=True, guidance_scale=3.0))
    for dist in ("conditional", "guided"):
        with pytest.raises(NonFiniteLogitsError, match=r"output row \d+ at image token \d+"):
            g.generate(prompts, greedy=True, guidance_scale=3.0, temperature=1e-45, return_logprobs=True,
                       logprob_distribution=dist)
    # without log-probs greedy ignores the temperature: same codes, no error
    assert torch.equal(g.generate(prompts, greedy=True, guidance_scale=3.0, temperature=1e-45), codes)


@pytest.mark.parametrize("path", ["cpp", "python", "static"])
def test_top_p_below_float32_equals_greedy(tmp_path_factory, monkeypatch, path):
    """top_p=1e-50 passes SamplingParams ((0, 1]) but the float32 samplers read it as 0: the call
    failed after the prefill with 'sample_cpu: top_p must be in (0, 1], got 0.000000'. It now keeps
    the most probable code, as any tiny top_p does: the greedy codes."""
    from pgen_engine.generation import decode_cpu

    model, _ = _build(tmp_path_factory, "h45-hd40-mqa-k1000-t25")
    if path == "python":
        monkeypatch.setattr(decode_cpu, "applies", lambda *a: False)
    g = Generator(model, max_batch_size=4, decode_mode="static" if path == "static" else "eager")
    prompts = [[SPECIAL.bos, 7, SPECIAL.boi], [SPECIAL.bos, 9, 9, SPECIAL.boi]]
    greedy = g.generate(prompts, greedy=True, guidance_scale=3.0, num_samples=2)
    for top_p in (1e-50, 5e-324):
        assert torch.equal(g.generate(prompts, guidance_scale=3.0, num_samples=2, seed=4, top_p=top_p), greedy)


@pytest.mark.parametrize("path", ["cpp", "python", "static"])
def test_temperature_past_float32_range(tmp_path_factory, monkeypatch, path):
    """temperature=1e39 / 1e300 (finite, > 0: SamplingParams accepts them) reached the float32 samplers as
    inf and 1e-50 as 0, so generate failed after the prefill with 'sample_cpu: temperature must be a finite
    value > 0, got inf / 0.000000'. They are clamped into float32's normal range for every backend: a huge
    temperature samples (near-)uniformly, the same codes on every path; a tiny one overflows logits /
    temperature, the documented NonFiniteLogitsError, as 1e-40 does."""
    from pgen_engine.generation import NonFiniteLogitsError, decode_cpu

    model, _ = _build(tmp_path_factory, "h45-hd40-mqa-k1000-t25")
    prompts = [[SPECIAL.bos, 7, SPECIAL.boi], [SPECIAL.bos, 9, 9, SPECIAL.boi]]
    kw = dict(guidance_scale=3.0, num_samples=2, seed=[5, 6], return_logprobs=True)
    ref = Generator(model, max_batch_size=4, decode_mode="static").generate(prompts, temperature=3e38, **kw)
    if path == "python":
        monkeypatch.setattr(decode_cpu, "applies", lambda *a: False)
    g = Generator(model, max_batch_size=4, decode_mode="static" if path == "static" else "eager")
    for t in (1e39, 1e300):
        codes, lp = g.generate(prompts, temperature=t, **kw)
        assert torch.equal(codes, ref[0]) and torch.isfinite(lp).all(), t
        torch.testing.assert_close(lp, ref[1])
    for t in (1e-40, 1e-50):
        with pytest.raises(NonFiniteLogitsError, match="logits / temperature overflow float32"):
            g.generate(prompts, temperature=t, **kw)
