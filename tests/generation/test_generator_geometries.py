"""Generator on geometries and inputs the main suite does not try.

* greedy parity with ``transformers`` for hidden / intermediate / codebook sizes that are not
  multiples of the packed GEMM's 16-column panels, head dims 2 / 8 / 10 / 12 / 16 / 24 (one with
  heads x head_dim != hidden), MHA and MQA, 1 and 3 layers, 4 / 9 / 16 / 25 / 36 image tokens,
  CFG scales 1 / 2.5 / 7, ragged batches in waves;
* prompts long enough for the packed prefill (>= 512 prompt tokens per call) and for ATen's
  prompt attention (one prompt > 512 tokens);
* sampling: every decode path (C++ wave loop, Python loop, static step) gives the same codes; extreme top-k / top-p / temperature equal greedy;
* bad inputs (NaN/Inf weights or pixels, overflowing temperature, malformed ids / masks / pixels
  / seeds): a clear error, never silent garbage codes or an out-of-range read.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator, decode_cpu
from tests.generation._geometry import build_pair, ragged_prompts

SPECIAL = pg.SpecialTokens.builtin()

GEOMETRIES = {
    # panel tails everywhere: H 40, I 50, K 37; head_dim 10; 4 image tokens
    "h40-i50-k37-hd10-t4": dict(hidden_size=40, num_heads=4, num_kv_heads=2, head_dim=10, intermediate_size=50,
                                codebook_size=37, image_size=16, patch_size=8),
    # head_dim 12 (non power of two), 6 heads / 3 KV heads, K 100, 9 image tokens
    "h72-i100-k100-hd12-t9": dict(hidden_size=72, num_heads=6, num_kv_heads=3, head_dim=12, intermediate_size=100,
                                  codebook_size=100, image_size=24, patch_size=8),
    # MQA: 6 query heads share 1 KV head of dim 8; 16 image tokens
    "mqa-hd8-k50-t16": dict(hidden_size=48, num_heads=6, num_kv_heads=1, head_dim=8, intermediate_size=64,
                            codebook_size=50, image_size=32, patch_size=8),
    # MHA, 3 layers, head_dim 24 (q width 48 = H), 25 image tokens
    "mha-3layers-hd24-k70-t25": dict(hidden_size=48, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=24,
                                     intermediate_size=72, codebook_size=70, image_size=40, patch_size=8),
    # explicit head_dim with heads x head_dim != hidden (q / o width 64 vs H 48), MQA, 36 image tokens
    "q64-h48-mqa-hd16-k45-t36": dict(hidden_size=48, num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=40,
                                     codebook_size=45, image_size=48, patch_size=8),
    # 1 layer, hidden 8, head_dim 2, I 9, K 17 (one column past a panel)
    "1layer-h8-hd2-k17": dict(hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2,
                              intermediate_size=9, codebook_size=17, image_size=16, patch_size=8,
                              vision_hidden_size=16),
}

def _build(tmp_path_factory, name: str):
    """(engine model, transformers model) of a geometry, built once per session."""
    return build_pair(tmp_path_factory, name, GEOMETRIES[name])


@pytest.fixture(params=list(GEOMETRIES))
def geom(request, tmp_path_factory):
    return _build(tmp_path_factory, request.param)


@pytest.fixture
def odd(tmp_path_factory):
    """The panel-tail geometry (H 40, K 37, 4 image tokens): cheap, for input checks."""
    return _build(tmp_path_factory, "h40-i50-k37-hd10-t4")


def _ragged(seed: int, lens: list[int]):
    return ragged_prompts(seed, lens, SPECIAL)


@torch.no_grad()
def _oracle(hf, ids, mask, scale: float, T: int) -> torch.Tensor:
    """transformers' greedy image generation. Its generate() always doubles the batch and only
    mixes for scale > 1, so scale 1 (no CFG) runs transformers' own modules, cond rows only."""
    if scale != 1.0:
        return hf.generate(ids, attention_mask=mask, generation_mode="image", guidance_scale=scale, do_sample=False)
    m = hf.model
    x = hf.get_input_embeddings()(ids)
    am = mask.clone()
    toks = []
    for _ in range(T):
        h = m.language_model(inputs_embeds=x, attention_mask=am).last_hidden_state[:, -1]
        tok = m.generation_head(h).argmax(-1)
        toks.append(tok)
        x = torch.cat([x, hf.prepare_embeddings_for_image_generation(tok)[:, None]], 1)
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], 1)
    return torch.stack(toks, 1)


