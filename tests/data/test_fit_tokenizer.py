"""fit_tokenizer's cache key: the VQ training recipe is part of it, so a changed recipe retrains."""
from __future__ import annotations

import functools

import pytest

from pgen_engine.data import fit_tokenizer as ft
from pgen_engine.data.dataset import load_dataset
from pgen_engine.data.synth import SynthConfig, generate_synthetic
from pgen_engine.models.vq_train import VQTrainConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, SynthConfig(num_users=12, num_items=24, image_size=32, seed=0))
    return load_dataset(root)


def _key(dataset, settings):
    fit, held = ft.split_items(dataset, settings.held_out)
    return ft._fit_key(dataset, fit, held, settings)


def test_vq_key_covers_the_training_recipe(dataset, monkeypatch):
    s = ft.TokenizerFitSettings(kind="vq", image_size=16, codes_per_side=4, codebook=16)
    before = _key(dataset, s)
    assert _key(dataset, s) == before  # deterministic
    monkeypatch.setattr(ft, "VQTrainConfig", functools.partial(VQTrainConfig, crop_frac=0.5))
    assert ft._vq_train_config(s).crop_frac == 0.5
    assert _key(dataset, s) != before


def test_patch_kmeans_key_ignores_the_vq_recipe(dataset, monkeypatch):
    s = ft.TokenizerFitSettings(kind="patch_kmeans", image_size=16, codes_per_side=4, codebook=16)
    before = _key(dataset, s)
    monkeypatch.setattr(ft, "VQTrainConfig", functools.partial(VQTrainConfig, crop_frac=0.5))
    assert _key(dataset, s) == before


def test_settings_reach_the_vq_recipe():
    s = ft.TokenizerFitSettings(kind="vq", image_size=32, codes_per_side=4, codebook=64, batch_size=3,
                                time_budget_s=5.0, max_steps=7, seed=2)
    cfg = ft._vq_train_config(s)
    assert (cfg.image_size, cfg.codes_per_side, cfg.codebook_size, cfg.batch_size, cfg.time_budget_s,
            cfg.max_steps, cfg.seed) == (32, 4, 64, 3, 5.0, 7, 2)


def test_a_tokenizer_path_that_cannot_be_written_is_refused_before_fitting(dataset, tmp_path, monkeypatch):
    # the fit ran first and its result was lost when the save failed (a VQ fit: up to its 13 min budget)
    fitted = []
    monkeypatch.setattr(ft, "load_images", lambda *a, **k: fitted.append(1))
    s = ft.TokenizerFitSettings(kind="patch_kmeans", image_size=16, codes_per_side=4, codebook=16)
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt/tok\.safetensors: cannot be written: its folder .*notes\.txt "
                                         r"exists and is not a folder; nothing was fitted"):
        ft.fit_tokenizer(dataset, f / "tok.safetensors", s, progress=False, log=lambda m: None)
    monkeypatch.setattr(ft.os, "access", lambda p, mode: False)  # a read-only folder (tests may run as root)
    with pytest.raises(ValueError, match=r"tok\.safetensors: cannot be written: its folder .* is not writable"):
        ft.fit_tokenizer(dataset, tmp_path / "tok.safetensors", s, progress=False, log=lambda m: None)
    assert fitted == [] and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
