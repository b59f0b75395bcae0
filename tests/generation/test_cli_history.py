"""`pgen generate` with user histories: prompts.jsonl "history" lines and --data/--users,
id-keyed seeds, bad histories reported by line with nothing published, history-mode checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pgen_engine.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with peaky logits, so a different history visibly changes the codes."""
    from pgen_engine.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("hist") / "ckpt", seed=3, init_std=0.2)


@pytest.fixture(scope="module")
def posters(tmp_path_factory):
    d = tmp_path_factory.mktemp("hist") / "posters"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d


def _line(pid, items, **kw):
    return json.dumps({"id": pid, "history": [{"image": f"posters/{i}.jpg", "title": f"Movie {i}"} for i in items],
                       **kw})


def _run(ckpt, prompts, out, *extra):
    return main(["generate", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out),
                 "--guidance-scale", "3", "--seed", "5", "--num-samples", "2", "--quiet", *extra])


def _img(path):
    return np.asarray(Image.open(path))


def test_history_lines_generate_and_record_their_history(ckpt, posters):
    root = posters.parent
    p = root / "p.jsonl"
    p.write_text("\n".join([_line("u1", [0, 1, 2]), _line("u2", [3], prompt="a sequel"),
                            json.dumps({"id": "txt", "prompt": "plain text"})]) + "\n")
    assert _run(ckpt, p, root / "a", "--grid", str(root / "grid.png")) == 0
    # --grid: rows u1 history, u1 generated, u2 history, u2 generated, txt generated (32 px x3 + 4 pad)
    assert _img(root / "grid.png").shape[0] == 5 * (32 * 3 + 4) + 4
    rows = [json.loads(x) for x in (root / "a" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [("u1", 0), ("u1", 1), ("u2", 0), ("u2", 1),
                                                      ("txt", 0), ("txt", 1)]
    assert rows[0]["history"] == [{"image": f"posters/{i}.jpg", "title": f"Movie {i}"} for i in (0, 1, 2)]
    assert rows[0]["history_mode"] == "pixels" and "history" not in rows[4]
    assert rows[2]["prompt"] == "a sequel"
    # pixels mode: each history image is 16 <image> placeholders in the prompt
    assert rows[0]["num_prompt_tokens"] > 3 * 16
    # moving lines and adding users above does not change a user's images (seed from the id)
    p2 = root / "p2.jsonl"
    p2.write_text("\n".join([_line("new", [2, 3]), json.dumps({"id": "txt", "prompt": "plain text"}),
                             _line("u2", [3], prompt="a sequel"), "", _line("u1", [0, 1, 2])]) + "\n")
    assert _run(ckpt, p2, root / "b", "--batch-size", "2") == 0
    for r in rows:
        assert np.array_equal(_img(root / "a" / r["file"]), _img(root / "b" / r["file"])), r["file"]
    # the history decides the image: same id and seed, other history -> other images
    p3 = root / "p3.jsonl"
    p3.write_text(_line("u1", [3, 2, 1]) + "\n")
    assert _run(ckpt, p3, root / "c") == 0
    assert not np.array_equal(_img(root / "a" / "u1_0.png"), _img(root / "c" / "u1_0.png"))


def test_bad_histories_are_reported_by_line_and_nothing_is_published(ckpt, posters, capsys):
    root = posters.parent
    p = root / "bad.jsonl"
    p.write_text("\n".join([
        _line("ok", [0]),
        _line("missing", [0, 9]),                                    # 2
        json.dumps({"id": "corrupt", "history": [{"image": "posters/broken.jpg", "title": "x"}]}),  # 3
        json.dumps({"id": "empty", "history": []}),                  # 4
        _line("long", [0] * 70),                                     # 5: 70 x 16 placeholders > 1024 positions
        json.dumps({"id": "notobj", "history": ["posters/0.jpg"]}),  # 6
        json.dumps({"id": "both", "history": [{"image": "posters/0.jpg"}], "input_ids": [1, 3]}),  # 7
    ]) + "\n")
    out = root / "never"
    assert _run(ckpt, p, out) == 1
    err = capsys.readouterr().err
    for n, what in [(2, "9.jpg: image file does not exist"), (3, "corrupt or unreadable image"),
                    (4, "'history' is empty"), (5, "max_position_embeddings=1024"), (6, "item 1 must be an object"),
                    (7, "cannot be combined")]:
        row = [r for r in err.splitlines() if f"{p}:{n}:" in r]
        assert len(row) == 1 and what in row[0], (n, err)
    assert f"{p}:1:" not in err
    assert not out.exists()


def test_history_mode_mismatch_names_both_modes(ckpt, posters, capsys):
    root = posters.parent
    p = root / "m.jsonl"
    p.write_text(_line("u", [0]) + "\n")
    assert _run(ckpt, p, root / "m", "--history-mode", "codes") == 1
    err = capsys.readouterr().err
    assert "'pixels'" in err and "'codes'" in err and "trained" in err
    assert _run(ckpt, p, root / "m", "--run-config", str(root / "nope.yaml")) == 1
    assert "--run-config" in capsys.readouterr().err and not (root / "m").exists()


def test_run_config_fixes_the_mode(ckpt, posters, tmp_path, capsys):
    # a run config that trained with codes: pixels is refused; an old run config without the
    # key predates the setting (codes)
    for text in ("data:\n  history_mode: codes\n", "data:\n  with_titles: false\n"):
        rc = tmp_path / "config.resolved.yaml"
        rc.write_text(text)
        p = posters.parent / "m2.jsonl"
        p.write_text(_line("u", [0]) + "\n")
        assert _run(ckpt, p, tmp_path / "o", "--run-config", str(rc), "--history-mode", "pixels") == 1
        err = capsys.readouterr().err
        assert "trained with data.history_mode='codes'" in err and "'pixels'" in err, err


def test_data_users(ckpt, tmp_path, capsys):
    from pgen_engine.data.synth import SynthConfig, generate_synthetic

    ds = generate_synthetic(tmp_path / "ds", SynthConfig(num_users=6, num_items=20, seed=1))
    out = tmp_path / "o"
    assert main(["generate", "--checkpoint", str(ckpt), "--data", str(ds), "--users", "u0002,u0000",
                 "--out", str(out), "--quiet", "--greedy"]) in (0,)
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["u0002", "u0000"]
    assert all(len(r["history"]) >= 1 and "item_id" in r["history"][0] for r in rows)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--data", str(ds), "--users", "nobody",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # one problem, one line (was "1 invalid user(s):" + it)
    assert len(err) == 1 and err[0].endswith("--users: user 'nobody': not in the dataset"), err


def test_users_from_a_file_keep_commas_inside_ids(ckpt, tmp_path):
    from pgen_engine.generation.dataset_prompts import parse_user_ids

    f = tmp_path / "users.txt"
    f.write_text("\ufeffSmith, J.\n\n  u7  \r\n", encoding="utf-8")  # BOM, blank line, CRLF, spaces
    assert parse_user_ids(f"@{f}") == ["Smith, J.", "u7"]
    assert parse_user_ids("a, b,,c") == ["a", "b", "c"]
    for bad, msg in ((f"@{tmp_path / 'missing.txt'}", "cannot read the user-id file"), (",", "comma-separated")):
        with pytest.raises(ValueError, match=msg):
            parse_user_ids(bad)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no user ids"):
        parse_user_ids(f"@{tmp_path / 'empty.txt'}")

    from pgen_engine.data.synth import SynthConfig, generate_synthetic

    ds = generate_synthetic(tmp_path / "ds", SynthConfig(num_users=6, num_items=20, seed=1))
    f.write_text("u0003\nu0001\n")
    out = tmp_path / "o"
    assert main(["generate", "--checkpoint", str(ckpt), "--data", str(ds), "--users", f"@{f}",
                 "--out", str(out), "--quiet", "--greedy"]) == 0
    assert [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()] == ["u0003", "u0001"]


def test_run_tokenizer_of_another_geometry_is_one_error(ckpt, posters, tmp_path, capsys):
    # used to fail every history line on its own: "history_codes must be [n, 16], got (1, 64)"
    import torch

    from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

    imgs = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    PatchKMeansTokenizer.fit(imgs, patch_size=4, codebook_size=8, iters=1, seed=0).save(tmp_path / "tokenizer.safetensors")
    rc = tmp_path / "config.resolved.yaml"
    rc.write_text(f"data:\n  history_mode: codes\n  tokenizer: patch_kmeans\n  work_dir: {tmp_path}\n")
    p = posters.parent / "m3.jsonl"
    p.write_text(_line("u", [0]) + "\n" + _line("v", [1]) + "\n")
    assert _run(ckpt, p, tmp_path / "o", "--run-config", str(rc)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "image tokenizer gives 64 codes per image from 8 entries" in err, err
    assert "expects 16 and 64" in err and not (tmp_path / "o").exists()