# ---------------------------------------------------------------------------- greedy parity
def test_greedy_matches_transformers_on_odd_geometries(geom):
    """Ragged, left-padded batch of 3 through waves of 2 rows (and one wave), CFG 1 / 2.5 / 7."""
    model, hf = geom
    T = model.num_image_tokens
    ids, mask = _ragged(11, [11, 4, 7])
    for scale in (1.0, 2.5, 7.0):
        ref = _oracle(hf, ids, mask, scale, T)
        for mbs in (2, 3):
            out = Generator(model, max_batch_size=mbs, max_seq_len=11 + T).generate(ids, mask, guidance_scale=scale,
                                                                                    greedy=True)
            assert torch.equal(out, ref), f"scale={scale} mbs={mbs}: {(out != ref).sum()} of {ref.numel()} differ"


@pytest.mark.parametrize("lens", [[300, 170, 43], [520, 7]], ids=["packed-prefill", "aten-attention"])
def test_greedy_matches_transformers_on_long_prompts(odd, lens):
    """>= 512 prompt tokens in one prefill call take the packed GEMM (and its packed prompt
    attention while every prompt is <= 512 tokens; ATen's masked attention past that)."""
    model, hf = odd
    T = model.num_image_tokens
    ids, mask = _ragged(sum(lens), lens)
    for scale in (1.0, 3.0):
        ref = _oracle(hf, ids, mask, scale, T)
        out = Generator(model, max_batch_size=4, max_seq_len=max(lens) + T).generate(ids, mask, guidance_scale=scale,
                                                                                     greedy=True)
        assert torch.equal(out, ref), f"scale={scale}: {(out != ref).sum()} of {ref.numel()} differ"


def test_prompt_exactly_filling_max_seq_len(odd):
    model, hf = odd
    T = model.num_image_tokens
    ids, mask = _ragged(5, [16, 9])
    g = Generator(model, max_batch_size=2, max_seq_len=16 + T)
    assert torch.equal(g.generate(ids, mask, guidance_scale=2.5, greedy=True), _oracle(hf, ids, mask, 2.5, T))
    long = [[SPECIAL.bos] + [7] * 15 + [SPECIAL.boi]]
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        g.generate(long)


# ---------------------------------------------------------------------------- sampling
def _all_paths(model, prompts, mbs: int, **kw) -> dict[str, torch.Tensor]:
    T = model.num_image_tokens
    L = max(map(len, prompts)) + T
    out = {"cpp": Generator(model, max_batch_size=mbs, max_seq_len=L).generate(prompts, **kw),
           "static": Generator(model, max_batch_size=mbs, max_seq_len=L, decode_mode="static").generate(prompts, **kw)}
    return out


@pytest.mark.parametrize("kw", [dict(top_k=3, top_p=0.8), dict(temperature=0.6, guidance_scale=1.0),
                                dict(top_k=1000, return_logprobs=True)])
def test_sampling_paths_agree_on_odd_geometries(geom, kw):
    """C++ wave loop and static Python step: same codes; a request's
    samples do not depend on its batch or on how waves split it (num_samples > max_batch_size)."""
    model, _ = geom
    ids, mask = _ragged(3, [9, 5, 12])
    prompts = [ids[b, mask[b].bool()].tolist() for b in range(3)]
    kw = dict(dict(guidance_scale=2.5, num_samples=3, seed=[11, 22, 33]), **kw)
    paths = _all_paths(model, prompts, 2, **kw)
    lp = kw.get("return_logprobs")
    ref = paths["cpp"][0] if lp else paths["cpp"]
    K = model.codebook_size
    assert ref.shape == (9, model.num_image_tokens) and 0 <= int(ref.min()) and int(ref.max()) < K
    for name, got in paths.items():
        if lp:
            torch.testing.assert_close(got[1], paths["cpp"][1], rtol=1e-5, atol=1e-5)
            got = got[0]
        assert torch.equal(got, ref), name
    alone = Generator(model, max_batch_size=8, max_seq_len=12 + model.num_image_tokens).generate(
        prompts[1:2], **dict(kw, seed=[22], return_logprobs=False))
    assert torch.equal(alone, ref[3:6])


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-6)],
                         ids=["top_k=1", "top_p=1e-9", "temperature=1e-6"])
