"""The learned reward embedder: trained on train-split co-consumption, hashed, distinct from the evaluator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgen_engine.eval.evaluator import EvaluatorConfig, train_evaluator
from pgen_engine.rewards.cocons import (CoConsumptionEmbedder, RewardEmbedderConfig, reward_config_from_spec,
                                        train_reward_embedder)
from pgen_engine.rewards.embedders import make_embedder

SMALL = dict(steps=40, batch_size=32, width=8, dim=16, window=2)


def _toy(n_groups=4, per=6, seed=0):
    """Items of n_groups colours; users consume items of one colour group in a row."""
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, 255, size=(n_groups, 3))
    imgs, group = [], []
    for g in range(n_groups):
        for _ in range(per):
            im = np.full((32, 32, 3), cols[g], dtype=np.uint8)
            im[rng.integers(0, 24):, rng.integers(0, 24):] = rng.integers(0, 255, 3)
            imgs.append(im)
            group.append(g)
    group = np.array(group)
    seqs = [list(rng.choice(np.nonzero(group == (u % n_groups))[0], size=6)) for u in range(60)]
    return torch.from_numpy(np.stack(imgs)), seqs, group


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("remb")
    imgs, seqs, group = _toy()
    emb = train_reward_embedder(imgs, seqs, d / "r", RewardEmbedderConfig(**SMALL))
    return d / "r", emb, imgs, seqs, group


def test_shape_norm_learns_co_consumption_and_deterministic(trained):
    path, emb, imgs, seqs, group = trained
    e = emb.embed(imgs)
    assert e.shape == (len(imgs), 16) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(imgs)), atol=1e-5)
    sims = e @ e.T
    same = torch.from_numpy(group[:, None] == group[None, :])
    off = ~torch.eye(len(imgs), dtype=torch.bool)
    assert sims[same & off].mean() > sims[~same].mean() + 0.1
    assert torch.equal(emb.embed(imgs), e)  # eval mode: no dropout / batch-norm updates
    # training twice from scratch gives the same network (seeded)
    again = train_reward_embedder(imgs, seqs, path.parent / "again", RewardEmbedderConfig(**SMALL))
    assert torch.allclose(again.embed(imgs), e, atol=1e-5)


def test_artifact_hash_reuse_and_make_embedder(trained):
    path, emb, imgs, seqs, _ = trained
    meta = json.loads((path / "reward_embedder.json").read_text())
    assert meta["kind"] == "pgen_reward_embedder" and len(meta["data_hash"]) == 64
    assert meta["config"]["seed"] == 1 and meta["config"]["metadata_frac"] == 0.0
    assert 0 <= meta["sanity"]["recall@10"] <= 1
    assert train_reward_embedder(imgs, seqs, path, RewardEmbedderConfig(**SMALL)).meta["data_hash"] == meta["data_hash"]
    other = train_reward_embedder(imgs, seqs[:-1], path.parent / "other", RewardEmbedderConfig(**SMALL))
    assert other.meta["data_hash"] != meta["data_hash"]
    loaded = make_embedder({"type": "cocons_cnn", "path": str(path), **SMALL})
    assert isinstance(loaded, CoConsumptionEmbedder)
    assert torch.allclose(loaded.embed(imgs), emb.embed(imgs), atol=1e-6)
    with pytest.raises(ValueError, match="trained with"):
        make_embedder({"type": "cocons_cnn", "path": str(path), **{**SMALL, "steps": 41}})


def test_refuses_bad_artifacts_and_fields(trained, tmp_path):
    path, _, imgs, seqs, _ = trained
    with pytest.raises(ValueError, match="missing required field 'path'"):
        make_embedder({"type": "cocons_cnn"})
    with pytest.raises(FileNotFoundError, match="reward_embedder.json"):
        CoConsumptionEmbedder.load(tmp_path)
    (tmp_path / "reward_embedder.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed reward-embedder metadata"):
        CoConsumptionEmbedder.load(tmp_path)
    with pytest.raises(ValueError, match="unknown field"):
        reward_config_from_spec({"type": "cocons_cnn", "colour": 3})
    # the evaluator artifact is refused both as a reward embedder and as a training folder
    ev_cfg = EvaluatorConfig(steps=2, batch_size=8, image_size=32, width=4, dim=8, metadata_frac=0.0)
    train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", ev_cfg)
    with pytest.raises(ValueError, match="evaluation embedder"):
        CoConsumptionEmbedder.load(tmp_path / "ev")
    with pytest.raises(ValueError, match="evaluation embedder"):
        make_embedder({"type": "cocons_cnn", "path": str(tmp_path / "ev")})
    with pytest.raises(ValueError, match="evaluation embedder"):
        train_reward_embedder(imgs, seqs, tmp_path / "ev", RewardEmbedderConfig(**SMALL))


def test_reward_config_instance_frac_defaults_off_and_is_a_float_field():
    assert RewardEmbedderConfig().instance_frac == 0.0 and RewardEmbedderConfig().metadata_frac == 0.0
    cfg = reward_config_from_spec({"type": "cocons_cnn", "instance_frac": "0.5", "steps": "10"})
    assert cfg.instance_frac == 0.5 and cfg.steps == 10 and isinstance(cfg.steps, int)
    with pytest.raises(ValueError, match="instance_frac"):
        RewardEmbedderConfig(instance_frac=1.0)


def test_metadata_pairs_are_opt_in_read_named_fields_and_refuse_missing_metadata(trained, tmp_path):
    path, emb, imgs, seqs, group = trained
    cfg = reward_config_from_spec({"type": "cocons_cnn", "metadata_frac": "0.5", "metadata_field": "tint,size",
                                   **SMALL})
    assert cfg.metadata_frac == 0.5 and cfg.metadata_field == "tint,size"
    with pytest.raises(ValueError, match="metadata_field must be a non-empty string"):
        RewardEmbedderConfig(metadata_field=" ")
    with pytest.raises(ValueError, match="needs one metadata dict per catalogue item"):
        train_reward_embedder(imgs, seqs, tmp_path / "a", cfg)
    with pytest.raises(ValueError, match="no two train-split items share"):
        train_reward_embedder(imgs, seqs, tmp_path / "b", cfg, item_meta=[{"genres": "x"}] * len(imgs))
    # co-consumption within a colour group is noise here; the metadata names the group
    noise = [list(np.random.default_rng(u).choice(len(imgs), size=6)) for u in range(60)]
    meta = [{"tint": f"g{g}", "size": "s"} for g in group]
    with_meta = train_reward_embedder(imgs, noise, tmp_path / "m", cfg, item_meta=meta)
    art = json.loads((tmp_path / "m" / "reward_embedder.json").read_text())
    assert art["metadata_groups"] == 5 and art["config"]["metadata_field"] == "tint,size"
    e = with_meta.embed(imgs)
    same = torch.from_numpy(group[:, None] == group[None, :]) & ~torch.eye(len(imgs), dtype=torch.bool)
    diff = torch.from_numpy(group[:, None] != group[None, :])
    assert (e @ e.T)[same].mean() > (e @ e.T)[diff].mean() + 0.1
    # without metadata pairs the artifact ignores item metadata: same hash as the metadata-free run
    plain = RewardEmbedderConfig(**SMALL)
    train_reward_embedder(imgs, seqs, tmp_path / "p", plain, item_meta=meta)
    assert json.loads((tmp_path / "p" / "reward_embedder.json").read_text())["data_hash"] == \
        json.loads((path / "reward_embedder.json").read_text())["data_hash"]


def test_spec_field_of_the_wrong_type_is_named():
    # was int()'s bare "invalid literal for int() with base 10: 'abc'"
    from pgen_engine.rewards.cocons import RewardEmbedderConfig

    with pytest.raises(ValueError, match=r"reward embedder: steps must be an int, got 'abc'"):
        RewardEmbedderConfig(steps="abc")
    with pytest.raises(ValueError, match=r"reward embedder: lr must be a number, got None"):
        RewardEmbedderConfig(lr=None)
    assert RewardEmbedderConfig(steps=40, lr="0.001").steps == 40


@pytest.mark.parametrize("field", [{"steps": 0}, {"image_size": 8}, {"tau": 0.0}, {"instance_frac": 0.99,
                                                                              "metadata_frac": 0.5}])
def test_config_errors_name_the_reward_embedder_not_the_evaluator(field):
    with pytest.raises(ValueError, match=r"^reward embedder: ") as e:
        RewardEmbedderConfig(**field)
    assert "evaluator" not in str(e.value)
