import argparse

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
