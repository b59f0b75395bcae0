"""Evaluation on data and settings the main tests do not cover: tiny or degenerate datasets,
single users, stale artifacts and bad flags."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pgen_engine.cli import main
from pgen_engine.data.dataset import DataError
from pgen_engine.eval import evaluate as E


def write_dataset(root, *, users: int = 3, items: int = 6, per_user: int = 5, tie_last: bool = False,
                  seed: int = 0):
    """A native dataset of random 32-px images; with ``tie_last`` every user's last interaction
    has the timestamp of the one before it."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(root / "items.jsonl", "w") as f:
        for i in range(items):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"i{i}.png")
            f.write(json.dumps({"item_id": f"i{i}", "title": f"t{i}", "image": f"images/i{i}.png"}) + "\n")
    rows = ["user_id,item_id,timestamp"]
    for u in range(users):
        for t, i in enumerate(rng.permutation(items)[:per_user]):
            rows.append(f"u{u},i{i},{10 * (t - 1 if tie_last and t == per_user - 1 else t)}")
    (root / "interactions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_no_test_example_fails_before_the_token_cache_and_the_model(tmp_path, monkeypatch, capsys):
    # every test target ties the interaction before it, so every test user is dropped: this used to
    # fail only after the model, the token cache and the evaluator had been built
    ds = write_dataset(tmp_path / "ds", tie_last=True)
    monkeypatch.setattr(E, "build_token_cache", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cache")))
    with pytest.raises(DataError, match="no test examples"):
        E.prepare_eval_data(ds, None, tmp_path / "cache", None, require="test")
    import pgen_engine.eval.cli as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "ckpt").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(ds), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pgen eval: error: ") and "no test examples" in err and "ties" in err
    assert err.count("\n") == 1, err
    # a wrong data folder is named before the model loads too
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nope"), "--quiet"]) == 1
    assert "not a directory" in capsys.readouterr().err


def eval_data(tmp_path, name: str = "ds", **kw):
    """``write_dataset`` + a tiny PatchKMeans tokenizer + ``prepare_eval_data`` (pixel statistics)."""
    from pgen_engine.data.dataset import load_dataset, load_image
    from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
    from pgen_engine.rewards.embedders import PixelStatsEmbedder

    root = write_dataset(tmp_path / name, **kw)
    ds = load_dataset(root)
    imgs = torch.stack([torch.from_numpy(load_image(it.image_path, 32)) for it in ds.items.values()])
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=16, codebook_size=8, iters=2, seed=0)
    return E.prepare_eval_data(root, tok, tmp_path / f"{name}_cache", PixelStatsEmbedder(), k=4, min_interactions=3)


def test_an_evaluator_trained_on_other_data_is_refused(tmp_path):
    # `pgen eval --evaluator DIR` loaded whatever DIR held, without the data-hash check the
    # default path (train_or_reuse) does: an evaluator of another dataset scored this one silently
    from pgen_engine.eval.demo import load_eval_embedder, train_eval_embedder

    a = eval_data(tmp_path, "a", users=4, items=8, seed=0)
    b = eval_data(tmp_path, "b", users=4, items=8, seed=1)
    train_eval_embedder(a, tmp_path / "ev", steps=2)
    assert load_eval_embedder(a, tmp_path / "ev").meta["data_hash"]  # its own data: reused
    with pytest.raises(ValueError, match="trained on other data"):
        load_eval_embedder(b, tmp_path / "ev")
    (tmp_path / "ev" / "evaluator.safetensors").write_bytes(b"\0" * 10)  # truncated: one-line ValueError
    with pytest.raises(ValueError, match="unreadable evaluator weights"):
        load_eval_embedder(a, tmp_path / "ev")


def test_pgen_eval_refuses_a_stale_evaluator(tmp_path, capsys):
    from pgen_engine.eval.demo import train_eval_embedder
    from pgen_engine.models.tiny import make_tiny_checkpoint

    other = eval_data(tmp_path, "other", users=4, items=8, seed=1)
    train_eval_embedder(other, tmp_path / "ev", steps=2)
    data = eval_data(tmp_path, "ds", users=4, items=8, seed=0)
    data.tokenizer.save(tmp_path / "tok.safetensors")
    ck = make_tiny_checkpoint(tmp_path / "run" / "final", image_size=32, patch_size=16, codebook_size=8)
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(ck), "--data", str(data.root), "--num-images", "2", "--quiet",
               "--tokenizer", str(tmp_path / "tok.safetensors"), "--evaluator", str(tmp_path / "ev"),
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1 and "trained on other data" in err and err.count("\n") == 1, err


