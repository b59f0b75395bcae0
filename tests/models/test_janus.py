"""Parity of the engine's Janus model with ``transformers`` (the oracle) on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch
from transformers import JanusForConditionalGeneration

import pgen_engine as pg
from pgen_engine.models.tiny import make_tiny_checkpoint

GEOMETRIES = {
    "gqa-2l": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    "mqa-odd-3l": dict(hidden_size=72, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=100),
    "mha-headdim-4l": dict(hidden_size=48, num_layers=4, num_heads=6, num_kv_heads=3, head_dim=12,
                           intermediate_size=70, vocab_size=333),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def pair(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", seed=7, **GEOMETRIES[request.param])
    return pg.load_model(path), JanusForConditionalGeneration.from_pretrained(path).eval()


def _ragged_batch(vocab: int, B: int = 3, S: int = 14, pad_lens=(0, 5, 9)):
    ids = torch.randint(6, vocab, (B, S))
    ids[:, -1] = 3  # begin-of-image
    mask = torch.ones(B, S, dtype=torch.long)
    for b, p in enumerate(pad_lens[:B]):
        mask[b, :p] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def test_text_logits_match_transformers_left_padded(pair):
    model, hf = pair
    ids, mask, pos = _ragged_batch(model.config.text.vocab_size)
    ours = model.text_logits(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert ours.shape == ref.shape == (*ids.shape, model.config.text.vocab_size)
    diff = (ours - ref)[mask.bool()].abs().max().item()
    assert diff <= TOL, diff


def test_text_logits_match_without_mask(pair):
    model, hf = pair
    ids = torch.randint(6, model.config.text.vocab_size, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (model.text_logits(ids) - ref).abs().max().item() <= TOL


def test_text_logits_with_history_images(pair):
    model, hf = pair
    T = model.num_image_tokens
    ids = torch.randint(6, model.config.text.vocab_size, (2, 2 * T + 10))
    ids[:, 2:2 + T] = model.config.image_token_id
    ids[:, 4 + T:4 + 2 * T] = model.config.image_token_id
    ids[:, -1] = 3
    pv = torch.randn(4, 3, model.image_size, model.image_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
    ours = model.text_logits(ids, pixel_values=pv)
    assert (ours - ref).abs().max().item() <= TOL


def test_image_logits_teacher_forced_match(pair):
    model, hf = pair
    ids, mask, pos = _ragged_batch(model.config.text.vocab_size)
    B, S = ids.shape
    T = model.num_image_tokens
    codes = torch.randint(0, model.codebook_size, (B, T))
    ours = model.image_logits(ids, codes, mask)
    with torch.no_grad():
        emb = torch.cat([hf.get_input_embeddings()(ids), hf.prepare_embeddings_for_image_generation(codes[:, :-1])], 1)
        m2 = torch.cat([mask, torch.ones(B, T - 1, dtype=torch.long)], 1)
        p2 = (m2.cumsum(-1) - 1).masked_fill(m2 == 0, 1)
        h = hf.model.language_model(inputs_embeds=emb, attention_mask=m2, position_ids=p2).last_hidden_state
        ref = hf.model.generation_head(h[:, S - 1:])
    assert ours.shape == (B, T, model.codebook_size)
    assert (ours - ref).abs().max().item() <= TOL


def test_decode_images_matches_vq_decode(pair):
    model, hf = pair
    codes = torch.randint(0, model.codebook_size, (3, model.num_image_tokens))
    img = model.decode_images(codes)
    with torch.no_grad():
        ref = hf.decode_image_tokens(codes)
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert img.dtype == torch.uint8 and img.shape == (3, model.image_size, model.image_size, 3)
    assert (img.int() - ref_u8.int()).abs().max().item() <= 1


def test_prefill_then_decode_equals_full_forward(tiny_model):
    """The cached path (prefill + decode_step, paged with a shuffled block table) equals forward_train."""
    m = tiny_model
    B, S, steps, bs = 2, 7, 5, 4
    ids, mask, _ = _ragged_batch(m.config.text.vocab_size, B=B, S=S, pad_lens=(0, 3))
    codes = torch.randint(0, m.codebook_size, (B, steps))
    full_emb = torch.cat([m.embed_inputs(ids), m.embed_image_codes(codes)], 1)
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = m.forward_train(full_emb, full_mask)
    nb_per_row = (S + steps + bs - 1) // bs
    perm = torch.randperm(B * nb_per_row)
    block_table = perm.view(B, nb_per_row).int()
    cache = m.allocate_cache(B * nb_per_row, bs)
    lens = mask.sum(1)
    # compact per-row slots: the prompt's real tokens take positions 0..len-1
    slot = torch.full((B, S), -1, dtype=torch.long)
    for b in range(B):
        p = torch.arange(int(lens[b]))
        slot[b, S - int(lens[b]):] = block_table[b, p // bs].long() * bs + p % bs
    with torch.no_grad():
        h = m.prefill(m.embed_inputs(ids), mask, cache, slot)
        assert (h[mask.bool()] - ref[:, :S][mask.bool()]).abs().max() <= 1e-5
        for t in range(steps):
            pos = lens + t
            s = block_table[torch.arange(B), pos // bs].long() * bs + pos % bs
            hd = m.decode_step(m.embed_image_codes(codes[:, t]), pos, cache, s, (pos + 1).int(), block_table)
            assert (hd - ref[:, S + t]).abs().max() <= 1e-5


def test_embed_inputs_rejects_placeholder_mismatch(tiny_model):
    m = tiny_model
    ids = torch.randint(6, 100, (1, 10))
    ids[0, :3] = m.config.image_token_id
    with pytest.raises(ValueError, match="placeholder"):
        m.embed_inputs(ids, pixel_values=torch.randn(1, 3, m.image_size, m.image_size))


def test_decode_images_rejects_bad_codes(tiny_model):
    with pytest.raises(ValueError):
        tiny_model.decode_images(torch.zeros(1, tiny_model.num_image_tokens + 1, dtype=torch.long))
    with pytest.raises(ValueError):
        tiny_model.decode_images(torch.full((1, tiny_model.num_image_tokens), tiny_model.codebook_size))


def test_gen_code_mask_uses_generation_embedding(tiny_model):
    m = tiny_model
    ids = torch.tensor([[1, 7, 8, 3, 5, 6]])
    mask = torch.tensor([[False, False, False, False, True, True]])
    x = m.embed_inputs(ids, gen_code_mask=mask)
    assert torch.equal(x[0, :4], m.language_model.embed_tokens(ids[0, :4]))
    assert torch.allclose(x[0, 4:], m.embed_image_codes(ids[0, 4:]))


def test_decode_images_refuses_codes_that_are_not_integers(tiny_model):
    # a float tensor used to fail deep in the VQ embedding ("Expected tensor for argument #1 'indices'")
    model = tiny_model
    with pytest.raises(TypeError, match="image_tokens must be an integer tensor of VQ codes, got torch.float32"):
        model.decode_images(torch.zeros(1, model.num_image_tokens))
    with pytest.raises(TypeError, match=r"image_tokens must be an integer \[N,\d+\] tensor, got list"):
        model.decode_images([[0] * model.num_image_tokens])
    codes = torch.randint(0, model.codebook_size, (2, model.num_image_tokens))
    assert torch.equal(model.decode_images(codes.int()), model.decode_images(codes))


def test_text_and_image_logits_name_bad_arguments(tiny_model):
    # each used to fail inside torch: "'str' object has no attribute 'ndim'", "index out of range in
    # self", "Sizes of tensors must match except in dimension 1"
    m, V, K = tiny_model, tiny_model.config.text.vocab_size, tiny_model.codebook_size
    ids = torch.tensor([[1, 20, 3]])
    codes = torch.zeros(1, m.num_image_tokens, dtype=torch.long)
    with pytest.raises(TypeError, match=r"input_ids must be a non-empty integer \[B,S\] tensor, got str"):
        m.text_logits("hi")
    with pytest.raises(TypeError, match=r"input_ids must be .* got torch\.float32 \(1, 3\)"):
        m.text_logits(ids.float())
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0,{V}\), got values in \[1,{V}\]"):
        m.text_logits(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor shaped like input_ids \(1, 3\), got \(1, 2\)"):
        m.text_logits(ids, torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"image_tokens has 2 rows, input_ids 1"):
        m.image_logits(ids, codes.repeat(2, 1))
    with pytest.raises(ValueError, match=rf"image_tokens must lie in \[0,{K}\)"):
        m.image_logits(ids, codes + K)
    assert m.text_logits(ids).shape == (1, 3, V) and m.image_logits(ids, codes).shape == (1, m.num_image_tokens, K)


def test_one_code_per_image_encodes_and_decodes_a_lone_image(tmp_path):
    """A 1 x 1 code grid: torch's group_norm refuses a batch of one there, transformers fails too."""
    from pgen_engine.models.image_tokenizer import VQImageTokenizer

    ckpt = make_tiny_checkpoint(tmp_path / "g1", seed=3, image_size=8, patch_size=8)
    m = pg.load_model(ckpt)
    hf = JanusForConditionalGeneration.from_pretrained(ckpt).eval()
    assert m.num_image_tokens == 1
    codes = torch.tensor([[5], [17], [40]])
    with torch.no_grad():
        ref = hf.model.vqmodel.decode(codes)  # three images: torch accepts the batch
    batch = m.decode_images(codes)
    assert torch.equal(batch, pg.models.janus.pixels_to_uint8(ref.permute(0, 2, 3, 1)))
    for i in range(3):
        assert torch.equal(m.decode_images(codes[i:i + 1]), batch[i:i + 1])
    # batch_size 2 over 3 images leaves a lone image in the last chunk
    tok = VQImageTokenizer(m, batch_size=2)
    imgs = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    enc = tok.encode(imgs)
    assert torch.equal(enc, VQImageTokenizer(m, batch_size=3).encode(imgs))
    assert torch.equal(tok.decode(enc), VQImageTokenizer(m, batch_size=3).decode(enc))
