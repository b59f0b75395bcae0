"""Personalized generation from real history images (pixels mode): parity with transformers'
Janus modules, greedy == teacher-forced oracle on ragged histories, seeding rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pgen_engine as pg
from pgen_engine.data.history import HistoryPrompter, batch_inputs
from pgen_engine.data.prompts import PromptBuilder
from pgen_engine.data.text_tokenizer import ByteTokenizer
from pgen_engine.generation import Generator
from pgen_engine.generation.personal import request_seed_for_id
from pgen_engine.models.tiny import make_tiny_checkpoint

SP = pg.SpecialTokens.builtin()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random JanusConfig checkpoint (16 image tokens, K=64), engine + transformers."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("personal") / "ckpt", seed=7, init_std=0.2, image_size=32,
                                patch_size=8, num_heads=4, num_kv_heads=2)
    from transformers import JanusForConditionalGeneration

    hf = JanusForConditionalGeneration.from_pretrained(path).eval()
    return pg.load_model(path), hf


def _prompter(model, *, titles: bool = True) -> HistoryPrompter:
    b = PromptBuilder(ByteTokenizer(SP), SP, model.num_image_tokens, mode="pixels", with_titles=titles,
                      instruction="next?")
    return HistoryPrompter(b, image_size=model.image_size)


def _history(rng: np.random.Generator, n: int, size: int = 40) -> list[tuple[np.ndarray, str]]:
    """n random RGB images (not the model's size: the prompter resizes) with short titles."""
    return [(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8), f"t{j}") for j in range(n)]


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(map(len, rows))
    ids = torch.tensor([[SP.pad] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _hf_embed_prompt(hf, ids, pixel_values):
    m = hf.model
    emb = hf.get_input_embeddings()(ids)
    feats = m.get_image_features(pixel_values).pooler_output.reshape(-1, emb.shape[-1])
    return emb.masked_scatter((ids == hf.config.image_token_id)[..., None], feats)


def _hf_image_logits(hf, ids, mask, pixel_values, image_tokens):
    """Teacher-forced generation-head logits [B, T, K] over transformers' own modules."""
    T = image_tokens.shape[1]
    x = torch.cat([_hf_embed_prompt(hf, ids, pixel_values),
                   hf.prepare_embeddings_for_image_generation(image_tokens[:, :T - 1])], 1)
    am = torch.cat([mask, mask.new_ones(mask.shape[0], T - 1)], 1)
    h = hf.model.language_model(inputs_embeds=x, attention_mask=am).last_hidden_state
    return hf.model.generation_head(h[:, ids.shape[1] - 1:])


def test_pixels_history_teacher_forced_logits_match_transformers(tiny):
    model, hf = tiny
    rng = np.random.default_rng(0)
    pr = _prompter(model)
    users = [pr.build(_history(rng, n)) for n in (1, 3, 2)]
    rows, _, px = batch_inputs(users)
    assert px.shape == (6, 3, model.image_size, model.image_size) and px.dtype == torch.float32
    ids, mask = _left_pad(rows)
    T = model.num_image_tokens
    targets = torch.randint(0, model.codebook_size, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _hf_image_logits(hf, ids, mask, px, targets)
        ours = model.image_logits(ids, targets, mask, px)
        # the trainer's log-prob path (RL policy_logprobs over the same pixels)
        from pgen_engine.training.rl import build_sequences, policy_logprobs

        seq_ids, cm, att = build_sequences(rows, None, targets, 1, SP.pad)
        lp, _ = policy_logprobs(model, seq_ids, cm, att, targets, 1.0, px)
    diff = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape == (3, T, model.codebook_size)
    assert diff <= 1e-4, f"max abs diff {diff}"
    ref_lp = torch.log_softmax(ref.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert (lp.double() - ref_lp).abs().max().item() <= 1e-4
    # the pixels matter: other images give other logits
    with torch.no_grad():
        other = model.image_logits(ids, targets, mask, torch.flip(px, dims=[0]))
    assert (other - ours).abs().max().item() > 1e-3


def _oracle_greedy(model, ids, mask, px, scale, T):
    """Greedy CFG by full teacher-forced re-forwards (no KV cache): the engine's own modules."""
    keep = (ids == SP.bos) | (ids == SP.boi)
    uncond = ids.masked_fill(~keep, SP.pad)
    toks = torch.zeros(ids.shape[0], 0, dtype=torch.long)
    for t in range(T):
        c = model.embed_inputs(ids, None, px)
        u = model.embed_inputs(uncond, None, None)
        if t:
            e = model.embed_image_codes(toks)
            c, u = torch.cat([c, e], 1), torch.cat([u, e], 1)
        am = torch.cat([mask, mask.new_ones(mask.shape[0], t)], 1)
        h = model.forward_train(torch.cat([c, u]), torch.cat([am, am]))[:, -1]
        lc, lu = model.image_head_logits(h).float().chunk(2)
        toks = torch.cat([toks, (lu + scale * (lc - lu)).argmax(-1, keepdim=True)], 1)
    return toks


@pytest.mark.parametrize("lens", [[1, 8, 4], [5, 2, 7, 3]])
def test_greedy_equals_teacher_forced_oracle_on_ragged_histories(tiny, lens):
    model, _ = tiny
    rng = np.random.default_rng(sum(lens))
    pr = _prompter(model)
    hists = [_history(rng, n) for n in lens]
    users = [pr.build(h) for h in hists]
    rows, _, px = batch_inputs(users)
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        ref = _oracle_greedy(model, ids, mask, px, 3.0, model.num_image_tokens)
    g = Generator(model, max_batch_size=len(lens), max_seq_len=ids.shape[1] + model.num_image_tokens)
    out = g.generate_for_users(hists, prompter=pr, guidance_scale=3.0, greedy=True)
    assert torch.equal(out, ref), f"{(out != ref).sum()} tokens differ"


def test_history_decides_images_and_batch_mates_do_not(tiny):
    model, _ = tiny
    rng = np.random.default_rng(3)
    pr = _prompter(model)
    a, b, c = _history(rng, 3), _history(rng, 3), _history(rng, 5)
    g = Generator(model, max_batch_size=8, max_seq_len=256)
    kw = dict(prompter=pr, num_samples=2, guidance_scale=2.0, seed=123)
    ab = g.generate_for_users([a, b], user_ids=["u", "u2"], **kw)
    # same seed and id, different history -> different images
    ba = g.generate_for_users([b], user_ids=["u"], **kw)
    assert not torch.equal(ab[:2], ba)
    # same history and id -> the same images, whatever else is in the batch and in what order
    alone = g.generate_for_users([a], user_ids=["u"], **kw)
    mixed = g.generate_for_users([c, b, a], user_ids=["x", "y", "u"], **kw)
    assert torch.equal(alone, ab[:2]) and torch.equal(mixed[4:6], alone)
    # explicit request seeds are used as given
    s = request_seed_for_id(123, "u")
    assert torch.equal(g.generate_for_users([a], seed=[s], prompter=pr, num_samples=2, guidance_scale=2.0), alone)


def test_generate_for_users_inputs(tiny, tmp_path):
    model, _ = tiny
    from PIL import Image

    pr = _prompter(model)
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    g = Generator(model, max_batch_size=2, max_seq_len=128)
    kw = dict(prompter=pr, greedy=True, guidance_scale=2.0)
    # a path, a PIL image and the array give the same prompt and images
    by_path = g.generate_for_users([[(str(tmp_path / "a.png"), "t0")]], **kw)
    by_pil = g.generate_for_users([[(Image.fromarray(arr), "t0")]], **kw)
    by_arr = g.generate_for_users([[(arr, "t0")]], **kw)
    assert torch.equal(by_path, by_pil) and torch.equal(by_pil, by_arr)
    imgs = g.generate_for_users([[(arr, "t0")]], return_images=True, **kw)
    assert imgs.shape == (1, model.image_size, model.image_size, 3) and imgs.dtype == torch.uint8
    with pytest.raises(ValueError, match="history 0: a history needs at least one item"):
        g.generate_for_users([[]], **kw)
    with pytest.raises(Exception, match="does not exist"):
        g.generate_for_users([[(str(tmp_path / "missing.png"), "t")]], **kw)


def test_image_embeds_equal_pixels_and_skip_the_vision_tower(tiny):
    """``generate(image_embeds=...)``: per-prompt aligned features give the same codes and
    log-probs as the pixels they came from, without one vision-tower call; bad ones are refused."""
    model, _ = tiny
    rng = np.random.default_rng(5)
    pr = _prompter(model)
    users = [pr.build(_history(rng, n)) for n in (2, 5, 1)]
    rows, _, px = batch_inputs(users)
    counts = [u.pixel_values.shape[0] for u in users]
    with torch.no_grad():
        embeds = list(model.vision_features(px).split(counts))
    g = Generator(model, max_batch_size=6, max_seq_len=max(map(len, rows)) + model.num_image_tokens)
    kw = dict(num_samples=2, guidance_scale=3.0, temperature=0.9, seed=[4, 5, 6], return_logprobs=True)
    a, lp_a = g.generate(rows, None, px, **kw)
    calls = []
    hook = model.vision_model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        b, lp_b = g.generate(rows, None, image_embeds=embeds, **kw)
        c = g.generate(rows, None, image_embeds=[e.double() for e in embeds], num_samples=2, guidance_scale=3.0,
                       temperature=0.9, seed=[4, 5, 6])  # any floating dtype: cast to the model's
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(a, b) and torch.equal(b, c)
    assert float((lp_a - lp_b).abs().max()) <= 1e-5
    bad = [
        (dict(image_embeds=embeds[:2]), "3 prompts"),
        (dict(image_embeds=[embeds[0], embeds[1][:4], embeds[2]]), r"image_embeds\[1\] must be \[n_img, T_img, H\]"),
        (dict(image_embeds=[embeds[0], None, embeds[2]]), r"image_embeds\[1\] is None"),
        (dict(image_embeds=[embeds[0], (embeds[1] * 100).long(), embeds[2]]), "floating"),
        (dict(image_embeds=[embeds[0], embeds[1][..., :-1], embeds[2]]), "hidden size"),
        (dict(image_embeds=torch.cat(embeds)), "sequence of 3 entries"),
    ]
    for extra, match in bad:
        with pytest.raises(ValueError, match=match):
            g.generate(rows, None, num_samples=1, **extra)
    with pytest.raises(ValueError, match="not both"):
        g.generate(rows, None, px, image_embeds=embeds)


def test_generate_for_users_takes_iterables_of_histories(tiny):
    # a generator of histories used to fail with "object of type 'generator' has no len()"
    model, _ = tiny
    rng = np.random.default_rng(5)
    hs = [_history(rng, 2), _history(rng, 1)]
    g = Generator(model, max_batch_size=2, max_seq_len=128)
    kw = dict(prompter=_prompter(model), greedy=True, guidance_scale=2.0)
    want = g.generate_for_users(hs, user_ids=["a", "b"], **kw)
    got = g.generate_for_users((h for h in hs), user_ids=iter(["a", "b"]), **kw)
    assert torch.equal(want, got)
    with pytest.raises(TypeError, match="histories is a list of histories"):
        g.generate_for_users("abc", **kw)
