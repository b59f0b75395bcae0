import numpy as np
import pytest
import torch

from pgen_engine.data.dataset import load_dataset, load_image
from pgen_engine.data.prompts import (IGNORE_INDEX, PromptBuilder, SFTCollator, SFTDataset, TrainingSample,
                                      build_sft_loader, normalize_pixels, unconditional)
from pgen_engine.data.splits import build_splits
from pgen_engine.data.text_tokenizer import ByteTokenizer
from pgen_engine.data.token_cache import build_token_cache
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

SP = ByteTokenizer().special


def _builder(T, **kw):
    return PromptBuilder(ByteTokenizer(), SP, T, **kw)


def test_codes_prompt_format():
    T = 5
    hc = torch.randint(0, 50, (3, T))
    b = _builder(T, with_titles=True, instruction="go")
    p = b.build(hc, ["a", "bc", ""])
    ids = p.input_ids.tolist()
    assert ids[0] == SP.bos and ids[-1] == SP.boi
    assert ByteTokenizer().decode(ids[1:]).startswith("User: go\na\n")
    assert p.gen_code_mask.sum() == 3 * T
    assert torch.equal(p.input_ids[p.gen_code_mask], hc.flatten())
    text_ids = p.input_ids[~p.gen_code_mask].tolist()  # codes may equal special ids numerically
    assert text_ids.count(SP.eoi) == 3 and text_ids.count(SP.boi) == 4
    assert ByteTokenizer().decode(text_ids).endswith("Assistant:")


def test_vision_prompt_and_pixels():
    b = _builder(4, mode="pixels")
    p = b.build(num_history=2)
    assert p.num_vision_images == 2 and (p.input_ids == SP.image).sum() == 8 and not p.gen_code_mask.any()
    x = torch.randint(0, 256, (2, 7, 5, 3), dtype=torch.uint8)
    px = normalize_pixels(x)
    assert px.shape == (2, 3, 7, 5) and px.min() >= -1 and px.max() <= 1
    assert torch.allclose(px[1, 2, 3, 4], (x[1, 3, 4, 2].float() / 255 - 0.5) / 0.5)
    with pytest.raises(ValueError):
        b.build(torch.zeros(1, 4, dtype=torch.long))


def test_unconditional():
    p = _builder(3).build(torch.randint(0, 9, (2, 3)))
    u = unconditional(p, SP, "pad")
    assert len(u) == len(p) and u.input_ids[0] == SP.bos and u.input_ids[-1] == SP.boi
    # every history item's <boi> survives (transformers' Janus rule); all else, codes included, is pad
    keep = ((p.input_ids == SP.bos) | (p.input_ids == SP.boi)) & ~p.gen_code_mask
    assert torch.equal(u.input_ids == SP.pad, ~keep) and not u.gen_code_mask.any()
    assert int((u.input_ids == SP.boi).sum()) == 3  # 2 history images + the final boi
    assert unconditional(p, SP, "short").input_ids.tolist() == [SP.bos, SP.boi]
    with pytest.raises(ValueError):
        unconditional(p, SP, "zero")


def test_collator_left_pad_and_shift():
    T = 4
    b = _builder(T)
    samples = [TrainingSample(b.build(torch.randint(0, 30, (n, T))), torch.randint(0, 30, (T,))) for n in (1, 3, 2)]
    batch = SFTCollator(SP)(samples)
    L = max(len(s.prompt) + T for s in samples)
    assert batch["input_ids"].shape == (3, L)
    for r, s in enumerate(samples):
        S = len(s.prompt)
        pad = L - S - T
        row = batch["input_ids"][r]
        assert (row[:pad] == SP.pad).all() and not batch["attention_mask"][r, :pad].any()
        assert torch.equal(row[-T:], s.target) and torch.equal(row[pad:pad + S], s.prompt.input_ids)
        lm = batch["loss_mask"][r]
        assert lm.sum() == T and not lm[-1] and lm[pad + S - 1] and row[pad + S - 1] == SP.boi
        # position i predicts token i+1: labels are exactly the targets
        assert torch.equal(batch["labels"][r][lm], s.target)
        assert (batch["labels"][r][~lm] == IGNORE_INDEX).all()
        assert batch["gen_code_mask"][r, -T:].all()
        assert batch["gen_code_mask"][r].sum() == T + s.prompt.gen_code_mask.sum()
        assert batch["position_ids"][r, pad] == 0 and batch["position_ids"][r, -1] == S + T - 1


