"""Image embedders: shapes, normalisation, determinism, strict local loading, factory errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgen_engine.rewards.embedders import (
    PixelStatsEmbedder,
    VisionTowerEmbedder,
    load_vision_tower,
    make_embedder,
)

VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=24, patch_size=8, intermediate_size=48)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=99)


def _images(n: int, h: int = 19, w: int = 23, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


def _solid(colors, h=17, w=13) -> torch.Tensor:
    out = torch.zeros(len(colors), h, w, 3, dtype=torch.uint8)
    for i, c in enumerate(colors):
        out[i] = torch.tensor(c, dtype=torch.uint8)
    return out


# ------------------------------------------------------------------- pixel stats
def test_pixel_stats_shape_norm_and_batching():
    emb = PixelStatsEmbedder(grid=3, bins=4, batch_size=2)
    imgs = _images(5)
    e = emb.embed(imgs)
    assert e.shape == (5, 3 * 9 + 64) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    # batching must not change results; numpy input gives the same answer
    torch.testing.assert_close(e, PixelStatsEmbedder(grid=3, bins=4, batch_size=100).embed(imgs.numpy()))
    torch.testing.assert_close(e[2:3], emb.embed(imgs[2:3]))
    assert emb.embed(imgs[:0]).shape == (0, emb.dim)


def test_pixel_stats_histogram_counts_exact():
    # two colours, each filling half the image: the histogram block holds exactly two equal entries
    img = torch.zeros(1, 8, 10, 3, dtype=torch.uint8)
    img[0, :4] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    img[0, 4:] = torch.tensor([0, 0, 200], dtype=torch.uint8)
    emb = PixelStatsEmbedder(grid=2, bins=4)
    hist = emb.embed(img)[0, 3 * 4 :]
    nz = hist.nonzero().flatten().tolist()
    red, blue = (3 * 4 + 0) * 4 + 0, (0 * 4 + 0) * 4 + 3
    assert sorted(nz) == sorted([red, blue])
    torch.testing.assert_close(hist[red], hist[blue])


def test_pixel_stats_similarity_is_meaningful():
    emb = PixelStatsEmbedder()
    base = _solid([(200, 30, 30)])[0]
    near = base.clone()
    near[:3, :3] = torch.tensor([190, 40, 20], dtype=torch.uint8)
    far = _solid([(20, 30, 210)])[0]
    e = emb.embed(torch.stack([base, near, far]))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    assert float(e[0] @ e[0]) == pytest.approx(1.0, abs=1e-5)


def test_pixel_stats_rejects_bad_input():
    emb = PixelStatsEmbedder(grid=4)
    with pytest.raises(TypeError, match="uint8"):
        emb.embed(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        emb.embed(torch.zeros(2, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="smaller than grid"):
        emb.embed(torch.zeros(1, 3, 9, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bins"):
        PixelStatsEmbedder(bins=0)


# ------------------------------------------------------------------- vision towers
def _save_clip(path, full: bool):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    if full:
        m = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16))
    else:
        m = CLIPVisionModel(CLIPVisionConfig(**VISION))
    m.save_pretrained(path)
    return m.eval()


def _save_siglip(path, full: bool):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    m = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)) if full else SiglipVisionModel(SiglipVisionConfig(**VISION))
    m.save_pretrained(path)
    return m.eval()


def _reference_pixels(imgs: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = imgs.permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("full", [True, False])
def test_clip_local_matches_transformers(tmp_path, full):
    ref = _save_clip(tmp_path / "clip", full)
    emb = VisionTowerEmbedder.from_pretrained_local(tmp_path / "clip")
    imgs = _images(3, 30, 27)
    e = emb.embed(imgs)
    pix = _reference_pixels(imgs, 24, emb._mean.flatten().tolist(), emb._std.flatten().tolist())
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pix) if full else ref(pixel_values=pix).pooler_output
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert e.shape == (3, 16 if full else 32)
    torch.testing.assert_close(e, torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=1e-4)
    # no preprocessor_config.json: the OpenAI CLIP constants apply
    assert emb._mean.flatten()[0].item() == pytest.approx(0.48145466)


@pytest.mark.parametrize("full", [True, False])
def test_siglip_local_matches_transformers_and_reads_preprocessor(tmp_path, full):
    ref = _save_siglip(tmp_path / "sig", full)
    (tmp_path / "sig" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.3, 0.2, 0.25]}))
    emb = make_embedder({"type": "siglip", "path": str(tmp_path / "sig"), "batch_size": 2})
    imgs = _images(5, 24, 24)
    e = emb.embed(imgs)
    pix = _reference_pixels(imgs, 24, [0.4, 0.5, 0.6], [0.3, 0.2, 0.25])
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pix) if full else ref(pixel_values=pix).pooler_output
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    torch.testing.assert_close(e, torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=1e-4)


def test_janus_vision_tower_loads_from_full_checkpoint_and_mean_pools(tiny_ckpt, tiny_hf):
    emb = VisionTowerEmbedder.from_pretrained_local(tiny_ckpt)
    imgs = _images(2, 32, 32)
    e = emb.embed(imgs)
    pix = _reference_pixels(imgs, emb.image_size, [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        hidden = tiny_hf.model.vision_model(pixel_values=pix).last_hidden_state
    torch.testing.assert_close(e, torch.nn.functional.normalize(hidden.mean(1), dim=-1), atol=1e-5, rtol=1e-4)
    # the same tower passed in as a module ("model_vision") gives the same embedding
    wrapped = make_embedder({"type": "model_vision", "image_size": emb.image_size, "pool": "mean"}, vision_model=tiny_hf.model.vision_model)
    torch.testing.assert_close(wrapped.embed(imgs), e, atol=1e-5, rtol=1e-4)
    assert wrapped.dim == e.shape[1]


def test_vision_only_checkpoint_prefix_variants_and_shards_load_identically(tmp_path):
    """Vision-only CLIP saved flat, with the older ``vision_model.`` prefix, and sharded: same embeddings."""
    from safetensors.torch import load_file, save_file

    ref = _save_clip(tmp_path / "flat", full=False)
    imgs = _images(2, 24, 24)
    want = VisionTowerEmbedder.from_pretrained_local(tmp_path / "flat").embed(imgs)
    sd = load_file(tmp_path / "flat" / "model.safetensors")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "flat" / "config.json").read_text())
    save_file({(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in sd.items()}, old / "model.safetensors")
    torch.testing.assert_close(VisionTowerEmbedder.from_pretrained_local(old).embed(imgs), want)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(VisionTowerEmbedder.from_pretrained_local(tmp_path / "sharded").embed(imgs), want)


def test_local_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        VisionTowerEmbedder.from_pretrained_local(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vision_tower(tmp_path / "empty")
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_vision_tower(tmp_path / "bert")
    # a CLIP config whose weights are missing one tensor must not load silently
    _save_clip(tmp_path / "clip", full=False)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "clip" / "model.safetensors")
    sd.pop(next(k for k in sd if k.endswith("post_layernorm.weight")))
    save_file(sd, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(ValueError, match="incomplete"):
        load_vision_tower(tmp_path / "clip")
    (tmp_path / "clip" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_vision_tower(tmp_path / "clip")


def test_make_embedder_errors():
    assert isinstance(make_embedder({"type": "pixel_stats", "grid": 2}), PixelStatsEmbedder)
    with pytest.raises(ValueError, match="unknown type"):
        make_embedder({"type": "dino"})
    with pytest.raises(ValueError, match="unknown field"):
        make_embedder({"type": "pixel_stats", "gird": 2})
    with pytest.raises(ValueError, match="'path'"):
        make_embedder({"type": "clip"})
    with pytest.raises(ValueError, match="vision_model"):
        make_embedder({"type": "model_vision", "image_size": 32})
    with pytest.raises(ValueError, match="pool"):
        VisionTowerEmbedder(torch.nn.Linear(2, 2), 8, pool="cls")
    with pytest.raises(ValueError, match="std"):
        VisionTowerEmbedder(torch.nn.Linear(2, 2), 8, std=(0.5, 0.0, 0.5))


def test_pixel_stats_similarity_tracks_shared_synthetic_attributes():
    """On synthetic posters, items sharing more attributes are closer (what the CPU demo relies on)."""
    synth = pytest.importorskip("pgen_engine.data.synth")
    vals = synth.attribute_values()
    names = synth.attribute_names()
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
    combos = [tuple(int(rng.integers(len(vals[n]))) for n in names) for _ in range(30)]
    imgs = torch.from_numpy(np.stack([synth.render_item(c, 32, rng) for c in combos]))
    e = PixelStatsEmbedder().embed(imgs)
    sims = e @ e.T
    attrs = torch.tensor(combos)
    shared = (attrs[:, None, :] == attrs[None, :, :]).sum(-1)
    off = ~torch.eye(len(combos), dtype=torch.bool)
    means = [float(sims[(shared == k) & off].mean()) for k in range(len(names)) if bool(((shared == k) & off).any())]
    assert len(means) >= 3
    assert all(a < b for a, b in zip(means, means[1:])), means


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_make_embedder_refuses_a_bad_batch_size(bad):
    # batch_size 0 used to build fine and fail at the first embed with "range() arg 3 must not be zero"
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        make_embedder({"type": "pixel_stats", "batch_size": bad})
