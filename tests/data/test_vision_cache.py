"""Vision-tower feature cache (pixels history): once per (item, weights version), same numbers
as encoding the pixels, and the trainer paths give the same logits / log-probs with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pgen_engine as pg
from pgen_engine.data.dataset import load_dataset, load_image
from pgen_engine.data.history import CatalogueImages
from pgen_engine.data.prompts import normalize_pixels
from pgen_engine.data.vision_cache import (VisionCache, VisionFeatureCache, build_vision_cache, encode_items,
                                           vision_fingerprint)
from pgen_engine.models.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pgen_engine.data.synth import SynthConfig, generate_synthetic

    d = tmp_path_factory.mktemp("vc")
    ds = load_dataset(generate_synthetic(d / "ds", SynthConfig(num_users=4, num_items=10, seed=2)))
    model = pg.load_model(make_tiny_checkpoint(d / "ckpt", seed=1, init_std=0.1))
    return ds, model, d


def test_disk_cache_matches_encoding_and_is_reused(setup):
    ds, model, d = setup
    cache = build_vision_cache(ds, model, d / "vision", batch_size=3)
    ids = list(ds.items)
    imgs = torch.from_numpy(np.stack([load_image(ds.items[i].image_path, model.image_size) for i in ids]))
    with torch.no_grad():
        want = model.vision_hidden(normalize_pixels(imgs))
    got = cache.features(ids[::-1])
    assert got.shape == (len(ids), model.num_image_tokens, want.shape[-1])
    assert torch.equal(got, want.flip(0))  # batching does not change the numbers here (fp32, same ops)
    stamp = (cache.root / "features.bin").stat().st_mtime_ns
    again = build_vision_cache(ds, model, d / "vision")
    assert again.root == cache.root and (cache.root / "features.bin").stat().st_mtime_ns == stamp
    with pytest.raises(Exception, match="not of"):
        VisionCache.open(cache.root, "0" * 16)
    with pytest.raises(KeyError, match="nope"):
        cache.features(["nope"])
    # another tower -> another key
    other = pg.load_model(make_tiny_checkpoint(d / "ckpt2", seed=2, init_std=0.1))
    assert vision_fingerprint(other.vision_model) != cache.fingerprint
    # cached features give the same prompt embedding as the pixels (aligner applied in the model)
    ids_t = torch.tensor([[1] + [model.config.image_token_id] * model.num_image_tokens + [3]])
    with torch.no_grad():
        a = model.embed_inputs(ids_t, None, normalize_pixels(imgs[:1]))
        b = model.embed_inputs(ids_t, None, image_features=cache.features(ids[:1]))
    assert torch.allclose(a, b, atol=1e-6, rtol=0)



def test_disk_cache_of_other_images_with_the_same_ids_is_rebuilt(setup, tmp_path):
    # used to serve the first dataset's features for a second one with the same item ids
    from pgen_engine.data.synth import SynthConfig, generate_synthetic

    ds, model, _ = setup
    build_vision_cache(ds, model, tmp_path / "vision")
    other = load_dataset(generate_synthetic(tmp_path / "other", SynthConfig(num_users=4, num_items=10, seed=3)))
    ids = list(other.items)
    assert ids == list(ds.items)
    imgs = torch.from_numpy(np.stack([load_image(other.items[i].image_path, model.image_size) for i in ids]))
    with torch.no_grad():
        want = model.vision_hidden(normalize_pixels(imgs))
    assert torch.equal(build_vision_cache(other, model, tmp_path / "vision").features(ids), want)

def test_memory_cache_encodes_each_item_once_per_version(setup):
    ds, model, _ = setup
    imgs = CatalogueImages(ds, model.image_size)
    version = [0]
    fc = VisionFeatureCache(model, imgs.batch, version=lambda: version[0])
    ids = list(ds.items)
    f1 = fc.features([ids[0], ids[1], ids[0], ids[0]])
    assert fc.encoded == 2 and torch.equal(f1[0], f1[2])
    fc.features(ids[:2])
    assert fc.encoded == 2  # same version: nothing re-encoded
    version[0] += 1  # a trainable tower stepped: features are recomputed
    fc.features(ids[:2])
    assert fc.encoded == 4
    assert torch.equal(fc.features(ids[:1]), encode_items(model, imgs.batch(ids[:1])))


def test_trainer_logprobs_with_cached_features_equal_pixels(setup):
    ds, model, d = setup
    from pgen_engine.training.sequences import build_sequences, policy_logprobs

    cache = build_vision_cache(ds, model, d / "vision")
    ids = list(ds.items)
    T = model.num_image_tokens
    img = model.config.image_token_id
    prompts = [[1] + [2, img] + [img] * (T - 1) + [4, 3], [1] + ([2] + [img] * T + [4]) * 2 + [3]]
    hist = [ids[:1], ids[2:4]]
    px = [normalize_pixels(CatalogueImages(ds, model.image_size).batch(h)) for h in hist]
    ft = [cache.features(h) for h in hist]
    toks = torch.randint(0, model.codebook_size, (4, T), generator=torch.Generator().manual_seed(0))
    by_pixels = build_sequences(prompts, None, toks, 2, 0, pixel_values=px)
    by_features = build_sequences(prompts, None, toks, 2, 0, pixel_values=px, image_features=ft)
    sl, dev = slice(0, 4), torch.device("cpu")
    assert by_pixels.history(sl, dev)[1] is None and by_features.history(sl, dev)[0] is None
    with torch.no_grad():
        a, _ = policy_logprobs(model, *by_pixels.rows(sl, dev), toks, 1.0, *by_pixels.history(sl, dev))
        b, _ = policy_logprobs(model, *by_features.rows(sl, dev), toks, 1.0, *by_features.history(sl, dev))
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_is_what_a_half_model_consumes(setup, dtype):
    """A bf16 / fp16 run stores its features in that dtype: half the bytes of float32, and the
    same numbers the model's aligner gets from float32 features (embed_inputs casts them first)."""
    ds, model, d = setup
    ids = list(ds.items)
    f32 = build_vision_cache(ds, model, d / "vision")
    stamp = (f32.root / "features.bin").stat().st_mtime_ns
    half = build_vision_cache(ds, model, d / f"vision_{dtype}", dtype=dtype)
    assert half.fingerprint == f32.fingerprint and half.dtype == dtype and f32.dtype == torch.float32
    assert (half.root / "features.bin").stat().st_size * 2 == (f32.root / "features.bin").stat().st_size
    got = half.features(ids[::-1])
    assert got.dtype == dtype and torch.equal(got, f32.features(ids[::-1]).to(dtype))
    m_half = pg.load_model(d / "ckpt", dtype=dtype)
    ids_t = torch.tensor([[1] + [model.config.image_token_id] * model.num_image_tokens + [3]])
    with torch.no_grad():
        a = m_half.embed_inputs(ids_t, None, image_features=f32.features(ids[:1]))
        b = m_half.embed_inputs(ids_t, None, image_features=half.features(ids[:1]))
    assert torch.equal(a, b)
    # reopened as written; a float32 request rebuilds nothing of the float32 cache, a dtype change rebuilds
    assert VisionCache.open(half.root, half.fingerprint).dtype == dtype
    assert build_vision_cache(ds, model, d / "vision").dtype == torch.float32
    assert (f32.root / "features.bin").stat().st_mtime_ns == stamp
    rebuilt = build_vision_cache(ds, model, d / f"vision_{dtype}", dtype=torch.float32)
    assert rebuilt.dtype == torch.float32 and torch.equal(rebuilt.features(ids), f32.features(ids))
    with pytest.raises(ValueError, match="dtype"):
        build_vision_cache(ds, model, d / "bad", dtype=torch.int8)