def test_degenerate_sampling_equals_greedy(odd, kw):
    model, _ = odd
    prompts = [[SPECIAL.bos, 7, 8, 9, SPECIAL.boi], [SPECIAL.bos, 10, SPECIAL.boi]]
    g = Generator(model, max_batch_size=4, max_seq_len=16)
    greedy = g.generate(prompts, guidance_scale=3.0, greedy=True, num_samples=2)
    assert torch.equal(g.generate(prompts, guidance_scale=3.0, num_samples=2, seed=4, **kw), greedy)


def test_top_k_at_or_past_the_codebook_is_off(odd):
    model, _ = odd
    K = model.codebook_size
    prompts = [[SPECIAL.bos, 7, 8, 9, SPECIAL.boi]]
    g = Generator(model, max_batch_size=4, max_seq_len=16)
    off = g.generate(prompts, num_samples=4, seed=9)
    for k in (K, K + 1, 10 * K):
        assert torch.equal(g.generate(prompts, num_samples=4, seed=9, top_k=k), off), k


def test_low_precision_model_on_cpu_runs_every_path(odd):
    """bfloat16 / float16 models on CPU take the Python loop: same codes on every path."""
    model, _ = odd
    prompts = [[SPECIAL.bos, 7, 8, 9, SPECIAL.boi], [SPECIAL.bos, 10, SPECIAL.boi]]
    for dtype in (torch.bfloat16, torch.float16):
        m = copy.deepcopy(model).to(dtype)
        assert not decode_cpu.applies(m, Generator(m, max_batch_size=1, max_seq_len=8)._cache_view(2, 8))
        paths = _all_paths(m, prompts, 3, guidance_scale=3.0, num_samples=2, seed=[5, 6], top_k=10)
        for name, got in paths.items():
            assert torch.equal(got, paths["cpp"]), (dtype, name)
        assert 0 <= int(paths["cpp"].min()) and int(paths["cpp"].max()) < model.codebook_size


