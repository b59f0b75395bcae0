from __future__ import annotations

import json

from pgen_engine.models.special_tokens import SpecialTokens


def test_builtin_round_trip_through_checkpoint(tiny_ckpt):
    assert SpecialTokens.from_checkpoint(tiny_ckpt) == SpecialTokens.builtin()


def test_janus_pro_defaults_when_generation_config_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 102400}, "image_token_id": 100581}))
    assert SpecialTokens.from_checkpoint(tmp_path) == SpecialTokens.janus_pro()


def test_generation_config_overrides(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 400}, "image_token_id": 9}))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 11, "pad_token_id": 12, "generation_kwargs": {"boi_token_id": 13}}))
    s = SpecialTokens.from_checkpoint(tmp_path)
    assert (s.bos, s.pad, s.boi, s.image) == (11, 12, 13, 9)