@pytest.mark.parametrize("damage", ["features_missing", "index_is_a_list", "index_without_dim", "features_truncated"])
def test_damaged_disk_cache_is_rebuilt_and_refused_by_open(setup, tmp_path, damage):
    # a missing features.bin was an OSError (not rebuilt), an index.json holding a list an
    # AttributeError and one without "dim" a KeyError traceback from the data preparation
    import json

    from pgen_engine.data.dataset import DataError

    ds, model, _ = setup
    want = build_vision_cache(ds, model, tmp_path / "vision").features(list(ds.items))
    root = next((tmp_path / "vision").iterdir())
    if damage == "features_missing":
        (root / "features.bin").unlink()
    elif damage == "index_is_a_list":
        (root / "index.json").write_text("[1, 2]")
    elif damage == "index_without_dim":
        idx = json.loads((root / "index.json").read_text())
        del idx["dim"]
        (root / "index.json").write_text(json.dumps(idx))
    else:
        with open(root / "features.bin", "r+b") as f:
            f.truncate(10)
    with pytest.raises(DataError, match=str(root)):
        VisionCache.open(root, root.name.removeprefix("vision_"))
    assert torch.equal(build_vision_cache(ds, model, tmp_path / "vision").features(list(ds.items)), want)


def test_full_disk_while_creating_features_names_the_file_and_keeps_the_old_cache(setup, tmp_path, monkeypatch):
    # features.bin was created sparse through numpy's memmap: a full disk gave an error naming no
    # file, and a disk filling up while features were written through the map would be a SIGBUS
    import errno
    import os

    ds, model, _ = setup
    good = build_vision_cache(ds, model, tmp_path / "vision", batch_size=5)
    before = {f.name: f.read_bytes() for f in good.root.iterdir()}

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    other = pg.load_model(make_tiny_checkpoint(tmp_path / "ckpt2", seed=2, init_std=0.1))
    with pytest.raises(OSError, match=r"No space left on device: .*features\.bin"):
        build_vision_cache(ds, other, tmp_path / "vision", batch_size=5)
    assert {f.name: f.read_bytes() for f in good.root.iterdir()} == before
    assert not [p for p in (tmp_path / "vision").iterdir() if p.name.startswith(".")]  # no staging folder left
    monkeypatch.undo()
    again = build_vision_cache(ds, other, tmp_path / "vision", batch_size=5)
    f = again.root / "features.bin"
    assert f.stat().st_blocks * 512 >= f.stat().st_size  # the blocks are reserved, not sparse
