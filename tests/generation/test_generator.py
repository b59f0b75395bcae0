"""Generator: greedy parity with transformers, CFG/uncond modes, history inputs, sampling law."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator, decode_cpu
from pgen_engine.models.tiny import make_tiny_checkpoint
from tests.generation._host_sync import forbid_host_reads

SPECIAL = pg.SpecialTokens.builtin()


def _fresh_seed() -> int:
    # fresh inputs every run; the seed goes into assertion messages so failures reproduce
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """Tiny checkpoint with peaky logits (no greedy near-ties): 16 image tokens, K=64."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "peaky", seed=5, init_std=0.2, image_size=32,
                                patch_size=8, num_heads=4, num_kv_heads=2)
    from benchmarks.hf_janus import load_hf_janus  # late import: image generate ready on this transformers

    return pg.load_model(path), load_hf_janus(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tiny checkpoint with 4 image tokens and a 16-code codebook, for sampling statistics."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "small", seed=2, init_std=0.05, image_size=16,
                                patch_size=8, codebook_size=16)
    return pg.load_model(path)


def _ragged(gen: torch.Generator, lens: list[int], vocab: int = 300, img_tokens: int = 0):
    """Left-padded [B,S] prompts <bos> text <boi> of the given lengths, + their mask."""
    S = max(lens)
    ids = torch.full((len(lens), S), SPECIAL.pad, dtype=torch.long)
    mask = torch.zeros((len(lens), S), dtype=torch.long)
    for b, n in enumerate(lens):
        body = torch.randint(6, vocab, (n - 2,), generator=gen)
        ids[b, S - n:] = torch.cat([torch.tensor([SPECIAL.bos]), body, torch.tensor([SPECIAL.boi])])
        mask[b, S - n:] = 1
    return ids, mask


# ---------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("scale", [1.5, 3.0, 7.25])
def test_greedy_matches_transformers_generate(peaky, scale):
    model, hf = peaky
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(3, 14, (3,), generator=gen)]
    lens[0] = 13  # at least one unpadded row, others ragged
    ids, mask = _ragged(gen, lens)
    ref = hf.generate(ids, attention_mask=mask, generation_mode="image", guidance_scale=scale, do_sample=False)
    g = Generator(model, max_batch_size=4, max_seq_len=64)
    out = g.generate(ids, mask, guidance_scale=scale, greedy=True)
    assert out.shape == (3, model.num_image_tokens) and out.dtype == torch.long
    assert torch.equal(out, ref), f"seed={seed} lens={lens}: {(out != ref).sum()} tokens differ"
    # list-of-lists input (unpadded) is the same request
    rows = [ids[b, mask[b].bool()].tolist() for b in range(3)]
    assert torch.equal(g.generate(rows, guidance_scale=scale, greedy=True), ref)


def _hf_teacher_forced(hf, ids, mask, pixel_values, scale, T):
    """Greedy CFG over transformers' own modules, no cache: the oracle for history images."""
    m = hf.model
    emb = hf.get_input_embeddings()(ids)
    feats = m.get_image_features(pixel_values).pooler_output.reshape(-1, emb.shape[-1])
    slots = ids == hf.config.image_token_id
    cond = emb.masked_scatter(slots[..., None], feats)
    keep = (ids == SPECIAL.bos) | (ids == SPECIAL.boi)
    uncond = hf.get_input_embeddings()(ids.masked_fill(~keep, SPECIAL.pad))
    x = torch.cat([cond, uncond])
    am = torch.cat([mask, mask])
    toks = []
    for _ in range(T):
        h = m.language_model(inputs_embeds=x, attention_mask=am).last_hidden_state[:, -1]
        logits = m.generation_head(h)
        c, u = logits.chunk(2)
        tok = (u + (c - u) * scale).argmax(-1)
        toks.append(tok)
        e = hf.prepare_embeddings_for_image_generation(torch.cat([tok, tok]))
        x = torch.cat([x, e[:, None]], 1)
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], 1)
    return torch.stack(toks, 1)


