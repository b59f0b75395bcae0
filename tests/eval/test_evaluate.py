"""Baselines and per-user metrics of the evaluation on a small synthetic dataset."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.data.synth import SynthConfig, generate_synthetic
from pgen_engine.eval import evaluate as E
from pgen_engine.eval import metrics as M
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


def test_baselines_shapes_and_definitions(data):
    ex = data.examples("test")
    assert len(ex) == 20
    b = E.baseline_systems(data, ex, 5, seed=0)
    assert list(b) == list(E.BASELINES)
    for out in b.values():
        assert out.images.shape == (100, 32, 32, 3) and out.gen_user.tolist() == [u for u in range(20) for _ in range(5)]
    # copy_last = the history window, most recent first, cycled
    u0 = ex[0]
    want = [data.item_index[i] for i in reversed(u0.history)]
    want = [want[j % len(want)] for j in range(5)]
    assert torch.equal(b["copy_last"].images[:5], data.catalogue_images[want])
    # repeat_last = the most recent history item, every image (per user)
    for u in (0, 7):
        last = data.catalogue_images[data.item_index[ex[u].history[-1]]]
        assert all(torch.equal(img, last) for img in b["repeat_last"].images[5 * u:5 * u + 5])
    assert b["repeat_last"].gen_user.tolist() == b["copy_last"].gen_user.tolist()
    # centroid and popularity are the same for every user
    for name in ("centroid", "popularity"):
        assert torch.equal(b[name].images[:5], b[name].images[5:10])
    # retrieve may return history items (no filtering): its first pick is the window's nearest item
    # in the reference embedding, here the same pixel-stats space as the metrics
    m = E.per_user_metrics(b["retrieve"], data, ex, PixelStatsEmbedder())
    assert set(m) >= set(E.METRIC_HELP) and all(v.shape == (20,) for v in m.values())


def test_true_next_and_copy_last_bracket(data):
    ex = data.examples("test")
    emb = PixelStatsEmbedder()
    b = E.baseline_systems(data, ex, 4, seed=0)
    rows = {k: E.compute_metrics(v, data, ex, emb) for k, v in b.items()}
    # the tokenizer round trip of the true item is (nearly) the item itself
    assert rows["true_next"]["future_sim"] > max(0.9, rows["random"]["future_sim"]) and rows["true_next"]["hr@10"] >= rows["random"]["hr@10"]
    # copying the history identifies the user best: its images ARE the history window
    assert rows["copy_last"]["user_id_acc"] > rows["random"]["user_id_acc"]
    assert rows["copy_last"]["user_id_mean_rank"] < rows["random"]["user_id_mean_rank"]
    assert rows["copy_last"]["hist_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows["true_next"]["diversity"] == pytest.approx(0.0, abs=1e-5)  # n copies


def test_user_id_ranks_hand_values():
    h = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    e = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.1]])
    # image 0 belongs to user 1 (its own history): rank 1; image 1 to user 0 but user 2 ties -> rank 2
    r = M.user_id_ranks(e, torch.tensor([1, 0, 1]), h)
    assert r.tolist() == [1, 2, 3]


def test_generate_system_nonpersonal_is_the_pad_prompt(data, tmp_path):
    import pgen_engine as pg
    from pgen_engine.data.prompts import PromptBuilder
    from pgen_engine.data.text_tokenizer import load_text_tokenizer
    from pgen_engine.models.tiny import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "m", image_size=32, patch_size=16, codebook_size=128)
    m = pg.load_model(ck)
    b = PromptBuilder(load_text_tokenizer(None, m.special_tokens), m.special_tokens, data.tokenizer.num_tokens,
                      instruction="x")
    ex = data.examples("test", 4)
    ids, masks, px = E.build_prompts(data, b, ex, personalized=False)
    assert px == [None] * len(ex)
    sp = m.special_tokens
    for row, mask in zip(ids, masks):
        assert set(row) <= {sp.bos, sp.boi, sp.pad} and not any(mask)
    pers, _, _ = E.build_prompts(data, b, ex)
    assert [len(r) for r in pers] == [len(r) for r in ids]  # same length as training's condition dropout
    # sizes the demo's Generators (MovieLens prompts with titles pass the Generator's 512-token default)
    assert E.longest_prompt(data, b, ex) == max(len(r) for r in pers) > 0
    assert E.longest_prompt(data, b, ex[:1]) == len(pers[0]) and E.longest_prompt(data, b, []) == 0
    out = E.generate_system("m", pg.Generator(m, max_batch_size=8), data, b, ex, 2, seed=1, batch_prompts=4,
                            guidance_scale=3.0, personalized=False)
    assert out.settings["guidance_scale"] == 1.0  # CFG is meaningless on an unconditional prompt
    again = E.generate_system("m", pg.Generator(m, max_batch_size=8), data, b, ex, 2, seed=1, batch_prompts=2,
                              personalized=False)
    assert torch.equal(out.images, again.images)


def test_select_sampling_picks_best_and_examples_sample(data):
    ex = data.examples("valid")
    calls = []

    def make(st):
        calls.append(st)
        # "good" settings output the true next item, "bad" ones a random item
        sys = E.true_next_system(data, ex, 2) if st["t"] == 1 else E.random_system(data, ex, 2, seed=0)
        return sys

    best, scores = E.select_sampling(make, data, ex, PixelStatsEmbedder(), [{"t": 0}, {"t": 1}], "future_sim")
    assert best == {"t": 1} and len(scores) == 2 and len(calls) == 2
    s = data.examples("test", 7, seed=5)
    assert len(s) == 7 and s == data.examples("test", 7, seed=5) and s != data.examples("test", 7, seed=6)


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


def test_prompt_settings_without_work_dir_use_the_runs_data_work(tmp_path):
    # data.work_dir unset: training fits <output_dir>/data_work/tokenizer.safetensors. Evaluation
    # used to fall back to the model's (random) VQ here, scoring codes of another tokenizer silently.
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.resolved.yaml").write_text(f"stage: sft\noutput_dir: {run}\ndata:\n  tokenizer: patch_kmeans\n")
    with pytest.raises(FileNotFoundError, match=r"data_work/tokenizer\.safetensors is missing"):
        E.PromptSettings.for_checkpoint(run / "final")
    (run / "data_work").mkdir()
    (run / "data_work" / "tokenizer.safetensors").write_bytes(b"x")
    assert E.PromptSettings.for_checkpoint(run / "final").tokenizer_path == run / "data_work" / "tokenizer.safetensors"
    (run / "config.resolved.yaml").write_text(f"stage: sft\noutput_dir: {run}\ndata:\n  tokenizer: vq\n")
    assert E.PromptSettings.for_checkpoint(run / "final").tokenizer_path is None  # the model's own VQ


def test_tied_targets_are_found(tmp_path):
    from PIL import Image

    from pgen_engine.data.dataset import load_dataset, write_dataset
    from pgen_engine.data.splits import build_splits

    src = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(src)
    items = [{"item_id": f"a{j}", "title": "t", "image": "images/a.png"} for j in range(6)]
    rows = [("u", f"a{j}", j) for j in range(5)] + [("v", f"a{j}", j) for j in range(4)] + [("v", "a5", 3)]
    d = write_dataset(tmp_path / "ds", items, rows, image_files={"images/a.png": ("copy", src)})
    ds = load_dataset(d)
    ties = E.tied_targets(ds, build_splits(ds, k=2))
    assert ties == {"valid": [], "test": ["v"]}  # v's last item shares the previous timestamp


def test_items_without_an_image_are_a_data_error(tmp_path):
    # used to die with "TypeError: expected str, bytes or os.PathLike object, not NoneType"
    import json

    from pgen_engine.data.dataset import DataError

    generate_synthetic(tmp_path / "ds", SynthConfig(num_users=4, num_items=9, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "ds" / "items.jsonl").read_text().splitlines()]
    lines[2]["image"] = None
    (tmp_path / "ds" / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tok = PatchKMeansTokenizer.fit(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), patch_size=16, codebook_size=2,
                                   iters=1, seed=0)
    with pytest.raises(DataError, match=rf"items\.jsonl: 1 item\(s\) have no image \(first: '{lines[2]['item_id']}'\)"):
        E.prepare_eval_data(tmp_path / "ds", tok, tmp_path / "cache", PixelStatsEmbedder())
    assert not (tmp_path / "cache").exists()


def test_copy_baselines_refuse_an_empty_history(data):
    from pgen_engine.data.splits import Example
    ex = data.examples("test")
    bad = [ex[0], Example(ex[1].user_id, (), ex[1].target, ex[1].position, "test")]
    for fn, name in ((E.copy_last_system, "copy_last"), (E.repeat_last_system, "repeat_last")):
        with pytest.raises(ValueError, match=f"{name}: user {ex[1].user_id} has an empty history"):
            fn(data, bad, 3)