def test_one_user_never_beats_a_baseline():
    # with one user every bootstrap draw repeats that user: the CI was the zero-width [d, d] and
    # the report said "beats" on a single observation
    from pgen_engine.eval.report import build_report_json, ci_table, paired_sentences
    from pgen_engine.eval.stats import bootstrap_indices, mean_ci, paired_ci, verdict

    d = paired_ci(torch.tensor([0.6]), torch.tensor([0.5]), bootstrap_indices(1))
    assert abs(d["mean"] - 0.1) < 1e-6 and verdict("future_sim", d) == "no difference"
    # three users, but only one with a value (the others NaN): the same
    nan = float("nan")
    one = mean_ci(torch.tensor([0.2, nan, nan]), bootstrap_indices(3))
    assert one["mean"] == pytest.approx(0.2) and all(x != x for x in one["ci95"])
    per_user = {"generate_sft": {"future_sim": torch.tensor([0.6])}, "copy_last": {"future_sim": torch.tensor([0.5])}}
    rep = build_report_json("d", [0], 2, {}, per_user)
    assert verdict("future_sim", rep["paired"]["generate_sft - copy_last"]["future_sim"]) == "no difference"
    text = " ".join(paired_sentences(rep, ["generate_sft"], ["future_sim"]))
    assert "beats" not in text and "no difference on future_sim (+0.100 no CI)" in text
    assert "| generate_sft | 0.600 [—] |" in ci_table(rep, ["future_sim"])
    # two users with the same constant gain keep their (tight) CI
    two = paired_ci(torch.tensor([0.6, 0.7]), torch.tensor([0.5, 0.6]), bootstrap_indices(2))
    assert verdict("future_sim", two) == "better"


def test_every_baseline_gives_n_images_per_user_from_a_catalogue_smaller_than_n(tmp_path):
    # random gave min(n, C) images per user (6 of 12 here) while every other row had n
    data = eval_data(tmp_path, users=3, items=6)
    ex = data.examples("test")
    for name, out in E.baseline_systems(data, ex, 12, seed=0).items():
        assert out.images.shape[0] == 3 * 12 and out.gen_user.tolist() == [u for u in range(3) for _ in range(12)], name
    r = E.random_system(data, ex, 12, seed=0)
    first = [data.catalogue_images.flatten(1).eq(img.flatten()).all(1).nonzero()[0, 0].item() for img in r.images[:12]]
    assert sorted(first[:6]) == list(range(6)) and first[6:] == first[:6]  # every item once, then cycled


