"""`pgen generate`: PNGs + manifest, batch-size independence, invalid lines reported by number."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pgen_engine.cli import main


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_generate_writes_pngs_and_manifest(tiny_ckpt, tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", [
        json.dumps({"id": "red shoes", "prompt": "red shoes, size 9"}),
        "",
        json.dumps({"id": 7, "input_ids": [1, 40, 41, 42, 3]}),
        json.dumps({"id": "c", "prompt": "x"}),
    ])
    common = ["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--num-samples", "2",
              "--guidance-scale", "3", "--top-k", "20", "--seed", "11", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "a"), "--batch-size", "3"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"], r["line"]) for r in rows] == [
        ("red shoes", 0, 1), ("red shoes", 1, 1), ("7", 0, 3), ("7", 1, 3), ("c", 0, 4), ("c", 1, 4)]
    assert rows[0]["prompt"] == "red shoes, size 9" and "prompt" not in rows[2]
    assert rows[0]["num_prompt_tokens"] == len("red shoes, size 9".encode()) + 2
    size = None
    for r in rows:
        img = np.asarray(Image.open(tmp_path / "a" / r["file"]))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        size = size or img.shape
        assert img.shape == size
    assert not list((tmp_path / "a").glob(".*.tmp"))  # atomic writes leave no temporaries
    # a different batch size gives the same images (seeds depend on the line, not the batch)
    assert main(common + ["--out", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    for r in rows:
        a = np.asarray(Image.open(tmp_path / "a" / r["file"]))
        b = np.asarray(Image.open(tmp_path / "b" / r["file"]))
        assert np.array_equal(a, b), r["file"]
    # the continuous-batching scheduler writes the same images
    assert main(common + ["--out", str(tmp_path / "c"), "--batch-size", "2", "--scheduler", "continuous"]) == 0
    for r in rows:
        a = np.asarray(Image.open(tmp_path / "a" / r["file"]))
        c = np.asarray(Image.open(tmp_path / "c" / r["file"]))
        assert np.array_equal(a, c), r["file"]


def test_invalid_lines_are_reported_by_line_number(tiny_ckpt, tmp_path, capsys):
    prompts = _write(tmp_path / "bad.jsonl", [
        json.dumps({"id": "ok", "prompt": "fine"}),
        "{not json",
        json.dumps({"id": "ok", "prompt": "again"}),
        json.dumps({"id": "big", "input_ids": [1, 10 ** 6, 3]}),
        json.dumps({"id": "none"}),
        json.dumps(["a list"]),
        json.dumps({"id": "both", "prompt": "x", "input_ids": [1, 3]}),
    ])
    rc = main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--out",
               str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    for line in (2, 3, 4, 5, 6, 7):
        assert f"bad.jsonl:{line}:" in err, err
    assert "bad.jsonl:1:" not in err
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_missing_prompts_file_and_bad_args(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "o"), "--quiet"]) != 0
    assert "does not exist" in capsys.readouterr().err
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(p), "--out", str(tmp_path / "o"),
                 "--num-samples", "0", "--quiet"]) != 0
    assert "--num-samples" in capsys.readouterr().err
