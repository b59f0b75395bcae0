"""data.history_mode resolution (config default, trained mode of a checkpoint, mismatch errors)
and the HistoryPrompter's prompts in both modes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pgen_engine as pg
from pgen_engine.config import ConfigError, RunConfig, config_from_dict
from pgen_engine.data.history import HistoryPrompter
from pgen_engine.data.history_mode import (HistoryModeError, check_history_mode, default_history_mode, run_history_mode,
                                           trained_history_mode)
from pgen_engine.data.prompts import PromptBuilder
from pgen_engine.data.text_tokenizer import ByteTokenizer

SP = pg.SpecialTokens.builtin()


def _ckpt(d, vision: bool = True):
    d.mkdir(parents=True)
    cfg = {"vision_config": {"num_hidden_layers": 1}} if vision else {}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_defaults_and_trained_mode(tmp_path):
    assert RunConfig().data.history_mode == "pixels"  # the tiny init model has a vision tower
    assert default_history_mode(_ckpt(tmp_path / "hub")) == "pixels"
    assert default_history_mode(_ckpt(tmp_path / "novis", vision=False)) == "codes"
    # a checkpoint of a pgen run: its run config fixes the mode
    final = _ckpt(tmp_path / "run" / "final")
    (tmp_path / "run" / "config.resolved.yaml").write_text("data:\n  history_mode: codes\n")
    assert trained_history_mode(final)[0] == "codes"
    cfg = config_from_dict({"model": {"checkpoint": str(final)}})
    assert cfg.data.history_mode == "codes"
    assert run_history_mode("codes", final) == "codes"
    with pytest.raises(HistoryModeError, match="trained with data.history_mode='codes'.*'pixels'"):
        run_history_mode("pixels", final)
    # a run config written before the setting existed trained with codes
    (tmp_path / "run" / "config.resolved.yaml").write_text("data:\n  with_titles: true\n")
    assert trained_history_mode(final)[0] == "codes"
    (tmp_path / "run" / "config.resolved.yaml").write_text("data:\n  history_mode: vision\n")
    with pytest.raises(ConfigError, match="history_mode"):
        config_from_dict({"model": {"checkpoint": str(final)}})
    # a foreign checkpoint takes the requested mode, a missing one resolves later
    assert run_history_mode("codes", tmp_path / "hub") == "codes"
    assert config_from_dict({"model": {"checkpoint": str(tmp_path / "nowhere")}}).data.history_mode is None
    with pytest.raises(ConfigError, match="data.history_mode"):
        config_from_dict({"data": {"history_mode": "vision"}})
    assert check_history_mode("pixels", None, where="x") == "pixels"



def test_the_checkpoints_training_record_fixes_the_mode(tmp_path):
    # a pgen export records its history mode (pgen_training.json): it holds without the run
    # folder, and a run config edited to the other mode is refused instead of running wrongly
    final = _ckpt(tmp_path / "run" / "final")  # has a vision tower: the default would be pixels
    (final / "pgen_training.json").write_text(json.dumps({"stage": "sft", "history_mode": "codes"}))
    mode, where = trained_history_mode(final)
    assert mode == "codes" and where.endswith("pgen_training.json")
    assert run_history_mode(None, final) == "codes"
    with pytest.raises(HistoryModeError, match="'pixels'"):
        run_history_mode("pixels", final)
    cfg = tmp_path / "run" / "config.resolved.yaml"
    cfg.write_text("data:\n  history_mode: codes\n")
    assert trained_history_mode(final)[0] == "codes"  # agreeing run config
    cfg.write_text("data:\n  history_mode: pixels\n")  # edited by hand
    with pytest.raises(HistoryModeError, match=r"config\.resolved\.yaml: data\.history_mode='pixels', but the "
                       r"checkpoint records .*'codes'"):
        trained_history_mode(final)
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  history_mode: pixels\n")
    with pytest.raises(HistoryModeError, match="point --run-config at the run"):
        trained_history_mode(final, other)
    (final / "pgen_training.json").write_text("{not json")
    with pytest.raises(ValueError, match="pgen_training.json: unreadable training record"):
        trained_history_mode(final)
    (final / "pgen_training.json").write_text(json.dumps({"history_mode": "vision"}))
    with pytest.raises(HistoryModeError, match="history_mode='vision'"):
        trained_history_mode(final)


def test_unreadable_run_config_is_one_line_naming_the_file(tmp_path):
    # a YAML error used to carry PyYAML's multi-line excerpt, a non-UTF-8 file a bare UnicodeDecodeError
    final = _ckpt(tmp_path / "run" / "final")
    cfg = tmp_path / "run" / "config.resolved.yaml"
    cfg.write_text("stage: sft\ndata: [\n")
    with pytest.raises(ValueError, match=r"config\.resolved\.yaml: line 3 unreadable run config \(invalid YAML") as e:
        trained_history_mode(final)
    assert "\n" not in str(e.value)
    cfg.write_bytes(b"data: caf\xe9\n")
    with pytest.raises(ValueError, match=r"config\.resolved\.yaml: unreadable run config \(not UTF-8 text"):
        trained_history_mode(final)

class _Tok:
    """A stand-in image tokenizer: codes = mean intensity of each of 4 quadrants // 64."""

    image_size = 8
    num_tokens = 4

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(-1)
        q = torch.stack([x[:, :4, :4], x[:, :4, 4:], x[:, 4:, :4], x[:, 4:, 4:]], 1).flatten(2).mean(-1)
        return (q // 64).long()


def test_prompter_builds_both_modes_from_the_same_history():
    rng = np.random.default_rng(0)
    hist = [(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "A"), (rng.integers(0, 256, (9, 9, 3),
                                                                                     dtype=np.uint8), "B")]
    px = HistoryPrompter(PromptBuilder(ByteTokenizer(SP), SP, 4, mode="pixels", with_titles=True), image_size=16)
    a = px.build(hist)
    assert a.num_items == 2 and a.pixel_values.shape == (2, 3, 16, 16)
    assert a.input_ids.count(SP.image) == 8 and not any(a.gen_code_mask) and a.input_ids[-1] == SP.boi
    cd = HistoryPrompter(PromptBuilder(ByteTokenizer(SP), SP, 4, mode="codes", with_titles=True),
                         image_tokenizer=_Tok())
    b = cd.build(hist)
    assert b.pixel_values is None and sum(b.gen_code_mask) == 8 and SP.image not in b.input_ids
    # same template: the two prompts differ only in the image slots
    assert len(a.input_ids) == len(b.input_ids)
    assert [x for x, m in zip(b.input_ids, b.gen_code_mask) if not m] == \
        [x for x in a.input_ids if x != SP.image]
    # extra text goes after the history, before "Assistant:"
    c = px.build(hist, extra="more")
    assert len(c.input_ids) == len(a.input_ids) + len("more\n")
    with pytest.raises(ValueError, match="at least one item"):
        px.build([])
    # a bare path used to be read as a history of its characters ("a: image file does not exist")
    with pytest.raises(ValueError, match="a history is a sequence of \\(image, title\\) items, got the single path"):
        px.build("posters/1.jpg")
    with pytest.raises(ValueError, match="uint8"):
        px.build([(np.zeros((4, 4), dtype=np.uint8), "x")])