@pytest.mark.parametrize("model_dtype,cache_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                     (torch.bfloat16, torch.float32)])
def test_cache_dtype_other_than_the_model_on_every_path(odd, model_dtype, cache_dtype):
    """cache_dtype may differ from the model's: every decode path casts the cache on read."""
    model, _ = odd
    m = copy.deepcopy(model).to(model_dtype)
    prompts = [[SPECIAL.bos, 7, 8, 9, SPECIAL.boi], [SPECIAL.bos, 10, SPECIAL.boi]]
    kw = dict(guidance_scale=3.0, num_samples=2, greedy=True)
    out = {name: Generator(m, max_batch_size=2, max_seq_len=16, cache_dtype=cache_dtype, **extra).generate(prompts, **kw)
           for name, extra in (("waves", {}), ("static", dict(decode_mode="static")))}
    for name, got in out.items():
        assert got.shape == (4, m.num_image_tokens) and 0 <= int(got.min()) and int(got.max()) < m.codebook_size
        if model_dtype == torch.float32:  # float32 attention either way: the same codes
            assert torch.equal(got, out["waves"]), name


# ---------------------------------------------------------------------------- non-finite values
def _poison(model, where: str):
    m = copy.deepcopy(model)
    with torch.no_grad():
        p = dict(m.named_parameters())[where]
        if where == "generation_embeddings.weight":
            p.fill_(float("nan"))  # codes 0 come out finite; the first decode step turns NaN
        else:
            p.view(-1)[0] = float("nan")
    return m


DECODE_PATHS = ["cpp", "python", "static"]


def _generator(model, path: str, monkeypatch, **kw) -> Generator:
    if path == "python":
        monkeypatch.setattr(decode_cpu, "applies", lambda *a: False)
    return Generator(model, decode_mode="static" if path == "static" else "eager", **kw)


@pytest.mark.parametrize("path", DECODE_PATHS)
@pytest.mark.parametrize("where", ["generation_head.vision_head.weight",
                                   "language_model.layers.0.mlp.down_proj.weight",
                                   "generation_embeddings.weight"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sample"])
def test_nan_weights_raise_a_clear_error(odd, monkeypatch, path, where, greedy):
    """NaN in the weights (a diverged policy) makes every logit NaN: the call must say so,
    never return codes picked from NaN (argmax's 0, the sampler's -1) or read embedding
    row -1 on the next step."""
    model = _poison(odd[0], where)
    g = _generator(model, path, monkeypatch, max_batch_size=2, max_seq_len=16)
    with pytest.raises(RuntimeError, match="non-finite logits"):
        g.generate([[SPECIAL.bos, 7, 8, SPECIAL.boi], [SPECIAL.bos, 9, SPECIAL.boi]], greedy=greedy,
                   guidance_scale=3.0, num_samples=2, seed=1)


@pytest.mark.parametrize("path", DECODE_PATHS)
def test_nan_pixels_and_overflowing_temperature_raise(odd, monkeypatch, path):
    model, _ = odd
    T = model.num_image_tokens
    g = _generator(model, path, monkeypatch, max_batch_size=2, max_seq_len=32)
    hist = [SPECIAL.bos, 7, SPECIAL.boi] + [SPECIAL.image] * T + [SPECIAL.eoi, SPECIAL.boi]
    px = torch.full((1, 3, model.image_size, model.image_size), float("nan"))
    with pytest.raises(RuntimeError, match="non-finite logits"):
        g.generate([hist], pixel_values=px, guidance_scale=3.0)
    # the error names the first affected output row and token: only the second prompt's history is NaN
    from pgen_engine.generation import NonFiniteLogitsError

    with pytest.raises(NonFiniteLogitsError, match="output row 1 at image token 0") as e:
        g.generate([[SPECIAL.bos, 7, SPECIAL.boi], hist], pixel_values=px, guidance_scale=3.0)
    assert (e.value.row, e.value.token) == (1, 0)
    # logits / temperature overflow float32: no code can be drawn from inf / inf
    with pytest.raises(RuntimeError, match="non-finite logits"):
        g.generate([[SPECIAL.bos, 7, SPECIAL.boi]], temperature=1e-45)
    # the Generator is still usable afterwards
    ok = g.generate([[SPECIAL.bos, 7, SPECIAL.boi]], seed=2)
    assert 0 <= int(ok.min()) and int(ok.max()) < model.codebook_size


@pytest.mark.parametrize("path", DECODE_PATHS + ["bf16"])
def test_a_non_finite_call_does_not_poison_the_reused_cache(odd, monkeypatch, path):
    """NaN pixels write NaN K/V into the Generator's cache; that call fails, and the next clean
    call must give a fresh Generator's codes. Slots past a row's length keep what earlier calls
    left there, and 0 * NaN in the attention's P . V is NaN: every attention path must ignore them."""
    model, _ = odd
    T = model.num_image_tokens
    if path == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
        path = "cpp"
    kw = dict(max_batch_size=2, max_seq_len=32)
    hist = [SPECIAL.bos, 7, SPECIAL.boi] + [SPECIAL.image] * T + [SPECIAL.eoi, SPECIAL.boi]
    clean = [[SPECIAL.bos, 7, 8, SPECIAL.boi], [SPECIAL.bos, 9, SPECIAL.boi]]
    fresh = _generator(model, path, monkeypatch, **kw).generate(clean, guidance_scale=3.0, greedy=True, num_samples=2)
    g = _generator(model, path, monkeypatch, **kw)
    with pytest.raises(RuntimeError, match="non-finite logits"):
        g.generate([hist, hist], pixel_values=torch.full((2, 3, model.image_size, model.image_size), float("nan")),
                   guidance_scale=3.0, greedy=True)
    assert torch.equal(g.generate(clean, guidance_scale=3.0, greedy=True, num_samples=2), fresh)


def test_decode_loop_cpu_marks_non_finite_rows_not_reads_out_of_range(odd):
    """The C++ loop's contract: a row whose logits are not finite gets code -1 at that step
    (embedded as code 0 next), the others decode as before."""
    model, _ = odd
    T = model.num_image_tokens

    def run(m, first):
        g = Generator(m, max_batch_size=2, max_seq_len=T + 1)
        out = torch.zeros(2, T, dtype=torch.long)
        out[:, 0] = torch.tensor(first)
        # no prompt: both rows decode from position 0 of their own cache row
        decode_cpu.run_decode_loop(m, g._cache_view(2, T), False, out, None, torch.zeros(T, 2, dtype=torch.long),
                                   torch.zeros(2, dtype=torch.long), torch.arange(2) * T, guidance_scale=1.0,
                                   temperature=1.0, top_k=0, top_p=1.0, greedy=True)
        return out

    clean = run(model, [6, 6])
    bad_code = next(c for c in range(model.codebook_size) if c not in clean[1].tolist())
    m = copy.deepcopy(model)
    with torch.no_grad():  # only bad_code embeds to NaN
        m.generation_embeddings.weight[bad_code] = float("nan")
    out = run(m, [bad_code, 6])
    assert (out[0, 1:] == -1).all(), out
    assert torch.equal(out[1], clean[1]), out


# ---------------------------------------------------------------------------- malformed inputs
def test_sampling_settings_are_validated(odd):
    model, _ = odd
    g = Generator(model, max_batch_size=2, max_seq_len=16)
    p = [[SPECIAL.bos, 7, SPECIAL.boi]]
    for s in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            g.generate(p, guidance_scale=s, greedy=True)
    for t in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            g.generate(p, temperature=t, greedy=True)


def test_pixel_values_are_validated(odd):
    model, _ = odd
    T, S = model.num_image_tokens, model.image_size
    g = Generator(model, max_batch_size=2, max_seq_len=32)
    hist = [[SPECIAL.bos, 7, SPECIAL.boi] + [SPECIAL.image] * T + [SPECIAL.eoi, SPECIAL.boi]]
    good = torch.rand(1, 3, S, S) * 2 - 1
    ref = g.generate(hist, pixel_values=good, greedy=True)
    # a smaller image would give the vision tower fewer patches, broadcast over its position table
    for bad in (torch.zeros(1, 3, S // 2, S // 2), torch.zeros(1, 3, S, S + 8), torch.zeros(1, 1, S, S),
                torch.zeros(1, 4, S, S)):
        with pytest.raises(ValueError, match="pixel_values"):
            g.generate(hist, pixel_values=bad, greedy=True)
    # integer images are 0..255, not the [-1, 1] floats the vision tower takes
    with pytest.raises(ValueError, match="floating"):
        g.generate(hist, pixel_values=(good * 100).to(torch.uint8), greedy=True)
    with pytest.raises(ValueError, match="floating"):
        g.generate(hist, pixel_values=good.long(), greedy=True)
    # other float dtypes are cast
    assert torch.equal(g.generate(hist, pixel_values=good.double(), greedy=True), ref)


def test_attention_mask_forms(odd):
    model, _ = odd
    g = Generator(model, max_batch_size=2, max_seq_len=16)
    ids, mask = _ragged(2, [6, 4])
    ref = g.generate(ids, mask, greedy=True)
    assert torch.equal(g.generate(ids, mask.tolist(), greedy=True), ref)
    assert torch.equal(g.generate(ids, mask.bool(), greedy=True), ref)
    assert torch.equal(g.generate(ids, mask.float(), greedy=True), ref)
    for bad in (mask * 2, mask.float() * 0.5, mask - 1):
        with pytest.raises(ValueError, match="attention_mask"):
            g.generate(ids, bad, greedy=True)


def test_list_prompts_are_token_ids(odd):
    model, _ = odd
    g = Generator(model, max_batch_size=2, max_seq_len=16)
    B, I = SPECIAL.bos, SPECIAL.boi
    ref = g.generate([[B, 7, I]], greedy=True)
    # integer-like ids are fine
    assert torch.equal(g.generate([[B, np.int64(7), I]], greedy=True), ref)
    assert torch.equal(g.generate([torch.tensor([B, 7, I])], greedy=True), ref)
    assert torch.equal(g.generate((np.array([B, 7, I]),), greedy=True), ref)
    for bad in ([[B, 7.5, I]], [[B, 7.0, I]], [[B, "7", I]], ["a prompt"], [B, 7, I], [[B, None, I]]):
        with pytest.raises((TypeError, ValueError), match="input_ids"):
            g.generate(bad, greedy=True)
    with pytest.raises(ValueError, match="no prompt"):
        g.generate([])
    with pytest.raises(ValueError, match="no prompt"):
        g.generate(torch.zeros(0, 4, dtype=torch.long))


def test_seed_forms(odd):
    model, _ = odd
    g = Generator(model, max_batch_size=4, max_seq_len=16)
    p = [[SPECIAL.bos, 7, SPECIAL.boi], [SPECIAL.bos, 8, SPECIAL.boi]]
    ref = g.generate(p, seed=3)
    assert torch.equal(g.generate(p, seed=np.int64(3)), ref)
    assert torch.equal(g.generate(p, seed=torch.tensor(3)), ref)
    per = g.generate(p, seed=[3, 4])
    assert torch.equal(g.generate(p, seed=np.array([3, 4])), per)
    assert torch.equal(g.generate(p, seed=[np.int32(3), torch.tensor(4)]), per)
    for bad in (1.5, "3", [1.0, 2.0], None):
        with pytest.raises(TypeError, match="seed"):
            g.generate(p, seed=bad)
