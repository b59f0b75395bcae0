"""`pgen generate`: PNGs + manifest, batch-size independence, invalid lines reported by number."""
from __future__ import annotations

import json
import os

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


def test_one_bad_line_or_user_is_one_error_line(tiny_ckpt, tmp_path, capsys):
    # was two lines: "pgen generate: error: 1 invalid prompt line(s):" and the problem below it
    prompts = _write(tmp_path / "bad.jsonl", [json.dumps({"id": "none"})])
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pgen generate: error: {prompts}:1: exactly one of 'prompt'"), err


def test_missing_prompts_file_and_bad_args(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "o"), "--quiet"]) != 0
    assert "does not exist" in capsys.readouterr().err
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(p), "--out", str(tmp_path / "o"),
                 "--num-samples", "0", "--quiet"]) != 0
    assert "--num-samples" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# bad input: every message names the file / line / flag and what was expected

import shutil  # noqa: E402

import pytest  # noqa: E402

from pgen_engine.data.text_tokenizer import ByteTokenizer  # noqa: E402
from pgen_engine.generation.cli import read_prompts  # noqa: E402
from pgen_engine.models.special_tokens import SpecialTokens  # noqa: E402

SPECIAL = SpecialTokens.builtin()


def _read(path, **kw):
    return read_prompts(path, ByteTokenizer(SPECIAL), SPECIAL, 300, **kw)


def _errors(path, **kw):
    with pytest.raises(ValueError) as e:
        _read(path, **kw)
    return str(e.value)


def test_bom_and_crlf_are_accepted(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "x"}).encode() + b"\r\n\r\n"
                  + json.dumps({"id": "b", "prompt": "y"}).encode() + b"\r\n")
    got = _read(p)
    assert [(x.id, x.line, x.text) for x in got] == [("a", 1, "x"), ("b", 3, "y")]


def test_undecodable_and_odd_lines_are_reported_by_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"id": "ok", "prompt": "fine"}).encode(),
        b'{"id": "latin1", "prompt": "caf\xe9"}',                         # 2: not UTF-8
        b"[" * 100_000 + b"]" * 100_000,                                  # 3: nested too deeply
        b'{"id": "s", "prompt": "\\ud800"}',                              # 4: lone surrogate
        b'{"id": "a", "id": "b", "prompt": "x"}',                         # 5: duplicate key
        json.dumps({"id": "h", "prompt": "x", "history": ["i.png"]}).encode(),  # 6: unknown field
        json.dumps({"id": "  ", "prompt": "x"}).encode(),                 # 7: blank id
        json.dumps({"id": "\ud800", "prompt": "x"}).encode(),             # 8: id not encodable
        json.dumps({"id": "img", "input_ids": [1] + [5] * 16 + [3]}).encode(),  # 9: image placeholders
        json.dumps({"id": "noboi", "input_ids": [1, 40, 41]}).encode(),    # 10: does not end with <boi>
        json.dumps({"id": "long", "prompt": "x" * 100}).encode(),         # 11: too long for the model
        json.dumps({"id": "ok2", "prompt": "x" * 10}).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    err = _errors(p, max_positions=66, num_image_tokens=16)
    for n, what in [(2, "UTF-8"), (3, "nested"), (4, "UTF-8"), (5, "duplicate key 'id'"), (6, "'history'"),
                    (7, "'id'"), (8, "UTF-8"), (9, "placeholder"), (10, "<boi>"), (11, "50")]:
        row = [r for r in err.splitlines() if r.startswith(f"{p}:{n}:")]
        assert len(row) == 1 and what in row[0], (n, err)
    assert f"{p}:1:" not in err and f"{p}:12:" not in err
    assert "11 invalid" not in err and "10 invalid prompt line(s)" in err