def test_cond_dropout_all_and_vision_pixels():
    T = 3
    b = _builder(T, mode="pixels")
    s = [TrainingSample(b.build(num_history=n), torch.arange(T), torch.zeros(n, 3, 8, 8)) for n in (1, 2)]
    out = SFTCollator(SP)(s)
    assert out["pixel_values"].shape == (3, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = SFTCollator(SP, cond_dropout_p=1.0, generator=g)(s)
    assert "pixel_values" not in out and (out["input_ids"] == SP.image).sum() == 0
    assert out["loss_mask"].sum() == 2 * T
    with pytest.raises(ValueError):
        SFTCollator(SP)([TrainingSample(b.build(num_history=1), torch.arange(T), None)])


@pytest.fixture(scope="module")
def sft_setup(synth_dir, tmp_path_factory):
    ds = load_dataset(synth_dir)
    imgs = torch.from_numpy(np.stack([load_image(it.image_path, 32) for it in list(ds.items.values())[:10]]))
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=8, codebook_size=16, iters=2, seed=0)
    cache = build_token_cache(ds, tok, tmp_path_factory.mktemp("c") / "c", progress=False)
    sp = build_splits(ds, k=3)
    titles = {i: it.title for i, it in ds.items.items()}
    return ds, cache, sp, titles


def _all_batches(loader):
    return [b["input_ids"] for b in loader]


def test_loader_deterministic_resumable_sharded(sft_setup):
    ds, cache, sp, titles = sft_setup
    data = SFTDataset(sp.train, cache, _builder(16, with_titles=True), titles=titles)
    full = _all_batches(build_sft_loader(data, SP, batch_size=3, seed=4, cond_dropout_p=0.3))
    again = _all_batches(build_sft_loader(data, SP, batch_size=3, seed=4, cond_dropout_p=0.3))
    assert len(full) == len(data) // 3 and all(torch.equal(a, b) for a, b in zip(full, again))
    other = _all_batches(build_sft_loader(data, SP, batch_size=3, seed=5))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(full, other))
    # resume from position 4 gives the remaining batches identically (dropout included)
    resumed = _all_batches(build_sft_loader(data, SP, batch_size=3, seed=4, position=4, cond_dropout_p=0.3))
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed)) and len(resumed) == len(full) - 4
    loader = build_sft_loader(data, SP, batch_size=3, seed=4)
    it = iter(loader)
    next(it), next(it)
    assert loader.batch_sampler.state_dict() == {"epoch": 0, "position": 2}
    # shards are disjoint and of equal length
    seen = []
    for r in range(2):
        smp = build_sft_loader(data, SP, batch_size=2, seed=1, rank=r, world_size=2).batch_sampler
        seen.append([i for b in smp for (_, i) in b])
    assert len(seen[0]) == len(seen[1]) and not set(seen[0]) & set(seen[1])
    with pytest.raises(ValueError):
        build_sft_loader(data, SP, batch_size=2, rank=2, world_size=2)


def test_vision_dataset(sft_setup):
    ds, cache, sp, titles = sft_setup
    data = SFTDataset(sp.valid[:4], cache, _builder(16, mode="pixels"),
                      image_loader=lambda i: load_image(ds.items[i].image_path, 32))
    batch = SFTCollator(SP)([data[j] for j in range(4)])
    n_img = sum(len(e.history) for e in sp.valid[:4])
    assert batch["pixel_values"].shape == (n_img, 3, 32, 32)
    assert (batch["input_ids"] == SP.image).sum() == 16 * n_img


def test_uncond_pad_rule_matches_transformers_janus():
    """Every bos/boi kept (also each history item's boi), everything else — codes included — padded."""
    from pgen_engine.data.prompts import uncond_pad_ids
    from pgen_engine.models.special_tokens import SpecialTokens

    sp = SpecialTokens.builtin()
    ids = torch.tensor([sp.bos, 40, 41, sp.boi, sp.boi, 7, sp.eoi, 50, sp.boi])
    codes = torch.tensor([False, False, False, False, False, True, False, False, False])
    codes[4] = True  # a VQ code whose value equals boi is still a code
    out = uncond_pad_ids(ids, codes, sp)
    assert out.tolist() == [sp.bos, sp.pad, sp.pad, sp.boi, sp.pad, sp.pad, sp.pad, sp.pad, sp.boi]