def test_greedy_with_history_images_matches_transformers_modules(peaky):
    model, hf = peaky
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens
    # prompt b holds n_imgs[b] history images (placeholders) between text tokens
    n_imgs = [1, 2, 0]
    rows = []
    for k in n_imgs:
        r = [SPECIAL.bos] + torch.randint(6, 300, (3,), generator=gen).tolist()
        for _ in range(k):
            r += [SPECIAL.boi] + [SPECIAL.image] * n_img + [SPECIAL.eoi]
        rows.append(r + torch.randint(6, 300, (2,), generator=gen).tolist() + [SPECIAL.boi])
    S = max(map(len, rows))
    ids = torch.tensor([[SPECIAL.pad] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    px = torch.rand(sum(n_imgs), 3, model.image_size, model.image_size, generator=gen) * 2 - 1
    with torch.no_grad():
        ref = _hf_teacher_forced(hf, ids, mask, px, 4.0, model.num_image_tokens)
    out = Generator(model, max_batch_size=3, max_seq_len=S + n_img).generate(
        ids, mask, px, guidance_scale=4.0, greedy=True)
    assert torch.equal(out, ref), f"seed={seed}: {(out != ref).sum()} tokens differ"


# ---------------------------------------------------------------------------- engine oracle
def _engine_teacher_forced(model, cond_rows, cond_masks, uncond_rows, scale, T):
    """Greedy CFG, full recompute per token with the engine's forward_train (no cache)."""
    out = []
    for b, ids in enumerate(cond_rows):
        ids_t = torch.tensor([ids])
        cm = None if cond_masks is None else torch.tensor([cond_masks[b]])
        xc = model.embed_inputs(ids_t, cm)
        xu = model.embed_inputs(torch.tensor([uncond_rows[b]])) if uncond_rows is not None else None
        toks = []
        for _ in range(T):
            c = model.image_head_logits(model.forward_train(xc)[:, -1]).float()
            if xu is None:
                tok = c.argmax(-1)
            else:
                u = model.image_head_logits(model.forward_train(xu)[:, -1]).float()
                tok = (u + (c - u) * scale).argmax(-1)
            toks.append(tok)
            e = model.embed_image_codes(tok)[:, None]
            xc = torch.cat([xc, e], 1)
            if xu is not None:
                xu = torch.cat([xu, e], 1)
        out.append(torch.cat(toks))
    return torch.stack(out)


@torch.no_grad()
def test_short_mode_codes_history_samples_and_no_cfg(peaky):
    model, _ = peaky
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    T, K = model.num_image_tokens, model.codebook_size
    rows, cms = [], []
    for n_hist in (5, 0, 9):  # history images as VQ codes under gen_code_mask
        text = torch.randint(6, 300, (4,), generator=gen).tolist()
        codes = torch.randint(0, K, (n_hist,), generator=gen).tolist()
        rows.append([SPECIAL.bos] + text + [SPECIAL.boi] + codes + [SPECIAL.eoi, SPECIAL.boi])
        cms.append([False] * 6 + [True] * n_hist + [False, False])
    g = Generator(model, max_batch_size=4, max_seq_len=40, uncond_mode="short")
    short = [[SPECIAL.bos, SPECIAL.boi]] * 3
    ref = _engine_teacher_forced(model, rows, cms, short, 3.0, T)
    # 2 samples per prompt, 6 rows through a 4-row cache: waves split prompt 1's samples
    out = g.generate(rows, gen_code_mask=cms, num_samples=2, guidance_scale=3.0, greedy=True)
    assert torch.equal(out, ref.repeat_interleave(2, 0)), f"seed={seed}"
    # pad mode: uncond keeps bos/boi text tokens only; codes become pad
    unc = [[t if t in (SPECIAL.bos, SPECIAL.boi) and not c else SPECIAL.pad for t, c in zip(r, m)]
           for r, m in zip(rows, cms)]
    ref_pad = _engine_teacher_forced(model, rows, cms, unc, 3.0, T)
    out_pad = Generator(model, max_batch_size=3, max_seq_len=40).generate(rows, gen_code_mask=cms,
                                                                          guidance_scale=3.0, greedy=True)
    assert torch.equal(out_pad, ref_pad), f"seed={seed}"
    # guidance 1: no unconditional rows at all
    ref1 = _engine_teacher_forced(model, rows, cms, None, 1.0, T)
    assert torch.equal(g.generate(rows, gen_code_mask=cms, guidance_scale=1.0, greedy=True), ref1)


def test_cache_is_sized_by_the_call_and_reused(peaky):
    model, _ = peaky
    g = Generator(model, max_batch_size=2, max_seq_len=40)
    assert g.cache_nbytes() == 0  # nothing until a call says what it needs
    gen = torch.Generator().manual_seed(_fresh_seed())
    ids, mask = _ragged(gen, [5, 12])
    g.generate(ids, mask, num_samples=1, top_k=5)
    ptrs = [t.data_ptr() for t in (*g._k, *g._v)]
    nbytes = g.cache_nbytes()
    cfg, T = model.config.text, model.num_image_tokens
    per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    # pool: 2 prompts + 2 distinct pad prompts (lengths 5, 12) of Lp = 12; own: 4 rows x (T - 1)
    assert nbytes == g.last_stats["kv_bytes_peak"] == (4 * 12 + 4 * (T - 1)) * per_tok
    assert nbytes == g.kv_bytes([5, 12], num_samples=1, guidance_scale=5.0)
    for lens in ([5, 9], [12], [3, 4]):  # smaller calls reuse the storage
        ids, mask = _ragged(gen, lens)
        g.generate(ids, mask, num_samples=1, top_k=5)
        assert g.last_stats["kv_bytes_peak"] <= nbytes
    assert [t.data_ptr() for t in (*g._k, *g._v)] == ptrs and g.cache_nbytes() == nbytes
    assert set(g.last_stats) >= {"prefill_s", "decode_s", "kv_bytes_peak"} and g.last_stats["decode_s"] > 0
    g.release_cache()
    assert g.cache_nbytes() == 0


def test_kv_memory_target_shared_prompts_and_uncond(peaky):
    """8 prompts x 8 samples, 512-token prompts, CFG with the pad prompt: KV held <= 1.1 x
    (8 prompt prefixes + 1 unconditional prefix per distinct length + every row's image tokens)."""
    model, _ = peaky
    gen = torch.Generator().manual_seed(_fresh_seed())
    ids, mask = _ragged(gen, [512] * 8)
    g = Generator(model, max_batch_size=64, max_seq_len=512 + model.num_image_tokens)
    out = g.generate(ids, mask, num_samples=8, guidance_scale=5.0, greedy=True)
    assert out.shape == (64, model.num_image_tokens)
    cfg, T = model.config.text, model.num_image_tokens
    per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    target = (8 * 512 + 1 * 512 + 128 * T) * per_tok
    peak = g.last_stats["kv_bytes_peak"]
    assert peak <= 1.1 * target, (peak, target)
    assert peak == g.cache_nbytes() == g.kv_bytes([512] * 8, num_samples=8, guidance_scale=5.0)
    # the layout before sharing (a copy of the prompt per row) would hold 128 x (512 + T)
    assert peak < (128 * (512 + T)) * per_tok / 5


def test_kv_bytes_of_history_prompts_with_distinct_uncond_prompts(peaky):
    # history prompts keep their interior begin-of-image tokens in the "pad" unconditional prompt,
    # so two of one length may each hold their own; the default plan (one per distinct length) then
    # under-counted what generate held, which the RL memory planner relied on
    model, _ = peaky
    sp = model.special_tokens
    t = [i for i in range(64) if i not in set(vars(sp).values())][-5:]  # plain text tokens
    a = [sp.bos, t[0], sp.boi, t[1], t[2], t[3], t[4], sp.boi]
    b = [sp.bos, t[0], t[1], t[2], sp.boi, t[3], t[4], sp.boi]
    g = Generator(model, max_batch_size=4, max_seq_len=8 + model.num_image_tokens)
    g.generate(torch.tensor([a, b]), num_samples=2, guidance_scale=5.0, greedy=True)
    peak = g.last_stats["kv_bytes_peak"]
    assert peak == g.kv_bytes([8, 8], num_samples=2, distinct_uncond=True) > g.kv_bytes([8, 8], num_samples=2)
    g.generate(torch.tensor([a, a]), num_samples=2, guidance_scale=5.0, greedy=True)  # identical: an upper bound
    assert g.last_stats["kv_bytes_peak"] == g.kv_bytes([8, 8], num_samples=2) < g.kv_bytes([8, 8], 2, distinct_uncond=True)


def test_kv_bytes_plan_needs_no_model():
    from types import SimpleNamespace

    from pgen_engine.generation.generator import plan_kv_bytes

    text = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)  # the fields the sizing reads
    per_tok = 2 * 2 * 2 * text.head_dim * 2  # bf16
    # two waves of 4 rows: prompts (10, 10) then (20, 30); pad prompts shared per length
    got = plan_kv_bytes(text, 5, [10, 10, 20, 30], num_samples=2, guidance_scale=3.0, max_batch_size=4,
                        dtype=torch.bfloat16)
    assert got == max(2 * 10 + 1 * 10 + 8 * 4, 2 * 30 + 2 * 30 + 8 * 4) * per_tok
    no_cfg = plan_kv_bytes(text, 5, [10, 10, 20, 30], num_samples=2, guidance_scale=1.0, max_batch_size=4,
                           dtype=torch.bfloat16)
    assert no_cfg == max(2 * 10 + 4 * 4, 2 * 30 + 4 * 4) * per_tok
    with pytest.raises(ValueError, match="uncond_mode"):
        plan_kv_bytes(text, 5, [3], uncond_mode="none")


def test_cache_dtype_works_or_is_refused_at_construction(peaky):
    model, _ = peaky
    gen = torch.Generator().manual_seed(_fresh_seed())
    ids, mask = _ragged(gen, [9, 6])
    ref = Generator(model, max_batch_size=4, max_seq_len=40).generate(ids, mask, guidance_scale=3.0, greedy=True)
    low = Generator(model, max_batch_size=4, max_seq_len=40, cache_dtype=torch.bfloat16)
    got = low.generate(ids, mask, guidance_scale=3.0, greedy=True)
    assert low._k[0].dtype == torch.bfloat16 and got.shape == ref.shape
    # code 0 comes from the prefill's own attention (not the cache); later codes read the bf16
    # K/V and may drift after a near-tie, so only their range is checked here
    assert torch.equal(got[:, 0], ref[:, 0])
    assert bool(((got >= 0) & (got < model.config.codebook_size)).all())
    with pytest.raises(ValueError, match="cache_dtype"):
        Generator(model, cache_dtype=torch.int8)


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_batch_independent(peaky):
    model, _ = peaky
    gen = torch.Generator().manual_seed(_fresh_seed())
    ids, mask = _ragged(gen, [7, 11, 4])
    kw = dict(guidance_scale=3.0, temperature=1.3, top_k=20, top_p=0.9, num_samples=3)
    g = Generator(model, max_batch_size=9, max_seq_len=40)
    seeds = [int(s) for s in torch.randint(-2 ** 62, 2 ** 62, (3,), generator=gen)]
    a = g.generate(ids, mask, seed=seeds, **kw)
    assert torch.equal(a, g.generate(ids, mask, seed=seeds, **kw))
    assert not torch.equal(a, g.generate(ids, mask, seed=[s + 1 for s in seeds], **kw))
    # the samples of one prompt differ from each other
    assert not torch.equal(a[3], a[4]) and not torch.equal(a[4], a[5])
    # prompt 1 alone, or in a different batch split into waves, keeps its samples
    alone = g.generate(ids[1:2, -11:], seed=[seeds[1]], **kw)
    assert torch.equal(alone, a[3:6])
    g2 = Generator(model, max_batch_size=2, max_seq_len=40, uncond_mode="pad")
    assert torch.equal(g2.generate(ids[[2, 1]], mask[[2, 1]], seed=[seeds[2], seeds[1]], **kw),
                       torch.cat([a[6:9], a[3:6]]))
    # an int seed derives per-prompt request seeds: reproducible, prompts differ
    b = g.generate(ids, mask, seed=123, **kw)
    assert torch.equal(b, g.generate(ids, mask, seed=123, **kw))


def _filtered_probs(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The exact sampling law of ops.sample for one row of final logits (float64, independent code)."""
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    if 0 < top_k < len(x):
        keep = x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1:
        kept = np.where(keep, p, 0.0)
        order = np.sort(kept)[::-1]
        t = order[np.argmax(np.cumsum(order) >= top_p * kept.sum())]
        keep &= p >= t
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@torch.no_grad()
def test_first_token_frequencies_match_filtered_cfg_distribution(small):
    from scipy.stats import chisquare

    model = small
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = [SPECIAL.bos] + torch.randint(6, 300, (6,), generator=gen).tolist() + [SPECIAL.boi]
    s, temp, top_k, top_p, n = 2.0, 1.7, 12, 0.95, 3000
    c = model.image_head_logits(model.forward_train(model.embed_inputs(torch.tensor([ids])))[:, -1]).double()
    unc = [t if t in (SPECIAL.bos, SPECIAL.boi) else SPECIAL.pad for t in ids]
    u = model.image_head_logits(model.forward_train(model.embed_inputs(torch.tensor([unc])))[:, -1]).double()
    x = ((u + s * (c - u)) / temp)[0].numpy()
    probs = _filtered_probs(x, top_k, top_p)
    g = Generator(model, max_batch_size=n, max_seq_len=16)
    toks = g.generate([ids], num_samples=n, guidance_scale=s, temperature=temp, top_k=top_k, top_p=top_p,
                      seed=seed)[:, 0].numpy()
    assert probs[toks].min() > 0, f"seed={seed}: a filtered-out token was drawn"
    counts = np.bincount(toks, minlength=len(probs))
    support = probs > 0
    # merge rare bins so every expected count is >= 5 (chi-square validity)
    order = np.argsort(probs[support])
    obs, exp = counts[support][order], probs[support][order] * n
    o_b, e_b, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(obs, exp):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            o_b.append(acc_o), e_b.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e and o_b:
        o_b[-1] += acc_o
        e_b[-1] += acc_e
    assert len(o_b) >= 3, f"seed={seed}: degenerate distribution {probs}"
    p_value = chisquare(o_b, e_b).pvalue
    assert p_value > 1e-4, f"seed={seed}: chi-square p={p_value:.2e} obs={o_b} exp={e_b}"


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(peaky):
    model, _ = peaky
    g = Generator(model, max_batch_size=2, max_seq_len=24)
    ids = torch.tensor([[1, 7, 8, 3], [0, 1, 9, 3]])
    with pytest.raises(ValueError, match="left padding"):
        g.generate(ids, torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        g.generate([[1] + [7] * 20 + [3]])
    # a prompt past the model's context used to generate silently when max_seq_len allowed it
    wide = Generator(model, max_batch_size=1, max_seq_len=model.config.text.max_position_embeddings + 64)
    n = model.config.text.max_position_embeddings - model.num_image_tokens
    with pytest.raises(ValueError, match=rf"prompt 0: {n + 1} tokens \+ {model.num_image_tokens} image tokens exceed "
                                         r"the model's max_position_embeddings"):
        wide.generate([[1] + [7] * (n - 2) + [3, 3]])
    with pytest.raises(ValueError, match="pixel_values"):
        g.generate([[1] + [SPECIAL.image] * model.num_image_tokens + [3]])
    S = model.image_size
    with_image = [[1] + [SPECIAL.image] * model.num_image_tokens + [3]]
    # [0, 255] pixels used to condition silently on garbage
    with pytest.raises(ValueError, match=r"pixel_values must be normalised to \[-1, 1\].*\[0, 255\]"):
        g.generate(with_image, None, torch.linspace(0, 255, 3 * S * S).reshape(1, 3, S, S))
    with pytest.raises(ValueError, match="not a multiple"):
        g.generate([[1, SPECIAL.image, 3]])
    with pytest.raises(ValueError, match="one per prompt"):
        g.generate(ids, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        g.generate([[1, 10_000, 3]])
    with pytest.raises(ValueError, match="VQ code"):
        g.generate([[1, 999, 3]], gen_code_mask=[[False, True, False]])
    with pytest.raises(ValueError, match="empty"):
        g.generate([[]])
    with pytest.raises(ValueError, match="temperature"):
        g.generate(ids, temperature=0.0)
    with pytest.raises(ValueError, match="uncond_mode"):
        Generator(model, uncond_mode="blank")
    with pytest.raises(ValueError, match="max_seq_len"):
        Generator(model, max_seq_len=model.num_image_tokens)


def test_generate_images_decodes_each_row(peaky):
    model, _ = peaky
    g = Generator(model, max_batch_size=4, max_seq_len=32)
    prompts = [[1, 40, 41, 3], [1, 50, 3]]
    imgs = g.generate_images(prompts, num_samples=2, seed=[3, 4], top_k=8, decode_batch_size=3)
    assert imgs.dtype == torch.uint8 and imgs.shape == (4, model.image_size, model.image_size, 3)
    codes = g.generate(prompts, num_samples=2, seed=[3, 4], top_k=8)
    assert torch.equal(imgs, model.decode_images(codes))


def test_decode_loop_never_synchronises_with_the_host(peaky, monkeypatch):
    """Once decoding starts, no tensor is read back to Python (item/bool/int/tolist/numpy).
    (The Python loop; on CPU the C++ wave loop replaces it, see the next test. Its steps are
    the decode backend's: the C++ layer stack for a float32 CPU model.)"""
    model, _ = peaky
    monkeypatch.setattr(decode_cpu, "applies", lambda *a: False)
    g = Generator(model, max_batch_size=3, max_seq_len=32)  # 4 rows -> 2 waves
    trap = {"on": False, "calls": 0}
    real_step = g._backend.step

    def step(*args, **kwargs):
        trap["on"] = True
        trap["calls"] += 1
        return real_step(*args, **kwargs)


    real_wave = g._run_wave

    def wave(*args, **kwargs):  # host work between waves (next prefill) is allowed
        try:
            return real_wave(*args, **kwargs)
        finally:
            trap["on"] = False

    monkeypatch.setattr(g._backend, "step", step)
    monkeypatch.setattr(g, "_run_wave", wave)
    forbid_host_reads(monkeypatch, lambda: trap["on"], "inside the decode loop")
    try:
        out = g.generate([[1, 40, 41, 3], [1, 9, 3]], num_samples=2, top_k=5, top_p=0.9, seed=[1, 2])
        out_greedy = g.generate([[1, 40, 41, 3]], greedy=True)
    finally:
        trap["on"] = False
    assert trap["calls"] == 3 * (model.num_image_tokens - 1)
    assert out.shape == (4, model.num_image_tokens) and out_greedy.shape == (1, model.num_image_tokens)


def test_bad_arguments_name_the_argument(peaky):
    """Each of these used to fail deep in Python / torch (a message naming no argument) or to be
    read loosely (gen_code_mask 2 as "a code", return_logprobs="no" as true: a tuple came back)."""
    model, _ = peaky
    g = Generator(model, max_batch_size=2, max_seq_len=24)
    ok = [SPECIAL.bos, 7, SPECIAL.boi]
    with pytest.raises(TypeError, match=r"input_ids must be token ids .*got NoneType None"):
        g.generate(None)
    with pytest.raises(TypeError, match=r"input_ids must be token ids .*got int 5"):
        g.generate(5)
    with pytest.raises(ValueError, match=r"gen_code_mask: prompt 0, position 1 must be a bool \(or 0 / 1\), got 2"):
        g.generate([ok], gen_code_mask=[[0, 2, 0]])
    with pytest.raises(TypeError, match=r"gen_code_mask must be B lists of bools .*got str 'abc'"):
        g.generate([ok], gen_code_mask="abc")
    with pytest.raises(ValueError, match=r"gen_code_mask must hold only bools \(or 0 / 1\), got values \[2\]"):
        g.generate(torch.tensor([ok]), gen_code_mask=torch.tensor([[0, 2, 0]]))
    with pytest.raises(ValueError, match=r"gen_code_mask shape \(1, 2\) != input_ids shape \(1, 3\)"):
        g.generate(torch.tensor([ok]), gen_code_mask=[[False, False]])  # a list with a tensor: AttributeError before
    with pytest.raises(TypeError, match="return_logprobs must be a bool"):
        g.generate([ok], return_logprobs="no")
    with pytest.raises(ValueError, match="decode_batch_size must be an int >= 1, got 0"):
        g.generate_images([ok], decode_batch_size=0)
    for bad in (0, -1, 2.5, True, "2", None):
        with pytest.raises(ValueError, match=r"num_samples must be an int >= 1"):
            g.generate([ok], num_samples=bad)
    # what stays accepted: NumPy integers, 0 / 1 tensor masks, a list mask with a tensor input_ids
    kw = dict(guidance_scale=2.0, greedy=True)
    ref = g.generate([ok, ok], num_samples=2, **kw)
    assert torch.equal(g.generate([ok, ok], num_samples=np.int64(2), **kw), ref)
    assert torch.equal(g.generate(torch.tensor([ok]), gen_code_mask=[[0, 0, 0]], **kw), ref[:1])
    assert torch.equal(g.generate(torch.tensor([ok]), gen_code_mask=torch.zeros(1, 3, dtype=torch.long), **kw), ref[:1])


def test_output_too_large_to_allocate_names_num_samples(peaky):
    # 2**50 samples x T codes is petabytes: the output buffer cannot be allocated on any machine,
    # even with memory overcommit (past the address space); it used to raise the allocator's own
    # RuntimeError naming neither the argument nor the size
    from pgen_engine.generation import GenerationMemoryError
    from pgen_engine.errors import PgenUserError

    model, _ = peaky
    g = Generator(model, max_batch_size=2, max_seq_len=24)
    with pytest.raises(GenerationMemoryError, match=r"num_samples=1125899906842624 for 1 prompt\(s\) "
                                                    r"\(max_batch_size=2\) needs its output codes, .* GiB") as e:
        g.generate([[SPECIAL.bos, 7, SPECIAL.boi]], num_samples=2 ** 50)
    assert isinstance(e.value, PgenUserError) and e.value.nbytes == 2 ** 50 * model.num_image_tokens * 8
    # the Generator stays usable
    assert g.generate([[SPECIAL.bos, 7, SPECIAL.boi]], greedy=True).shape == (1, model.num_image_tokens)


def test_constructor_arguments_are_checked(peaky):
    # each used to fail later: an AttributeError on a str model, a sampler error at the first generate call
    model, _ = peaky
    with pytest.raises(TypeError, match="model must be a JanusModel .*got str"):
        Generator("model")
    with pytest.raises(ValueError, match=r"sample_backend must be one of \('auto', .*got 'bogus'"):
        Generator(model, sample_backend="bogus")
    with pytest.raises(ValueError, match=r"max_batch_size must be an int >= 1, got 2\.0"):
        Generator(model, max_batch_size=2.0)
    g = Generator(model, max_batch_size=np.int64(2), max_seq_len=np.int32(24))
    assert (g.max_batch_size, g.max_seq_len) == (2, 24) and type(g.max_seq_len) is int


def test_generate_on_a_meta_model_is_a_clear_error(tiny_ckpt):
    # kv_bytes is documented to work on meta; generate used to end in torch's NotImplementedError
    # about nonzero's meta kernel
    import pgen_engine as pg

    g = Generator(pg.load_model(tiny_ckpt, device="meta"), max_batch_size=2)
    assert g.kv_bytes([4], 2) > 0
    with pytest.raises(ValueError, match=r"model is on the meta device .*needs a model loaded on cpu or cuda"):
        g.generate([[1, 15, 16]], seed=0)


def test_dict_prompts_and_zero_samples_in_kv_bytes_are_refused(tiny_ckpt):
    # a dict was read as its keys ("prompt 0 is a string"); kv_bytes(num_samples=0) returned 0
    import pgen_engine as pg

    g = Generator(pg.load_model(tiny_ckpt), max_batch_size=2)
    with pytest.raises(TypeError, match=r"input_ids must be token ids .*got dict"):
        g.generate({"a": [1, 15, 3]}, seed=0)
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 1, got 0"):
        g.kv_bytes([4], 0)
    assert g.kv_bytes([4], 1) > 0
