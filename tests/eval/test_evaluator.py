"""The independent evaluation embedder: trains on co-consumption, is hashed, refused by rewards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgen_engine.eval.evaluator import (EvalEmbedder, EvaluatorConfig, co_consumption_pairs, data_hash, is_evaluator_artifact,
                                        metadata_groups, metadata_values, recall_at_k, train_evaluator)


def _toy(n_groups=4, per=6, seed=0):
    """Items of n_groups colours; users consume items of one colour group in a row."""
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, 255, size=(n_groups, 3))
    imgs, group = [], []
    for g in range(n_groups):
        for _ in range(per):
            im = np.full((32, 32, 3), cols[g], dtype=np.uint8)
            im[rng.integers(0, 24):, rng.integers(0, 24):] = rng.integers(0, 255, 3)  # item-specific patch
            imgs.append(im)
            group.append(g)
    group = np.array(group)
    seqs = [list(rng.choice(np.nonzero(group == (u % n_groups))[0], size=6)) for u in range(60)]
    return torch.from_numpy(np.stack(imgs)), seqs, group


def test_pairs_groups_and_recall_hand_values():
    assert co_consumption_pairs([[0, 1, 2], [3, 3]], 1).tolist() == [[0, 1], [1, 2]]
    assert co_consumption_pairs([[0, 1, 2]], 2).tolist() == [[0, 1], [0, 2], [1, 2]]
    g = metadata_groups([{"genres": ["a", "b"]}, {"genres": ["a"]}, {"genres": "b"}, {}], "genres", {0, 1, 2})
    assert sorted(map(sorted, g)) == [[0, 1], [0, 2]]
    e = torch.eye(3)
    e[1] = torch.tensor([0.9, 0.1, 0.0])
    assert recall_at_k(e, np.array([[0, 1], [0, 2]]), k=1) == 0.5


def test_several_metadata_fields_group_by_field_and_value():
    meta = [{"shape": "x", "colour": "red"}, {"shape": "red", "colour": "blue"}, {"shape": "x", "colour": "blue"},
            {"colour": ["red", 3]}]
    # "red" as a shape and "red" as a colour are different values; non-strings are ignored
    assert metadata_values(meta[1], "shape, colour") == ["shape=red", "colour=blue"]
    assert metadata_values(meta[3], "shape,colour") == ["colour=red"]
    assert metadata_values(meta[1], "shape") == ["red"]  # one field: the bare value, as before
    g = metadata_groups(meta, "shape,colour", {0, 1, 2, 3})
    assert sorted(map(sorted, g)) == [[0, 2], [0, 3], [1, 2]]
    # the data hash reads every named field: a change in the second field changes it
    imgs, seqs = torch.zeros(4, 32, 32, 3, dtype=torch.uint8), [[0, 1, 2, 3]]
    cfg = EvaluatorConfig(metadata_field="shape,colour")
    other = [dict(m) for m in meta]
    other[0]["colour"] = "green"
    assert data_hash(imgs, seqs, meta, cfg) != data_hash(imgs, seqs, other, cfg)
    # ... and one field hashes only that field
    one = EvaluatorConfig(metadata_field="shape")
    assert data_hash(imgs, seqs, meta, one) == data_hash(imgs, seqs, other, one)


def test_train_save_load_hash_and_reward_refusal(tmp_path):
    imgs, seqs, group = _toy()
    cfg = EvaluatorConfig(steps=40, batch_size=32, image_size=32, width=8, dim=16, metadata_frac=0.0)
    ev = train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", cfg)
    meta = json.loads((tmp_path / "ev" / "evaluator.json").read_text())
    assert meta["kind"] == "pgen_eval_embedder" and len(meta["data_hash"]) == 64
    assert 0 <= meta["sanity"]["recall@10"] <= 1 and meta["sanity"]["heldout_users"] == 6
    # co-consumed items (same colour group) end up closer than other items
    e = ev.embed(imgs)
    sims = e @ e.T
    same = torch.from_numpy(group[:, None] == group[None, :])
    off = ~torch.eye(len(imgs), dtype=torch.bool)
    assert sims[same & off].mean() > sims[~same].mean() + 0.1
    # reload gives the same embedding; an unchanged dataset reuses the artifact
    again = EvalEmbedder.load(tmp_path / "ev")
    assert torch.allclose(again.embed(imgs), e, atol=1e-5)
    assert train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", cfg).meta["data_hash"] == meta["data_hash"]
    # a different train split is a different hash
    other = train_evaluator(imgs, seqs[:-1], [{}] * len(imgs), tmp_path / "ev2", cfg)
    assert other.meta["data_hash"] != meta["data_hash"]
    assert is_evaluator_artifact(tmp_path / "ev") and not is_evaluator_artifact(tmp_path)
    from pgen_engine.rewards.embedders import make_embedder

    for spec in ({"type": "clip", "path": str(tmp_path / "ev")}, {"type": "eval_cnn", "path": str(tmp_path / "ev")}):
        with pytest.raises(ValueError, match="rewards may not use it"):
            make_embedder(spec)


def test_instance_pairs_keep_the_embedding_spread_when_co_consumption_is_noise(tmp_path):
    """Sequences drawn at random carry no signal: plain InfoNCE then collapses every image onto
    one direction (each similarity metric would read ~1 for every system); the instance pairs
    keep images apart, and ``sanity.mean_cosine`` reports which happened."""
    imgs, _, _ = _toy(n_groups=6, per=8, seed=3)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, len(imgs), size=6)) for _ in range(80)]
    base = dict(steps=60, batch_size=32, image_size=32, width=8, dim=16, metadata_frac=0.0)
    spread = {}
    default = EvaluatorConfig().instance_frac
    assert default > 0
    for frac in (0.0, default):
        ev = train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / f"ev{frac}",
                             EvaluatorConfig(instance_frac=frac, **base))
        spread[frac] = ev.meta["sanity"]["mean_cosine"]
        e = ev.embed(imgs)
        off = ~torch.eye(len(imgs), dtype=torch.bool)
        assert abs(float((e @ e.T)[off].mean()) - spread[frac]) < 1e-4  # the number is the embedding's
    assert spread[0.0] > 0.8, spread
    assert spread[default] < spread[0.0] - 0.2, spread


def test_instance_frac_is_validated():
    with pytest.raises(ValueError, match="instance_frac"):
        EvaluatorConfig(instance_frac=1.0)
    with pytest.raises(ValueError, match="metadata_frac \\+ instance_frac"):
        EvaluatorConfig(instance_frac=0.5, metadata_frac=0.5)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_shape"])
def test_damaged_weights_are_retrained_and_a_one_line_error_on_load(tmp_path, damage):
    # a truncated evaluator.safetensors used to end `pgen eval` in safetensors' SafetensorError traceback
    from safetensors.torch import save_file

    imgs, seqs, _ = _toy()
    cfg = EvaluatorConfig(steps=5, batch_size=32, image_size=32, width=8, dim=16, metadata_frac=0.0)
    good = train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", cfg)
    w = tmp_path / "ev" / "evaluator.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "garbage":
        w.write_bytes(b"not a safetensors file")
    else:
        save_file({"x": torch.zeros(3)}, str(w))
    with pytest.raises(ValueError, match=rf"{w}: unreadable evaluator weights .*delete"):
        EvalEmbedder.load(tmp_path / "ev")
    again = train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", cfg)  # retrained in place
    assert torch.allclose(EvalEmbedder.load(tmp_path / "ev").embed(imgs), again.embed(imgs))
    assert again.meta["data_hash"] == good.meta["data_hash"]


def test_evaluator_is_not_written_into_a_reward_embedder_folder_or_over_a_file(tmp_path):
    # `pgen eval --evaluator data_work/reward_embedder` used to write evaluator.* next to the
    # reward embedder, after which the RL stage refused that folder ("rewards may not use it");
    # a file as the folder was a bare "[Errno 17] File exists"
    from pgen_engine.rewards.cocons import CoConsumptionEmbedder, train_reward_embedder

    imgs, seqs, _ = _toy()
    cfg = EvaluatorConfig(steps=5, batch_size=32, image_size=32, width=8, dim=16, metadata_frac=0.0)
    train_reward_embedder(imgs, seqs, tmp_path / "reward", cfg)
    with pytest.raises(ValueError, match=r"reward: holds a reward-embedder artifact .*folder of its own"):
        train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "reward", cfg)
    assert not (tmp_path / "reward" / "evaluator.json").exists()
    CoConsumptionEmbedder.load(tmp_path / "reward")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"f: exists and is not a folder"):
        train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "f", cfg)


def test_crash_between_weights_and_metadata_never_pairs_new_weights_with_old_metadata(tmp_path, monkeypatch):
    # the weights were replaced first and evaluator.json second: interrupted in between, the folder
    # held data B's weights under data A's hash, and a later run on data A reused them as A's
    import pgen_engine.eval.evaluator as evm

    imgs, seqs, _ = _toy()
    cfg = EvaluatorConfig(steps=5, batch_size=32, image_size=32, width=8, dim=16, metadata_frac=0.0)
    a = train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", cfg)
    want = {k: v.clone() for k, v in a.net.state_dict().items()}

    def crash(path, obj, **kw):
        raise KeyboardInterrupt("simulated crash before the metadata is written")

    monkeypatch.setattr(evm, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        train_evaluator(imgs, seqs[:-1], [{}] * len(imgs), tmp_path / "ev", cfg)  # data B
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="missing evaluator.json"):
        EvalEmbedder.load(tmp_path / "ev")  # no metadata: the half-written pair is not an artifact
    again = train_evaluator(imgs, seqs, [{}] * len(imgs), tmp_path / "ev", cfg)  # data A again: retrained
    got = again.net.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_config_refuses_a_seed_numpy_would_refuse_late():
    # a negative seed used to pass and stop training with numpy's bare "expected non-negative integer"
    for bad in (-1, 2 ** 63, 1.5, True):
        with pytest.raises(ValueError, match=r"evaluator: seed must be an int in \[0, 2\*\*63 - 1\]"):
            EvaluatorConfig(seed=bad)
    assert EvaluatorConfig(seed=0).seed == 0