def test_bad_sampling_flags_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
    # --temperature 0, --top-k -1, --guidance-scale nan failed only inside the Generator, after the
    # token cache and the evaluator had been built
    import pgen_engine.eval.cli as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setattr(E, "load_eval_splits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    base = ["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]
    for extra, expect in ((["--temperature", "0"], "--temperature must be > 0"),
                          (["--top-k", "-1"], "--top-k must be an int >= 0"),
                          (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
                          (["--seed", str(2 ** 64)], "--seed must be a 64-bit integer")):
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen eval: error: ") and expect in err and err.count("\n") == 1, err


def test_pgen_eval_with_a_large_seed_and_one_user(tmp_path, capsys):
    # generate_system's per-prompt seeds (seed * 1_000_003 + j) left the 64-bit range for seeds
    # >= ~1.8e13 and the Generator refused them after all the preparation
    from pgen_engine.models.tiny import make_tiny_checkpoint

    data = eval_data(tmp_path, "ds", users=1, items=8, per_user=6)
    data.tokenizer.save(tmp_path / "tok.safetensors")
    ck = make_tiny_checkpoint(tmp_path / "run" / "final", image_size=32, patch_size=16, codebook_size=8)
    rc = main(["eval", "--checkpoint", str(ck), "--data", str(data.root), "--num-images", "2", "--quiet",
               "--tokenizer", str(tmp_path / "tok.safetensors"), "--embedder", "pixel_stats", "--baselines",
               "--cache-dir", str(tmp_path / "cache"), "--seed", str(2 ** 62), "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["users"] == 1
    assert "beats it" not in (tmp_path / "ev" / "report.md").read_text()  # one user: no CI, no claim


def test_pgen_eval_reports_the_users_dropped_for_tied_targets(tmp_path, capsys):
    # tied test targets were dropped silently by pgen eval (only the demo's notes counted them)
    from pgen_engine.models.tiny import make_tiny_checkpoint

    data = eval_data(tmp_path, "ds", users=3, items=8, per_user=6)
    rows = (data.root / "interactions.csv").read_text().splitlines()
    last = max(i for i, r in enumerate(rows) if r.startswith("u1,"))
    user, item, _ = rows[last].split(",")
    rows[last] = f"{user},{item},{rows[last - 1].split(',')[2]}"  # u1's test target ties the valid one
    (data.root / "interactions.csv").write_text("\n".join(rows) + "\n")
    data.tokenizer.save(tmp_path / "tok.safetensors")
    ck = make_tiny_checkpoint(tmp_path / "run" / "final", image_size=32, patch_size=16, codebook_size=8)
    rc = main(["eval", "--checkpoint", str(ck), "--data", str(data.root), "--num-images", "1", "--quiet",
               "--tokenizer", str(tmp_path / "tok.safetensors"), "--embedder", "pixel_stats",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["users"] == 2
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "- **users**: 2" in md and "- **users dropped (target ties the previous interaction's timestamp)**: 1" in md


def test_independence_sees_the_reward_model_however_its_path_is_spelt(tmp_path, monkeypatch):
    # "clip:/m/" vs the reward's "/m", a relative path, or --run-config's reward were all
    # reported as independent
    from pgen_engine.eval.cli import _reward_embedder_spec, is_independent

    m = tmp_path / "m"
    m.mkdir()
    monkeypatch.chdir(tmp_path)
    reward = {"type": "clip", "path": str(m)}
    for spelt in (f"clip:{m}/", "clip:m", "clip:./m", f"pretrained:{m}"):
        assert not is_independent(reward, {"type": spelt}), spelt
    assert is_independent(reward, {"type": f"clip:{tmp_path / 'other'}"})
    assert is_independent(reward, {"type": "pixel_stats"}) and is_independent(reward, {"type": "eval_cnn"})
    # a reward spec that names the evaluator itself is never independent of it
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "evaluator.json").write_text(json.dumps({"kind": "pgen_eval_embedder"}))
    assert not is_independent({"type": "cocons_cnn", "path": str(tmp_path / "ev")}, {"type": "eval_cnn"})
    assert not is_independent({"type": "eval_cnn"}, {"type": "eval_cnn"})
    # the reward is read from --run-config when one is given
    cfg = tmp_path / "elsewhere.yaml"
    cfg.write_text(f"stage: rl\nrl:\n  embedder:\n    type: clip\n    path: {m}\n")
    assert _reward_embedder_spec(tmp_path / "final") is None
    assert _reward_embedder_spec(tmp_path / "final", str(cfg)) == reward


def test_evaluator_sanity_of_a_collapsed_embedding_and_a_small_catalogue():
    # recall@10 ranked ties optimistically, so an evaluator that maps every image to one point
    # read a perfect 1.0; chance was 10 / (C - 1), above 1 for a catalogue of <= 10 items
    import numpy as np

    from pgen_engine.eval.evaluator import EvaluatorConfig, fit_cocons_cnn, recall_at_k

    pairs = np.array([[0, 1], [2, 3], [4, 5]])
    assert recall_at_k(torch.ones(30, 4), pairs, k=10) == 0.0
    assert recall_at_k(torch.ones(11, 4), pairs, k=10) == 1.0  # 10 other items: top 10 holds them all
    imgs = torch.zeros(8, 32, 32, 3, dtype=torch.uint8)  # every image the same constant colour
    _, info = fit_cocons_cnn(imgs, [[0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7], [0, 2, 4, 6]], [{}] * 8,
                             EvaluatorConfig(steps=2, image_size=32, batch_size=8))
    assert info["sanity"]["recall@10_chance"] == 1.0 and 0.0 <= info["sanity"]["recall@10"] <= 1.0


def test_nan_embeddings_are_an_error_not_an_undefined_metric():
    # a NaN embedding made hist_max / future alignment NaN for that image, which nanmean then
    # silently skipped as "undefined"; only the ranking failed later, with "scores contain NaN"
    from pgen_engine.eval import metrics as M

    e = torch.eye(3, 4)
    e[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gen_embeds: 1 of 3 embeddings hold NaN or inf \(first: row 1\)"):
        M.history_alignment(e, torch.tensor([0, 0, 1]), [torch.eye(2, 4), torch.eye(1, 4)])
    with pytest.raises(ValueError, match="hold NaN or inf"):
        M.novelty(torch.eye(2, 4), torch.tensor([[float("inf"), 0, 0, 0]]))
    # a zero vector (e.g. a constant image in some embedders) stays a defined cosine of 0
    z = M.history_alignment(torch.zeros(1, 4), torch.tensor([0]), [torch.eye(2, 4)])
    assert float(z["max"][0]) == 0.0


def test_novelty_and_diversity_of_copies_are_never_negative():
    # cos(x, x) rounds to 1 + 1e-7 for some x: a catalogue copy had novelty -1e-7 (printed
    # "-0.000"), outside the documented [0, 2], and so did the diversity of identical images
    from pgen_engine.eval import metrics as M

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    nov = M.novelty(x, x)
    assert float(nov.min()) >= 0.0 and float(nov.max()) < 1e-6
    div = M.user_diversity(x[:1].repeat(40, 1), torch.arange(40) // 4, 10)
    assert float(div.min()) >= 0.0 and float(div.max()) < 1e-6


def _strict(const):
    raise ValueError(f"non-standard JSON constant {const}")


def test_report_json_is_strict_json_and_reads_back_to_the_same_tables(tmp_path):
    # one image per user makes diversity undefined for everyone: report.json held bare NaN,
    # which strict JSON parsers (JavaScript, jq) refuse
    from pgen_engine.eval.report import (build_report_json, ci_table, paired_sentences, plot_paired,
                                         results_markdown, write_report_json)

    nan = float("nan")
    g = torch.Generator().manual_seed(0)
    per_user = {s: {"future_sim": torch.rand(5, generator=g, dtype=torch.float64),
                    "diversity": torch.full((5,), nan, dtype=torch.float64),
                    "hr@10": torch.tensor([1.0, nan, nan, nan, nan], dtype=torch.float64)}
                for s in ("generate_sft", "copy_last", "retrieve")}
    rep = build_report_json("d", [0], 1, {"type": "eval_cnn", "sanity": {"recall@10": nan, "recall@10_pixel_stats": 0.1,
                                                                        "recall@10_chance": 0.5}}, per_user)
    write_report_json(tmp_path / "report.json", rep)
    back = json.loads((tmp_path / "report.json").read_text(), parse_constant=_strict)
    assert back["systems"]["generate_sft"]["diversity"] == {"mean": None, "ci95": [None, None]}
    assert back["systems"]["generate_sft"]["hr@10"] == {"mean": 1.0, "ci95": [None, None]}
    from pgen_engine.eval.stats import verdict

    assert verdict("hr@10", back["paired"]["generate_sft - copy_last"]["hr@10"]) == "no difference"
    metrics = ["future_sim", "diversity", "hr@10"]
    for section in ("systems", "paired"):
        assert ci_table(back, metrics, section) == ci_table(rep, metrics, section)
    assert paired_sentences(back, ["generate_sft"], metrics) == paired_sentences(rep, ["generate_sft"], metrics)
    assert "recall@10 nan" in results_markdown(back, metrics, metrics)
    pytest.importorskip("matplotlib")
    assert plot_paired(tmp_path / "p.png", back, metrics)


def test_row_names_that_would_break_the_report_are_refused(tmp_path, capsys, monkeypatch):
    # "--name 'a - b'" made the paired key "a - b - copy_last", read back as system "a"; a '|'
    # split the markdown row
    import pgen_engine.eval.cli as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for name in ("my - model", "a|b", "two\nlines", "  "):
        assert main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--name", name]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen eval: error: --name") and err.count("\n") == 1, err


def test_bad_embedder_and_evaluator_flags_fail_before_the_model(tmp_path, capsys, monkeypatch):
    # an unknown --embedder type, a missing model folder or an --evaluator file failed only after
    # the model had loaded and the token cache had been built
    import pgen_engine.eval.cli as C

    ds = write_dataset(tmp_path / "ds")
    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ev.txt").write_text("x")
    (tmp_path / "evdir").mkdir()  # an evaluator artifact given as an --embedder: make_embedder said "rewards may not use it"
    (tmp_path / "evdir" / "evaluator.json").write_text(json.dumps({"kind": "pgen_eval_embedder"}))
    base = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(ds), "--quiet"]
    for extra, expect in ((["--embedder", "nope"], "expected auto, pixel_stats or TYPE:PATH"),
                          (["--embedder", "foo:/x"], "unknown type 'foo'"),
                          (["--embedder", f"clip:{tmp_path / 'missing'}"], "missing"),
                          (["--evaluator", str(tmp_path / "ev.txt")], "exists and is not a directory"),
                          (["--out", str(tmp_path / "ev.txt" / "sub")], "is a file, not a folder"),
                          (["--embedder", f"eval_cnn:{tmp_path}"], "is passed as --evaluator"),
                          (["--embedder", f"cocons_cnn:{tmp_path / 'evdir'}"], "is passed as --evaluator")):
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen eval: error: ") and expect in err and err.count("\n") == 1, (extra, err)


def test_select_sampling_without_validation_users_and_for_a_lower_is_better_metric(tmp_path):
    # no validation example (every valid target tied) crashed in the generator on an empty batch;
    # a lower-is-better metric (user_id_mean_rank) picked its worst setting
    data = eval_data(tmp_path, users=4, items=8)
    calls = []
    best, scores = E.select_sampling(lambda st: calls.append(st), data, [], None, [{"t": 0}, {"t": 1}], "future_sim")
    assert best == {"t": 0} and scores == {} and not calls
    ex = data.examples("valid")
    outs = {0: E.true_next_system(data, ex, 2), 1: E.random_system(data, ex, 2, seed=0)}
    outs[1].name = "random"
    from pgen_engine.rewards.embedders import PixelStatsEmbedder

    emb = PixelStatsEmbedder()
    ranks = {t: float(E.per_user_metrics(o, data, ex, emb)["user_id_mean_rank"].mean()) for t, o in outs.items()}
    best, _ = E.select_sampling(lambda st: outs[st["t"]], data, ex, emb, [{"t": 0}, {"t": 1}], "user_id_mean_rank")
    assert ranks[0] != ranks[1] and best == {"t": min(ranks, key=ranks.get)}


def test_a_beaten_baseline_never_shows_a_ci_that_prints_as_zero():
    # a paired CI of [+0.0003, +0.0007] printed "[+0.000, +0.001]" next to "beats": the reader
    # saw a CI touching 0 where the verdict said it excluded 0
    from pgen_engine.eval.report import build_report_json, ci_table, paired_sentences

    g = torch.Generator().manual_seed(0)
    base = torch.rand(50, generator=g, dtype=torch.float64)
    per_user = {"generate_sft": {"future_sim": base + 0.0003 + 1e-4 * torch.randn(50, generator=g, dtype=torch.float64)},
                "copy_last": {"future_sim": base}}
    rep = build_report_json("d", [0], 2, {}, per_user)
    d = rep["paired"]["generate_sft - copy_last"]["future_sim"]
    assert 0 < d["ci95"][0] < 5e-4
    text = paired_sentences(rep, ["generate_sft"], ["future_sim"])[0]
    assert "beats it on future_sim" in text and "+0.000" not in text
    assert "0.000" not in ci_table(rep, ["future_sim"], section="paired")
    assert "| generate_sft | 0." in ci_table(rep, ["future_sim"])  # system cells keep 3 decimals


@pytest.mark.parametrize("field,value", [("dim", 64.5), ("image_size", 8), ("width", -3)])
def test_a_damaged_evaluator_config_is_a_one_line_error_and_is_retrained(tmp_path, field, value):
    # a float dim made SmallCNN raise TypeError (a traceback from pgen eval, and train_or_reuse,
    # which retrains only on ValueError, crashed instead of retraining); an out-of-range value
    # was a ValueError that did not name the file
    from pgen_engine.eval.evaluator import EvalEmbedder, EvaluatorConfig, train_evaluator

    imgs = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seqs = [[0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7], [0, 2, 4, 6]]
    cfg = EvaluatorConfig(steps=2, image_size=32, batch_size=8)
    train_evaluator(imgs, seqs, [{}] * 8, tmp_path / "ev", cfg)
    meta = json.loads((tmp_path / "ev" / "evaluator.json").read_text())
    meta["config"][field] = value
    (tmp_path / "ev" / "evaluator.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"evaluator\.json: malformed evaluator metadata"):
        EvalEmbedder.load(tmp_path / "ev")
    again = train_evaluator(imgs, seqs, [{}] * 8, tmp_path / "ev", cfg)
    assert again.config == cfg and EvalEmbedder.load(tmp_path / "ev").meta["data_hash"] == again.meta["data_hash"]


def test_a_ground_truth_that_does_not_match_the_dataset_is_a_data_error(tmp_path):
    # a ground_truth.jsonl with fewer steps than a user's interactions (another version of the
    # synthetic dataset) raised a bare IndexError (a traceback from pgen eval)
    from pgen_engine.data.dataset import load_dataset, load_image
    from pgen_engine.data.synth import SynthConfig, generate_synthetic
    from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
    from pgen_engine.rewards.embedders import PixelStatsEmbedder

    root = tmp_path / "ds"
    generate_synthetic(root, SynthConfig(num_users=4, num_items=20, seed=2))
    ds = load_dataset(root)
    imgs = torch.stack([torch.from_numpy(load_image(it.image_path, 32)) for it in ds.items.values()])
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=16, codebook_size=8, iters=2, seed=0)
    data = E.prepare_eval_data(root, tok, tmp_path / "cache", PixelStatsEmbedder(), k=3)
    ex = data.examples("test")
    out = E.repeat_last_system(data, ex, 2)
    assert "attr_acc_future" in E.per_user_metrics(out, data, ex, PixelStatsEmbedder())
    data.ground_truth[ex[0].user_id] = data.ground_truth[ex[0].user_id][:2]
    with pytest.raises(DataError, match=rf"ground_truth.jsonl: user '{ex[0].user_id}' has 2 steps"):
        E.per_user_metrics(out, data, ex, PixelStatsEmbedder())
    del data.ground_truth[ex[0].user_id]
    with pytest.raises(DataError, match="has 0 steps"):
        E.per_user_metrics(out, data, ex, PixelStatsEmbedder())


def test_the_evaluator_trains_on_catalogue_images_smaller_than_16_px(tmp_path):
    # the evaluator's image size was the catalogue's (capped at 64): an 8-px tokenizer made
    # pgen eval fail with "evaluator image_size must be in [16, 256], got 8", a setting nobody set
    from types import SimpleNamespace

    from pgen_engine.eval.demo import train_eval_embedder

    ids = [f"i{j}" for j in range(8)]
    ev = SimpleNamespace(item_ids=ids, item_index={i: j for j, i in enumerate(ids)},
                         catalogue_images=torch.randint(0, 255, (8, 8, 8, 3), dtype=torch.uint8),
                         splits=SimpleNamespace(train_sequences={"a": ids[:4], "b": ids[4:], "c": ids[::2]}),
                         dataset=SimpleNamespace(items={i: SimpleNamespace(extra={}) for i in ids}))
    emb = train_eval_embedder(ev, tmp_path / "ev", steps=2)
    assert emb.config.image_size == 16 and emb.embed(ev.catalogue_images).shape == (8, emb.dim)


def test_pgen_eval_sizes_the_generator_by_its_longest_prompt(tmp_path, capsys):
    # pgen eval used the Generator's default max_seq_len (image tokens + 512): prompts with long
    # titles (or pixels-mode history images of a real Janus) failed mid-evaluation with
    # "exceeds max_seq_len"; the demo already sized it by the longest prompt
    from pgen_engine.models.tiny import make_tiny_checkpoint

    data = eval_data(tmp_path, "ds", users=2, items=8, per_user=5)
    items = [json.loads(line) for line in (data.root / "items.jsonl").read_text().splitlines()]
    for it in items:
        it["title"] = " ".join(["very long title"] * 12)
    (data.root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "work").mkdir()
    data.tokenizer.save(tmp_path / "work" / "tokenizer.safetensors")
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(f"data:\n  with_titles: true\n  work_dir: {tmp_path / 'work'}\n")
    ck = make_tiny_checkpoint(tmp_path / "run" / "final", image_size=32, patch_size=16, codebook_size=8)
    rc = main(["eval", "--checkpoint", str(ck), "--data", str(data.root), "--num-images", "1", "--quiet",
               "--run-config", str(run_cfg), "--embedder", "pixel_stats", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0, capsys.readouterr().err


def test_evaluator_weights_with_nan_are_refused_and_retrained(tmp_path):
    # NaN weights (a diverged run, a damaged file) loaded fine and made every embedding NaN
    from safetensors.torch import load_file, save_file

    from pgen_engine.eval.evaluator import EvalEmbedder, EvaluatorConfig, train_evaluator

    imgs = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seqs = [[0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7], [0, 2, 4, 6]]
    cfg = EvaluatorConfig(steps=2, image_size=32, batch_size=8)
    train_evaluator(imgs, seqs, [{}] * 8, tmp_path / "ev", cfg)
    w = load_file(str(tmp_path / "ev" / "evaluator.safetensors"))
    w["head.weight"][0, 0] = float("nan")
    save_file(w, str(tmp_path / "ev" / "evaluator.safetensors"))
    with pytest.raises(ValueError, match="evaluator weights hold NaN or inf"):
        EvalEmbedder.load(tmp_path / "ev")
    again = train_evaluator(imgs, seqs, [{}] * 8, tmp_path / "ev", cfg)
    assert bool(torch.isfinite(again.embed(imgs)).all())
    assert bool(torch.isfinite(EvalEmbedder.load(tmp_path / "ev").embed(imgs)).all())


def test_evaluator_refuses_a_reward_embedder_folder_in_a_process_that_never_imported_rewards(tmp_path):
    # the "folder holds another artifact" check listed CNNArtifactEmbedder.__subclasses__(), which
    # holds the reward CNN only once pgen_engine.rewards.cocons is imported -- pgen eval never
    # imports it, so `pgen eval --evaluator data_work/reward_embedder` wrote evaluator.* there
    import subprocess
    import sys

    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "reward_embedder.json").write_text(json.dumps({"kind": "pgen_reward_embedder"}))
    code = ("import sys, torch\n"
            "from pgen_engine.eval.evaluator import EvaluatorConfig, train_evaluator\n"
            "assert 'pgen_engine.rewards.cocons' not in sys.modules\n"
            "imgs = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8)\n"
            "try:\n"
            "    train_evaluator(imgs, [[0, 1, 2, 3], [4, 5, 6, 7]], [{}] * 8, sys.argv[1],\n"
            "                    EvaluatorConfig(steps=1, image_size=32, batch_size=8))\n"
            "except ValueError as e:\n"
            "    print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "reward")], capture_output=True, text=True,
                       timeout=300)
    assert "REFUSED" in r.stdout and "holds a reward-embedder artifact" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not (tmp_path / "reward" / "evaluator.json").exists()


def test_pgen_demo_on_a_dataset_without_test_users_fails_before_training(tmp_path, monkeypatch):
    # `pgen demo --data D` trained SFT and RL for every seed before finding that D has no test user
    import pgen_engine.eval.demo as D

    ds = write_dataset(tmp_path / "ds", tie_last=True)
    monkeypatch.setattr(D, "_train_seed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    with pytest.raises(DataError, match="no test examples"):
        D.run_demo(tmp_path / "out", data=str(ds), progress=False)


def test_no_co_consumption_pairs_names_what_a_pair_is():
    # every user re-consuming one item (a one-item catalogue) was told "every user needs >= 2
    # train items" while every user had 3
    from pgen_engine.eval.evaluator import EvaluatorConfig, fit_cocons_cnn

    imgs = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="two different items within 3 steps.*repeats of one item do not count"):
        fit_cocons_cnn(imgs, [[0, 0, 0]] * 3, [{}], EvaluatorConfig(steps=1, image_size=32, batch_size=8))