def test_prompts_path_is_a_directory_or_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        _read(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file"):  # used to say "does not exist"
        _read(tmp_path / "fifo")


def _gen(ckpt, prompts, out, *extra):
    return main(["generate", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--quiet",
                 "--guidance-scale", "1", *extra])


def test_unsafe_long_and_unicode_ids_get_safe_distinct_file_names(tiny_ckpt, tmp_path):
    ids = ["../x", "a/b", "a_b", "z" * 400, "日本", "中国", "é" * 300, "A", "a", "manifest"]
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": i, "prompt": "x"}) for i in ids])
    out = tmp_path / "o"
    assert _gen(tiny_ckpt, p, out) == 0
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ids
    files = [r["file"] for r in rows]
    assert len({f.casefold() for f in files}) == len(ids)  # distinct even on case-insensitive disks
    for f in files:
        assert "/" not in f and not f.startswith(".") and len(f.encode()) <= 128 and f.endswith(".png"), f
        assert (out / f).is_file()
    assert sorted(x.name for x in out.iterdir()) == sorted(files + ["manifest.jsonl"])


@pytest.fixture()
def no_model_load(monkeypatch):
    """Flag checks must come before the (slow) model load."""
    import pgen_engine.models as models

    def fail(*a, **k):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")
    monkeypatch.setattr(models, "load_model", fail)


@pytest.mark.parametrize("flag,value,expect", [
    ("--num-samples", "-1", ">= 1"),
    ("--batch-size", "0", ">= 1"),
    ("--guidance-scale", "nan", "finite"),
    ("--guidance-scale", "inf", "finite"),
    ("--temperature", "0", "--greedy"),
    ("--temperature", "-1", "> 0"),
    ("--temperature", "inf", "finite"),
    ("--top-p", "1.5", "(0, 1]"),
    ("--top-p", "0", "(0, 1]"),
    ("--top-p", "nan", "(0, 1]"),
    ("--top-k", "-1", ">= 0"),
    ("--seed", str(2 ** 64), "64-bit"),
    ("--seed", str(-(2 ** 63) - 1), "64-bit"),
    ("--device", "banana", "device"),
    ("--device", "meta", "no weights"),  # used to load the model, then fail in torch's meta kernels
])
def test_invalid_flags_are_refused_up_front(tiny_ckpt, tmp_path, capsys, no_model_load, flag, value, expect):
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(p), "--out", str(tmp_path / "o"),
                 "--quiet", flag, value]) == 1
    err = capsys.readouterr().err
    assert flag in err and expect in err and value in err, err
    assert not (tmp_path / "o").exists()


