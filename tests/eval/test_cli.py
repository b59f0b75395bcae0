"""`pgen eval` end to end on a tiny checkpoint, and its one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pgen_engine.cli import main
from pgen_engine.eval.cli import is_independent

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_pgen_eval_with_baselines_writes_report_json(tmp_path, capsys):
    from pgen_engine.data.dataset import load_dataset, load_image
    from pgen_engine.data.synth import SynthConfig, generate_synthetic
    from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
    from pgen_engine.models.tiny import make_tiny_checkpoint

    generate_synthetic(tmp_path / "ds", SynthConfig(num_users=8, num_items=30, seed=1))
    ds = load_dataset(tmp_path / "ds")
    imgs = torch.stack([torch.from_numpy(load_image(it.image_path, 32)) for it in ds.items.values()])
    tok = PatchKMeansTokenizer.fit(imgs, patch_size=16, codebook_size=64, iters=3, seed=0)
    tok.save(tmp_path / "tok.safetensors")
    ck = make_tiny_checkpoint(tmp_path / "run" / "final", image_size=32, patch_size=16, codebook_size=64)
    rc = main(["eval", "--checkpoint", str(ck), "--data", str(tmp_path / "ds"), "--num-images", "2",
               "--tokenizer", str(tmp_path / "tok.safetensors"), "--baselines", "--quiet", "--embedder", "pixel_stats",
               "--out", str(tmp_path / "ev"), "--name", "tiny"])
    assert rc == 0
    out = capsys.readouterr().out
    for row in ("random", "centroid", "popularity", "copy_last", "repeat_last", "retrieve", "true_next", "generate_nonpersonal",
                "tiny"):
        assert f"| {row} |" in out
    res = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert list(res) == ["dataset", "seeds", "users", "images_per_user", "evaluator", "systems", "paired"]
    assert res["users"] == 8 and 0 <= res["systems"]["tiny"]["attr_acc_future"]["mean"] <= 1
    assert "tiny - copy_last" in res["paired"] and "tiny - generate_nonpersonal" in res["paired"]
    assert (tmp_path / "ev" / "report.md").is_file() and (tmp_path / "ev" / "report.html").is_file()


def test_independence_rule():
    assert is_independent({"type": "pixel_stats"}, {"type": "eval_cnn"})
    assert not is_independent({"type": "pixel_stats"}, {"type": "pixel_stats"})
    assert not is_independent({"type": "clip", "path": "/m"}, {"type": "clip:/m"})
    assert is_independent({"type": "clip", "path": "/m"}, {"type": "pixel_stats"})
    assert is_independent(None, {"type": "pixel_stats"})
    # the learned reward CNN (trained into the run's work dir, no path in the run config) is not the evaluator
    assert is_independent({"type": "cocons_cnn"}, {"type": "eval_cnn"})
    assert not is_independent({"type": "cocons_cnn"}, {"type": "cocons_cnn:/w/reward_embedder"})
    assert not is_independent({"type": "cocons_cnn", "path": "/w/r"}, {"type": "cocons_cnn:/w/r"})


def test_pgen_eval_bad_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pgen_engine", "eval", "--checkpoint", str(tmp_path / "nope"),
                        "--data", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_pgen_eval_bad_flag_values_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
    # --num-images 0 used to fail as "max_batch_size must be ...", --batch-prompts 0 as
    # "range() arg 3 must not be zero", --max-users 0 / -1 ran; an --out file failed after the work
    import pgen_engine.eval.cli as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    f = tmp_path / "report.txt"
    f.write_text("keep")
    base = ["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]
    for extra, expect in ((["--num-images", "0"], "--num-images must be >= 1, got 0"),
                          (["--batch-prompts", "0"], "--batch-prompts must be >= 1, got 0"),
                          (["--max-users", "-1"], "--max-users must be >= 1, got -1"),
                          (["--evaluator-steps", "0"], "--evaluator-steps must be >= 1, got 0"),
                          (["--out", str(f)], "exists and is not a directory")):
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen eval: error: ") and expect in err and err.count("\n") == 1, err
    assert f.read_text() == "keep"


def test_pgen_demo_bad_seeds_and_max_users_are_one_line(monkeypatch, capsys):
    # "--seeds a,b" used to say only "invalid literal for int() ...", "--max-users 0/-3" and
    # repeated seeds ran
    import pgen_engine.eval.cli as C

    monkeypatch.setattr(C, "run_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    for extra, expect in ((["--seeds", "a,b"], "--seeds 'a,b': expected comma-separated integers"),
                          (["--seeds", "1,1"], "--seeds '1,1': a seed is repeated"),
                          (["--max-users", "0"], "--max-users must be >= 1, got 0")):
        assert main(["demo", "--quiet", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen demo: error: ") and expect in err and err.count("\n") == 1, err


def test_pgen_demo_bad_seed_and_out_fail_before_any_run(monkeypatch, capsys, tmp_path):
    # "--seeds 0,-2" used to train seed 0 (SFT + RL) and then stop naming configs/demo_sft.yaml,
    # "--seed -1" named the config file rather than the flag, "--out FILE" said only "[Errno 17] File exists"
    import pgen_engine.eval.cli as C

    monkeypatch.setattr(C, "run_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    f = tmp_path / "file.txt"
    f.write_text("keep")
    for extra, expect in ((["--seeds", "0,-2"], "--seeds -2: expected a seed in [0, 2**63 - 1]"),
                          (["--seed", "-1"], "--seed -1: expected a seed in [0, 2**63 - 1]"),
                          (["--seed", str(2 ** 63)], f"--seed {2 ** 63}: expected a seed"),
                          (["--out", str(f)], f"--out {f}: exists and is not a folder")):
        assert main(["demo", "--quiet", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pgen demo: error: ") and expect in err and err.count("\n") == 1, err
    assert f.read_text() == "keep"


def test_reward_embedder_spec_of_a_broken_run_config_is_one_line(tmp_path):
    # used to raise PyYAML's multi-line ScannerError/ParserError traceback
    import pytest

    from pgen_engine.eval.cli import _reward_embedder_spec

    (tmp_path / "final").mkdir()
    (tmp_path / "config.resolved.yaml").write_text("stage: rl\nrl: [\n")
    with pytest.raises(ValueError, match=r"config\.resolved\.yaml: line 3 unreadable run config") as e:
        _reward_embedder_spec(tmp_path / "final")
    assert "\n" not in str(e.value)
    (tmp_path / "config.resolved.yaml").write_text("stage: rl\nrl: {embedder: {type: pixel_stats}}\n")
    assert _reward_embedder_spec(tmp_path / "final") == {"type": "pixel_stats"}


def test_default_token_cache_dir_is_never_inside_the_checkpoint(tmp_path, monkeypatch):
    from pathlib import Path

    from pgen_engine.eval.cli import default_token_cache_dir

    fp = "ab" * 20
    assert default_token_cache_dir(tmp_path / "ds", fp, tmp_path / "ev") == tmp_path / "ev" / f"token_cache_{fp[:16]}"
    monkeypatch.setenv("PGEN_CACHE_DIR", str(tmp_path / "cache"))
    a = default_token_cache_dir(tmp_path / "ds", fp, None)
    b = default_token_cache_dir(tmp_path / "other", fp, None)
    assert a.parent == tmp_path / "cache" and a.name.startswith(f"token_cache_{fp[:16]}_")
    assert a != b  # two datasets with one tokenizer do not rebuild each other's cache
    monkeypatch.delenv("PGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_token_cache_dir(tmp_path / "ds", fp, None).parent == Path(tmp_path / "xdg" / "pgen_engine")


def test_default_row_name_follows_the_runs_stage(tmp_path):
    from pgen_engine.eval.cli import default_system_name

    ck = tmp_path / "run" / "final"
    ck.mkdir(parents=True)
    assert default_system_name(ck) == "generate"  # no run config: a foreign checkpoint
    for stage, name in (("sft", "generate_sft"), ("rl", "generate_sft_rl")):
        (tmp_path / "run" / "config.resolved.yaml").write_text(f"stage: {stage}\n")
        assert default_system_name(ck) == name
    other = tmp_path / "other.yaml"
    other.write_text("stage: sft\n")
    assert default_system_name(ck, str(other)) == "generate_sft"  # --run-config wins
    (ck / "pgen_training.json").write_text('{"stage": "rl", "history_mode": "codes"}')
    assert default_system_name(ck, str(other)) == "generate_sft_rl"  # the checkpoint's own record wins
    (ck / "pgen_training.json").unlink()
    (tmp_path / "run" / "config.resolved.yaml").write_text("stage: [unclosed\n")
    with pytest.raises(ValueError, match="unreadable run config"):
        default_system_name(ck)


def test_a_row_name_taken_by_a_baseline_is_refused(tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path), "--name", "copy_last"])
    assert rc != 0
    assert "--name copy_last" in capsys.readouterr().err


def test_retrieve_ranks_with_the_rl_runs_reward_embedder_and_the_split_follows_the_run(tmp_path, monkeypatch, capsys):
    # pgen eval ranked `retrieve` with pixel statistics for every run, while pgen demo (and the
    # README) rank it with the reward-side embedder; it also split with min_interactions=5
    # whatever the run had trained with
    from pgen_engine.config import dump_config, load_config
    from pgen_engine.eval import cli as C
    from pgen_engine.eval.evaluate import PromptSettings

    from pgen_engine.models.tiny import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "run" / "final")
    run = load_config(REPO / "configs" / "demo_rl.yaml", [f"data.work_dir={tmp_path / 'work'}",
                                                         "data.min_interactions=7", "data.history_k=3"])
    (tmp_path / "run" / "config.resolved.yaml").write_text(dump_config(run))
    seen = []

    def fake(spec):
        seen.append(spec)
        if spec["type"] == "cocons_cnn":
            return "reward-cnn"
        return "pixels"

    monkeypatch.setattr(C, "make_embedder", fake)
    emb, spec = C._reference_embedder(ck)
    assert emb == "reward-cnn" and spec == {**run.rl.embedder, "path": str(tmp_path / "work" / "reward_embedder")}

    def missing(spec):
        if spec["type"] == "cocons_cnn":
            raise FileNotFoundError(f"{spec['path']}: no reward embedder")
        return "pixels"

    monkeypatch.setattr(C, "make_embedder", missing)
    assert C._reference_embedder(ck) == ("pixels", {"type": "pixel_stats"})
    assert "note: retrieve ranks with pixel statistics" in capsys.readouterr().out
    (tmp_path / "run" / "config.resolved.yaml").write_text(dump_config(load_config(REPO / "configs" / "demo_sft.yaml")))
    assert C._reference_embedder(ck) == ("pixels", {"type": "pixel_stats"})  # an SFT run has no reward

    (tmp_path / "run" / "config.resolved.yaml").write_text(dump_config(run))
    monkeypatch.setattr("pgen_engine.eval.evaluate.run_tokenizer_file", lambda run: None)
    s = PromptSettings.for_checkpoint(ck)
    assert (s.min_interactions, s.history_k) == (7, 3)
    assert (C._run_data(ck).min_interactions, C._run_data(ck).history_k) == (7, 3)
