"""Trainer entry checks that need no data or engine."""
from __future__ import annotations

from pathlib import Path

import pytest

from pgen_engine.config import ConfigError, load_config
from pgen_engine.training.stages import run_stage

REPO = Path(__file__).resolve().parents[2]


def test_output_dir_that_is_a_file_is_a_config_error_before_any_work(tmp_path):
    # used to fail with a FileExistsError traceback from mkdir
    f = tmp_path / "run.txt"
    f.write_text("keep me")
    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"output_dir={f}",
                                                           f"data.dataset_dir={tmp_path / 'no_data'}"])
    with pytest.raises(ConfigError, match=r"output_dir=.*run\.txt: exists and is not a folder"):
        run_stage(cfg)
    assert f.read_text() == "keep me" and not (tmp_path / "no_data").exists()


@pytest.mark.parametrize("key,sub,match", [
    # output_dir under a file used to end in a NotADirectoryError traceback from mkdir; data.work_dir a
    # file in "error: [Errno 17] File exists: ..." (no key named) and, at exit, an abort (status 134)
    ("output_dir", "run.txt/sub", r"output_dir=.*run\.txt/sub: cannot be created: .*run\.txt is a file, not a folder"),
    ("data.work_dir", "run.txt", r"data\.work_dir=.*run\.txt: exists and is not a folder \(expected the run's data "
                                 r"work folder\)"),
    ("data.work_dir", "run.txt/a/b", r"data\.work_dir=.*run\.txt/a/b: cannot be created: .*run\.txt is a file"),
])
def test_output_folders_that_cannot_be_made_are_config_errors_before_any_work(tmp_path, key, sub, match):
    f = tmp_path / "run.txt"
    f.write_text("keep me")
    paths = {"output_dir": tmp_path / "out", "data.work_dir": tmp_path / "work", key: tmp_path / sub}
    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"{k}={v}" for k, v in paths.items()]
                      + [f"data.dataset_dir={tmp_path / 'no_data'}"])
    with pytest.raises(ConfigError, match=match):
        run_stage(cfg)
    assert f.read_text() == "keep me"
    assert not (tmp_path / "no_data").exists() and not (tmp_path / "out").exists()


def test_fresh_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(tmp_path):
    # a run without --resume used to start over there: config.resolved.yaml was rewritten at once
    # (the old final/ then described by the new settings) and new checkpoints mixed with the old ones
    import subprocess
    import sys

    out = tmp_path / "run"
    (out / "checkpoints" / "step00000005").mkdir(parents=True)
    (out / "checkpoints" / "step00000005" / "pgen_checkpoint.json").write_text("{}")
    (out / "config.resolved.yaml").write_text("the old run's config\n")
    from tests.training.test_deepspeed_2rank import _env  # without the process-group variables of other tests

    env = {**_env(), "PGEN_PLAN": "0"}
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "demo_sft.yaml"),
                        f"output_dir={out}", f"data.dataset_dir={tmp_path / 'no_data'}", "logging.progress=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"output_dir={out} already holds a training run" in errors[0] and "--resume auto" in errors[0]
    assert (out / "config.resolved.yaml").read_text() == "the old run's config\n"
    assert not (tmp_path / "no_data").exists()


def test_train_takes_overrides_before_and_after_resume():
    # `train.py --config C a=1 --resume auto b=2` used to stop with "unrecognized arguments: b=2"
    import train

    args = train.parse_args(["--config", "c.yaml", "train.max_steps=3", "--resume", "auto", "output_dir=/tmp/r"])
    assert args.resume == "auto" and args.overrides == ["train.max_steps=3", "output_dir=/tmp/r"]
    args = train.parse_args(["--local_rank=0", "--config", "c.yaml", "output_dir=/tmp/r"])  # the deepspeed launcher
    assert args.local_rank == 0 and args.overrides == ["output_dir=/tmp/r"] and args.resume is None


def test_train_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    # Ctrl-C mid-run used to print DeepSpeed's / autograd's whole traceback
    import train
    from pgen_engine.training import stages

    def interrupted(cfg, resume=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_stage", interrupted)
    rc = train.main(["--config", str(REPO / "configs" / "demo_sft.yaml"), f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(err) == 1 and err[0].startswith("error: interrupted") and "--resume auto" in err[0]


def test_output_dir_that_cannot_be_written_is_a_config_error_before_any_work(tmp_path, monkeypatch):
    # what folder_problem cannot foresee (a read-only or virtual file system): rank 0's failure
    # reaches every rank (broadcast), so no rank waits for it in a later collective
    from pgen_engine.training import trainer

    def read_only(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trainer, "atomic_write_text", read_only)
    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"output_dir={tmp_path / 'out'}",
                                                           f"data.dataset_dir={tmp_path / 'no_data'}"])
    with pytest.raises(ConfigError, match=r"output_dir=.*out: cannot be created or written \(Permission denied\)"):
        run_stage(cfg)
    assert not (tmp_path / "no_data").exists()
