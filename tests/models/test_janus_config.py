"""Config validation names the offending field."""
from __future__ import annotations

import copy
import json

import pytest

from pgen_engine.models.janus_config import CheckpointError, JanusModelConfig


@pytest.fixture()
def raw(tiny_ckpt):
    return json.loads((tiny_ckpt / "config.json").read_text())


def test_parses_tiny(raw):
    c = JanusModelConfig.from_dict(raw)
    assert c.num_image_tokens == 16 and c.text.num_kv_heads == 2 and c.text.head_dim == 16


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.__setitem__("model_type", "chameleon"), "model_type"),
    (lambda r: r.pop("vq_config"), "vq_config"),
    (lambda r: r["text_config"].__setitem__("num_key_value_heads", 3), "num_key_value_heads"),
    (lambda r: r["text_config"].pop("vocab_size"), "vocab_size"),
    (lambda r: r["text_config"].__setitem__("hidden_size", "big"), "hidden_size"),
    (lambda r: r["text_config"].__setitem__("rope_parameters", {"rope_type": "yarn", "rope_theta": 1.0}), "rope_type"),
    (lambda r: r["vision_config"].__setitem__("num_image_tokens", 7), "num_image_tokens"),
    (lambda r: r["vq_config"].__setitem__("image_token_embed_dim", 5), "image_token_embed_dim"),
])
def test_rejects_bad_fields(raw, mutate, match):
    r = copy.deepcopy(raw)
    mutate(r)
    with pytest.raises(CheckpointError, match=match):
        JanusModelConfig.from_dict(r)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        JanusModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("section,key,value,match", [
    # each used to be silently truncated / replaced by a default, or reported without the field
    ("text_config", "hidden_size", 64.7, r"text_config\.hidden_size=64\.7 is not a valid int"),
    ("text_config", "num_key_value_heads", 0, r"text_config\.num_key_value_heads=0 must be a positive integer"),
    ("text_config", "num_key_value_heads", "abc", r"text_config\.num_key_value_heads='abc' is not a valid int"),
    ("text_config", "rms_norm_eps", "tiny", r"text_config\.rms_norm_eps='tiny' is not a valid float"),
    ("text_config", "max_position_embeddings", True, r"text_config\.max_position_embeddings=True is not a valid int"),
    ("text_config", "rope_parameters", {"rope_type": "default", "rope_theta": "abc"},
     r"text_config\.rope_parameters\.rope_theta='abc' is not a valid float"),
    ("vision_config", "num_image_tokens", "x", r"vision_config\.num_image_tokens='x' is not a valid int"),
    ("vision_config", "patch_size", 0, r"vision_config\.patch_size=0 must be a positive integer"),  # ZeroDivisionError
])
def test_optional_fields_are_checked_and_named(raw, section, key, value, match):
    r = copy.deepcopy(raw)
    r[section][key] = value
    with pytest.raises(CheckpointError, match=match):
        JanusModelConfig.from_dict(r, source="c.json")
    r[section][key] = 64.0 if key == "hidden_size" else raw[section].get(key)  # an integral float is fine
    if key == "hidden_size":
        assert JanusModelConfig.from_dict(r).text.hidden_size == 64


@pytest.mark.parametrize("key,value,match", [
    # each loaded, and generation then failed with "the activations overflow" of finite weights
    ("rms_norm_eps", -1.0, r"text_config\.rms_norm_eps=-1\.0 must be a finite number > 0"),
    ("rms_norm_eps", float("nan"), r"text_config\.rms_norm_eps=nan must be a finite number > 0"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -5.0},
     r"text_config\.rope_theta=-5\.0 must be a finite number > 0"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 0.0},
     r"text_config\.rope_parameters\.factor=0\.0 must be a finite number > 0"),
])
def test_numeric_fields_out_of_range_are_refused(raw, key, value, match):
    r = copy.deepcopy(raw)
    r["text_config"].pop("rope_scaling", None)
    r["text_config"][key] = value
    with pytest.raises(CheckpointError, match=rf"^c\.json: {match}$"):
        JanusModelConfig.from_dict(r, source="c.json")
    r["text_config"][key] = {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0} if key == "rope_parameters" \
        else 1e-5
    c = JanusModelConfig.from_dict(r)
    assert (c.text.rope_theta, c.text.rope_scaling_factor) == (500.0, 2.0) if key == "rope_parameters" \
        else c.text.rms_norm_eps == 1e-5


def test_vq_grid_other_than_the_vision_grid_is_refused(raw):
    # a VQ that downsamples 32 px by 2 (16x16 codes) under a 32/8 vision grid (4x4 = T 16) used to
    # load: generation made 16 codes, the VQ encoded history images to 256 and decoded 16 codes
    # to an 8x8-px image, all without an error
    r = copy.deepcopy(raw)
    assert (r["vision_config"]["image_size"], r["vision_config"]["patch_size"]) == (32, 8)
    r["vq_config"]["channel_multiplier"] = [1, 1]
    with pytest.raises(CheckpointError, match=r"^c\.json: the VQ model's code grid is 16x16 .* vision_config gives 4x4 "
                                              r"image tokens \(image_size/patch_size=32/8\)"):
        JanusModelConfig.from_dict(r, source="c.json")
    r["vq_config"]["channel_multiplier"] = [1, 2, 2, 4]  # /8: 4x4, the same grid
    assert JanusModelConfig.from_dict(r).num_image_tokens == 16
    r["vq_config"].pop("channel_multiplier")  # transformers' default (1, 1, 2, 2, 4): /16 -> 2x2
    with pytest.raises(CheckpointError, match="code grid is 2x2"):
        JanusModelConfig.from_dict(r)
    r["vq_config"]["channel_multiplier"] = 4
    with pytest.raises(CheckpointError, match=r"vq_config\.channel_multiplier=4 must be a non-empty list"):
        JanusModelConfig.from_dict(r)


def test_odd_head_dim_is_refused_at_load(raw):
    # used to load, then fail at the first forward inside apply_rotary ("with even D, got (1, 4, 4, 5)")
    r = copy.deepcopy(raw)
    r["text_config"]["head_dim"] = 5
    with pytest.raises(CheckpointError, match=r"^c\.json: text_config\.head_dim=5 must be even \(rotary embeddings "
                                              r"rotate pairs of dimensions\)$"):
        JanusModelConfig.from_dict(r, source="c.json")
    r["text_config"].pop("head_dim")
    r["text_config"]["hidden_size"], r["text_config"]["num_attention_heads"] = 60, 4  # 15 per head
    r["text_config"]["num_key_value_heads"] = 2
    with pytest.raises(CheckpointError, match=r"head_dim=15 must be even .*; it is hidden_size/num_attention_heads=60/4$"):
        JanusModelConfig.from_dict(r, source="c.json")