def test_unavailable_cuda_device_is_a_clear_error(tiny_ckpt, tmp_path, capsys, no_model_load, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(p), "--out", str(tmp_path / "o"),
                 "--quiet", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device" in err and "CUDA" in err, err


def test_seed_extremes_are_accepted_and_recorded(tiny_ckpt, tmp_path):
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    for seed in (-(2 ** 63), 2 ** 64 - 1):
        out = tmp_path / f"o{seed}"
        assert _gen(tiny_ckpt, p, out, "--seed", str(seed)) == 0
        assert json.loads((out / "manifest.jsonl").read_text())["base_seed"] == seed


def test_bad_out_paths(tiny_ckpt, tmp_path, capsys, no_model_load):
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    f = tmp_path / "file.txt"
    f.write_text("keep")
    for out, expect in [(f, "not a directory"), (f / "sub", "not a directory"), (p, "not a directory"),
                        (tiny_ckpt, "checkpoint")]:
        assert _gen(tiny_ckpt, p, out) == 1
        err = capsys.readouterr().err
        assert "--out" in err and expect in err and str(out) in err, err
    assert f.read_text() == "keep"
    assert not list(tiny_ckpt.glob("*.png"))



def test_bad_grid_paths_fail_before_generating(tiny_ckpt, tmp_path, capsys, no_model_load):
    # a folder used to fail only after generating ("[Errno 21] Is a directory: '.tmp' -> ...");
    # the prompts file itself used to be overwritten by the grid PNG
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    before = p.read_bytes()
    for grid, expect in [(tmp_path, "is a directory"), (p, "would overwrite the prompts file")]:
        assert _gen(tiny_ckpt, p, tmp_path / "o", "--grid", str(grid)) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen generate: error: --grid") and expect in err and str(grid) in err, err
    assert p.read_bytes() == before and not (tmp_path / "o").exists()


def test_checkpoint_whose_context_cannot_hold_the_image_is_refused(tiny_ckpt, tmp_path, capsys, no_model_load):
    # used to report every prompt as too long, "at most -8 prompt tokens"
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 8
    (ck / "config.json").write_text(json.dumps(cfg))
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert _gen(ck, p, tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "max_position_embeddings=8 leaves no room for a prompt before the 16 image tokens" in err, err
    assert not (tmp_path / "o").exists()


def test_folder_named_like_an_output_stops_before_anything_moves(tiny_ckpt, tmp_path, capsys):
    # used to publish 1_0.png, then fail on 1_1.png ("[Errno 21] Is a directory"): a half-written --out
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    out = tmp_path / "o"
    (out / "1_1.png").mkdir(parents=True)
    assert _gen(tiny_ckpt, p, out, "--num-samples", "2") == 1
    err = capsys.readouterr().err
    assert "'1_1.png' there is not a file" in err and "nothing was written" in err, err
    assert sorted(x.name for x in out.iterdir()) == ["1_1.png"]

def test_unwritable_out_fails_before_generating(tiny_ckpt, tmp_path, capsys, no_model_load, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", k.get("dir"))
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert _gen(tiny_ckpt, p, tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "--out" in err and "not writable" in err and str(tmp_path / "o") in err, err


def _snapshot(d):
    return {x.name: x.read_bytes() for x in d.iterdir()}


@pytest.mark.parametrize("exc,rc", [(RuntimeError("boom"), 1), (KeyboardInterrupt(), 130)])
def test_failure_midway_keeps_earlier_results(tiny_ckpt, tmp_path, monkeypatch, capsys, exc, rc):
    from pgen_engine.generation.generator import Generator

    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": i, "prompt": f"p{i}"}) for i in "abc"])
    out = tmp_path / "o"
    assert _gen(tiny_ckpt, p, out, "--seed", "1", "--batch-size", "1") == 0
    before = _snapshot(out)
    assert len(before) == 4

    calls = []
    real = Generator.generate

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(self, *a, **k)
    monkeypatch.setattr(Generator, "generate", flaky)
    # a different seed: had the first batch's PNG replaced the old one, the bytes would differ
    assert _gen(tiny_ckpt, p, out, "--seed", "2", "--batch-size", "1") == rc
    assert len(calls) == 2
    assert _snapshot(out) == before  # no half-written or replaced file, no leftover temporaries
    monkeypatch.setattr(Generator, "generate", real)
    # re-running is safe: the same command gives the same outputs
    assert _gen(tiny_ckpt, p, out, "--seed", "1", "--batch-size", "1") == 0
    assert _snapshot(out) == before


def test_write_failure_while_publishing_leaves_no_temporaries(tiny_ckpt, tmp_path, monkeypatch):
    import pgen_engine.io_utils as io_utils

    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": "a", "prompt": "x"})])
    out = tmp_path / "o"
    assert _gen(tiny_ckpt, p, out) == 0
    before = _snapshot(out)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(io_utils, "atomic_write_bytes", full)
    assert _gen(tiny_ckpt, p, out, "--seed", "5") == 1
    assert _snapshot(out) == before  # the new PNG (another seed) was not moved in next to the old manifest


def test_interrupt_while_moving_outputs_into_place_keeps_earlier_results(tiny_ckpt, tmp_path, monkeypatch):
    # Ctrl-C between the renames into --out left some new PNGs next to the old manifest.jsonl,
    # which then described images it had not produced (other seed)
    import pgen_engine.generation.output_dir as output_dir

    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": i, "prompt": f"p{i}"}) for i in "abc"])
    out = tmp_path / "o"
    assert _gen(tiny_ckpt, p, out, "--seed", "1") == 0
    before = _snapshot(out)
    real, moved = os.replace, []

    def interrupted(src, dst):
        if os.path.dirname(os.fspath(dst)) == str(out) and \
                os.path.basename(os.path.dirname(os.fspath(src))).startswith(".pgen-generate."):  # new output in
            moved.append(dst)
            if len(moved) == 2:
                raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(output_dir.os, "replace", interrupted)
    assert _gen(tiny_ckpt, p, out, "--seed", "2") == 130
    monkeypatch.setattr(output_dir.os, "replace", real)
    assert len(moved) == 2 and _snapshot(out) == before


def test_bad_tokenizer_file_names_the_checkpoint(tiny_ckpt, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "tokenizer.json").write_text("{oops")
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert _gen(ck, p, tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert str(ck) in err and "tokenizer" in err, err


def test_prompt_longer_than_the_model_context(tiny_ckpt, tmp_path, capsys):
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x" * 1100})])
    assert _gen(tiny_ckpt, p, tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "p.jsonl:1:" in err and "max_position_embeddings" in err and "1024" in err, err


def test_overflowing_model_is_refused_not_written_as_garbage(tiny_ckpt, tmp_path, capsys):
    """Finite weights whose activations overflow: greedy decoding used to write PNGs from NaN logits."""
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    sd = load_file(ck / "model.safetensors")
    for k in sd:
        if k.startswith("model.language_model.layers.") and k.endswith("proj.weight"):
            sd[k] = sd[k] * 1e30
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    assert _gen(ck, p, tmp_path / "o", "--greedy") == 1
    err = capsys.readouterr().err
    assert "NaN" in err and "p.jsonl" not in err and "line 1" in err, err
    assert not (tmp_path / "o").exists()


def test_absurd_num_samples_names_the_flag_and_writes_nothing(tiny_ckpt, tmp_path, capsys):
    # used to print the CPU allocator's own message ("DefaultCPUAllocator: can't allocate memory")
    p = _write(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "x"})])
    out = tmp_path / "out"
    assert _gen(tiny_ckpt, p, out, "--num-samples", str(2 ** 50)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pgen generate: error: --num-samples {2 ** 50} with --batch-size 8: ") and "\n" not in err
    assert "could not be allocated" in err and "no image was written" in err
    assert not out.exists()
