import argparse
import json
import shutil

from pgen_engine.data.cli import main, register


def test_register_adds_data_command():
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    a = p.parse_args(["data", "validate", "x"])
    assert a.command == "data" and a.data_command == "validate"


def test_synth_validate_tokenize(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--users", "7", "--items", "19", "--out", str(out), "--seed", "2"]) == 0
    assert main(["data", "validate", str(out)]) == 0
    assert "users:         7" in capsys.readouterr().out
    rc = main(["data", "tokenize", str(out), "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "t.st"),
               "--fit", "--codebook-size", "9", "--patch-size", "8", "--iters", "2", "--quiet"])
    assert rc == 0 and (tmp_path / "c" / "index.json").is_file()
    rc = main(["data", "tokenize", str(out), "--out", str(tmp_path / "c2"), "--tokenizer", str(tmp_path / "t.st"),
               "--quiet"])
    assert rc == 0
    capsys.readouterr()
    # without --fit the loaded tokenizer (32 px, 4x4 codes of 8-px patches, 9 entries) decides:
    # matching flags are fine, a differing one is an error naming the flag and the file
    base = ["data", "tokenize", str(out), "--out", str(tmp_path / "c3"), "--tokenizer", str(tmp_path / "t.st"), "--quiet"]
    assert main(base + ["--image-size", "32", "--codebook", "9", "--codes-per-side", "4"]) == 0
    for flag, v in (("--image-size", "64"), ("--codebook", "16"), ("--codes-per-side", "8"), ("--patch-size", "4")):
        assert main(base + [flag, v]) == 2, flag
        err = capsys.readouterr().err
        assert f"{flag} {v} differs from the tokenizer" in err and "t.st" in err, err


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "none")]) == 1
    assert "UNUSABLE" in capsys.readouterr().out
    assert main(["data", "synth", "--users", "0", "--items", "3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgen data: error:") and err.count("\n") == 1
    assert main(["data", "convert", "--from", "microlens", "--out", str(tmp_path / "o")]) == 2
    assert "--interactions" in capsys.readouterr().err
    assert main(["data", "tokenize", str(tmp_path), "--out", str(tmp_path / "c"), "--tokenizer",
                 str(tmp_path / "missing.st")]) == 2


def test_tokenize_vq_fit_prints_quality_and_reuses(tmp_path, capsys):
    import re

    import torch

    out = tmp_path / "ds"
    assert main(["data", "synth", "--users", "7", "--items", "19", "--out", str(out), "--seed", "2"]) == 0
    capsys.readouterr()
    n = torch.get_num_threads()
    args = ["data", "tokenize", str(out), "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "vq.st"),
            "--fit", "--kind", "vq", "--image-size", "16", "--codes-per-side", "4", "--codebook", "16",
            "--max-steps", "2", "--train-batch-size", "2", "--threads", "1", "--quiet"]
    try:
        assert main(args) == 0
        first = capsys.readouterr().out.strip().splitlines()
        assert re.fullmatch(r"reconstruction PSNR: \d+\.\d\d dB, SSIM: -?\d\.\d{3} \(held-out 1 images\)", first[-1])
        assert any("codebook usage (held-out)" in ln for ln in first)
        assert any(ln.startswith("wrote vq tokenizer") for ln in first)
        assert main(args) == 0  # same images and settings: the tokenizer file is reused, nothing trained
        second = capsys.readouterr().out.strip().splitlines()
        assert any(ln.startswith("reusing vq tokenizer") for ln in second) and second[-1] == first[-1]
        # patch_kmeans prints the same line at the same code budget
        assert main(["data", "tokenize", str(out), "--out", str(tmp_path / "c2"), "--tokenizer",
                     str(tmp_path / "pk.st"), "--fit", "--kind", "patch_kmeans", "--image-size", "16",
                     "--codes-per-side", "4", "--codebook", "16", "--iters", "2", "--quiet"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("reconstruction PSNR: ")
        assert main(args[:-1] + ["--codes-per-side", "3"]) == 2
        assert "--codes-per-side" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n)


def test_tokenize_zero_or_negative_sizes_are_errors_not_defaults(tmp_path, capsys):
    # "--codebook 0" used to fall back to the 256 default and "--held-out -1" was accepted
    for flag, value in (("--codebook", "0"), ("--image-size", "0"), ("--held-out", "-1"), ("--iters", "0"),
                        ("--time-budget", "0"), ("--codes-per-side", "0")):
        rc = main(["data", "tokenize", str(tmp_path), "--out", str(tmp_path / "c"), "--tokenizer",
                   str(tmp_path / "t.st"), "--fit", flag, value])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"pgen data: error: {flag} must be") and value in err, (flag, err)
    assert not (tmp_path / "c").exists()


def test_tokenize_out_that_is_a_file_is_an_error_and_the_file_is_kept(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["data", "synth", "--users", "4", "--items", "9", "--out", str(ds)]) == 0
    f = tmp_path / "cache.txt"
    f.write_text("keep me")
    rc = main(["data", "tokenize", str(ds), "--out", str(f), "--tokenizer", str(tmp_path / "t.st"), "--fit",
               "--codebook", "4", "--patch-size", "8", "--iters", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cache.txt: exists and is not a folder" in err and err.count("\n") == 1
    assert f.read_text() == "keep me"


def test_tokenize_fit_with_on_error_skip_passes_over_a_corrupt_image(tmp_path, capsys):
    # --fit used to load every fit / held-out image strictly, so one corrupt poster failed the
    # run even with --on-error skip
    import json

    ds = tmp_path / "ds"
    assert main(["data", "synth", "--users", "6", "--items", "12", "--out", str(ds)]) == 0
    first = json.loads((ds / "items.jsonl").read_text().splitlines()[0])
    (ds / first["image"]).write_bytes(b"not an image")
    args = ["data", "tokenize", str(ds), "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "t.st"),
            "--fit", "--codebook", "4", "--patch-size", "8", "--iters", "1", "--held-out", "2", "--quiet"]
    assert main(args) == 2
    assert "corrupt or unreadable image" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip"]) == 0
    cap = capsys.readouterr()
    assert "1 skipped" in cap.out
    # one "warning:" line with the real reason (it used to add a second, Python-formatted warning
    # with its source line, saying the corrupt file's item had '"image": null')
    bad = ds / first["image"]
    assert cap.err == (f"warning: {tmp_path / 'c'}: skipped 1 item(s) with missing/corrupt images (first: {bad}: "
                       "corrupt or unreadable image (cannot identify image file " f"'{bad}'))\n"), cap.err
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert "corrupt or unreadable image" in index["skipped"][first["item_id"]]


def test_tokenize_fit_never_overwrites_a_file_that_is_not_a_tokenizer(tmp_path, capsys):
    # a mistyped --tokenizer (here the dataset's own items.jsonl) used to be overwritten by the fit
    ds = tmp_path / "ds"
    assert main(["data", "synth", "--users", "4", "--items", "9", "--out", str(ds)]) == 0
    before = (ds / "items.jsonl").read_bytes()
    base = ["data", "tokenize", str(ds), "--out", str(tmp_path / "c"), "--fit", "--codebook", "4", "--patch-size", "8",
            "--iters", "1", "--quiet"]
    assert main(base + ["--tokenizer", str(ds / "items.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "items.jsonl: exists and is not a patch_kmeans tokenizer file" in err and "not overwriting" in err, err
    assert (ds / "items.jsonl").read_bytes() == before
    assert main(base + ["--tokenizer", str(ds)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(base + ["--tokenizer", str(tmp_path / "t.st")]) == 0  # a new path, then the same one again: reused
    assert main(base + ["--tokenizer", str(tmp_path / "t.st")]) == 0
    assert "reusing" in capsys.readouterr().out


def test_tokenize_fit_refuses_an_unusable_item_image_before_fitting(tmp_path, capsys):
    # an item the fit never loads (no interactions, outside the held-out set) with a corrupt image,
    # or an item without one, used to fail only in the token cache after the fit (minutes for
    # --kind vq), leaving the tokenizer file behind
    ds = tmp_path / "ds"
    assert main(["data", "synth", "--users", "6", "--items", "12", "--out", str(ds)]) == 0
    first = json.loads((ds / "items.jsonl").read_text().splitlines()[0])
    shutil.copy(ds / first["image"], ds / "images" / "unused_good.png")
    (ds / "images" / "unused_bad.png").write_bytes(b"not an image")
    items = (ds / "items.jsonl").read_text()
    tok = tmp_path / "t.st"
    args = ["data", "tokenize", str(ds), "--out", str(tmp_path / "c"), "--tokenizer", str(tok), "--fit",
            "--codebook", "4", "--patch-size", "8", "--iters", "1", "--held-out", "1", "--quiet"]
    for bad, needle in (("images/unused_bad.png", "unused_bad.png: corrupt or unreadable image"),
                        (None, "1 item(s) have no image")):
        extra = [{"item_id": "unused_good", "title": "", "image": "images/unused_good.png"},
                 {"item_id": "unused_bad", "title": "", "image": bad}]
        (ds / "items.jsonl").write_text(items + "".join(json.dumps(o) + "\n" for o in extra))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not tok.exists() and not (tmp_path / "c").exists()
    assert main(args + ["--on-error", "skip"]) == 0
    cap = capsys.readouterr()
    assert "1 skipped" in cap.out and cap.err.startswith("warning: ") and "skipped 1 item" in cap.err
