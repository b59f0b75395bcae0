"""The generate-vs-recommend evaluation on a small synthetic dataset."""
from __future__ import annotations

import math

import pytest
import torch

from pgen_engine.data.synth import SynthConfig, generate_synthetic
from pgen_engine.eval import evaluate as E
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.rewards.embedders import PixelStatsEmbedder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    generate_synthetic(root / "ds", SynthConfig(num_users=20, num_items=40, seed=3))
    from pgen_engine.data.dataset import load_dataset, load_image

    ds = load_dataset(root / "ds")
    imgs = torch.stack([torch.from_numpy(load_image(it.image_path, 32)) for it in ds.items.values()])
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=16, codebook_size=128, iters=5, seed=0)
    return E.prepare_eval_data(root / "ds", tok, root / "cache", PixelStatsEmbedder(), k=3)


def test_recommenders_exclude_history_and_score(data):
    ex = data.examples("test")
    assert len(ex) == 20
    out = E.retrieve_system(data, ex, 3)
    assert out.images.shape == (60, 32, 32, 3) and out.scores.shape == (20, len(data.item_ids))
    row = E.compute_metrics(out, data, ex, PixelStatsEmbedder())
    assert row["novelty"] == pytest.approx(0.0, abs=1e-5)  # recommended images are catalogue items
    assert 0.0 <= row["hr@10"] <= 1.0 and 0.0 <= row["attr_acc_future"] <= 1.0
    # a retrieve-and-rank recommender aligns with the history better than popularity
    pop = E.compute_metrics(E.popularity_system(data, ex, 3), data, ex, PixelStatsEmbedder())
    assert row["hist_top5"] > pop["hist_top5"]


def test_oracle_images_score_perfect_future(data):
    """A 'system' that outputs the true next item gets future_sim 1 and HR@1 1."""
    ex = data.examples("test")
    idx = torch.tensor([data.item_index[e.target] for e in ex])
    out = E.SystemOutput("oracle", data.catalogue_images[idx], torch.arange(len(ex)), None, "generate")
    row = E.compute_metrics(out, data, ex, PixelStatsEmbedder())
    assert row["future_sim"] == pytest.approx(1.0, abs=1e-5)
    assert row["hr@1"] > 0.5  # duplicates in the catalogue can tie above the true item
    assert math.isnan(row["diversity"])  # one image per user


def test_generate_system_with_a_real_generator(data, tmp_path):
    import pgen_engine as pg
    from pgen_engine.data.prompts import PromptBuilder
    from pgen_engine.data.text_tokenizer import load_text_tokenizer
    from pgen_engine.models.tiny import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "m", image_size=32, patch_size=16, codebook_size=128)
    m = pg.load_model(ck)
    b = PromptBuilder(load_text_tokenizer(None, m.special_tokens), m.special_tokens, data.tokenizer.num_tokens,
                      instruction="x")
    ex = data.examples("test", 4)
    out = E.generate_system("m", pg.Generator(m, max_batch_size=8), data, b, ex, 2, seed=1, batch_prompts=4)
    assert out.images.shape == (8, 32, 32, 3) and out.gen_user.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    again = E.generate_system("m", pg.Generator(m, max_batch_size=8), data, b, ex, 2, seed=1, batch_prompts=2)
    assert torch.equal(out.images, again.images)  # per-prompt seeds: batching does not change samples
    row = E.compute_metrics(out, data, ex, PixelStatsEmbedder())
    assert set(E.METRIC_HELP) <= set(row) | {"hr@1"}
    assert "| m |" in E.format_table({"m": row})


def test_prompt_settings_read_the_run_config(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "config.resolved.yaml").write_text(
        "stage: sft\ndata:\n  instruction: hi\n  with_titles: true\n  history_k: 3\n  work_dir: %s\n" % (tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        E.PromptSettings.for_checkpoint(tmp_path / "run" / "final")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "tokenizer.safetensors").write_bytes(b"x")
    s = E.PromptSettings.for_checkpoint(tmp_path / "run" / "final")
    assert (s.instruction, s.with_titles, s.history_k) == ("hi", True, 3)
