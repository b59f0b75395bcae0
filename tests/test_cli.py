"""The `pgen` command: help, info, clear one-line errors with non-zero exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from pgen_engine.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "info" in out


def test_info_reports_geometry(tiny_ckpt, tiny_model, capsys):
    assert main(["info", str(tiny_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == tiny_model.num_parameters()
    assert info["image_tokens_per_image"] == tiny_model.num_image_tokens
    assert info["image_size"] == tiny_model.image_size
    assert info["image_codebook_size"] == tiny_model.codebook_size
    assert list(info["stored_dtypes"]) == ["F32"] and info["stored_dtypes"]["F32"] > 0


def test_info_reports_the_stored_dtype_of_a_bf16_checkpoint(tiny_ckpt, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    ck = tmp_path / "bf16"
    shutil.copytree(tiny_ckpt, ck)
    for f in ck.glob("*.safetensors"):  # the same weights saved in bfloat16, as Janus-Pro ships
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
    assert main(["info", str(ck), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["stored_dtypes"]
    assert list(stored) == ["BF16"] and stored["BF16"] > 0


def test_info_bad_path_exits_nonzero_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pgen_engine", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "not a directory" in lines[0]


def test_debug_flag_reraises_with_traceback(tmp_path):
    """Without --debug a user error is one line; with it the exception propagates."""
    import pytest

    from pgen_engine.models.janus_config import CheckpointError

    assert main(["info", str(tmp_path / "missing")]) == 1
    with pytest.raises(CheckpointError, match="not a directory"):
        main(["--debug", "info", str(tmp_path / "missing")])


def test_info_non_janus_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = subprocess.run([sys.executable, "-m", "pgen_engine", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "model_type" in r.stderr and "Traceback" not in r.stderr


def test_info_on_a_training_run_points_at_final(tmp_path, tiny_ckpt, capsys):
    import shutil

    shutil.copytree(tiny_ckpt, tmp_path / "run" / "final")
    assert main(["info", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "run" / "final") in err, err


def test_generate_user_errors_have_no_traceback(tmp_path, tiny_ckpt):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "x", "colour": "red"}) + "\n{oops\n")
    r = subprocess.run([sys.executable, "-m", "pgen_engine", "generate", "--checkpoint", str(tiny_ckpt), "--prompts",
                        str(p), "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{p}:1: unknown field(s) 'colour'" in r.stderr and f"{p}:2: not valid JSON" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- pgen plan
def test_plan_cli_exit_codes(capsys):
    """0 when the run fits, 3 when it does not, 2 with one line on a bad key."""
    import re

    from tests.conftest import REPO

    demo = str(REPO / "configs" / "demo_sft.yaml")
    assert main(["plan", "--config", demo, "--gpus", "2", "train.micro_batch_size=8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"peak per GPU: \d+\.\d GiB of 80\.0 GiB", out[-1])
    assert any(l.startswith("sft step") for l in out)
    assert main(["plan", "--config", demo, "--gpus", "1", "--gpu-mem", "0.001"]) == 3
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("GiB of 0.0 GiB")
    assert main(["plan", "--config", demo, "--gpus", "1", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.no_such_key" in err[0]
    assert main(["plan", "--config", demo, "--gpus", "3"]) == 2  # 32 sequences do not split over 3 ranks
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_plan_cli_takes_overrides_before_and_after_an_option(capsys):
    # `pgen plan --config C a=1 --gpus 2 b=2` used to stop with "unrecognized arguments: b=2"
    import pytest

    from tests.conftest import REPO

    demo = str(REPO / "configs" / "demo_sft.yaml")
    assert main(["plan", "--config", demo, "train.max_steps=3", "--gpus", "1", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.no_such_key" in err[0]  # the override after --gpus reached the config
    assert main(["plan", "--config", demo, "train.max_steps=3", "--gpus", "1", "train.warmup_steps=1"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an unknown option is still argparse's usage error
        main(["plan", "--config", demo, "train.max_steps=3", "--gpus", "1", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_plan_cli_janus_pro_1b_rl_fits_8x80(capsys):
    """The README's example: the real-size 1B RL config, planned on the meta device."""
    from tests.conftest import REPO

    assert main(["plan", "--config", str(REPO / "configs" / "janus_pro_1b_rl.yaml")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [l.split()[0] for l in out if l.split() and l.split()[0] in ("rollout", "log-probs", "update")] == \
        ["rollout", "log-probs", "update"]
    assert out[-1].startswith("peak per GPU: ") and out[-1].endswith(" GiB of 80.0 GiB")


def test_user_errors_outside_the_builtin_types_are_one_line(monkeypatch, capsys):
    # a PgenUserError that is not also a ValueError/RuntimeError (e.g. DeepSpeedMissingError
    # from pgen demo) used to escape as a traceback
    import pgen_engine.eval.cli as C
    from pgen_engine.errors import PgenUserError

    def fail(a):
        raise PgenUserError("DeepSpeed is not installed; pip install deepspeed")

    monkeypatch.setattr(C, "run_demo", lambda *a, **k: fail(a))
    assert main(["demo", "--quick", "--quiet"]) == 1
    assert capsys.readouterr().err == "pgen demo: error: DeepSpeed is not installed; pip install deepspeed\n"


def test_sigterm_is_one_line_status_143_and_the_handler_is_restored(tiny_ckpt, monkeypatch, capsys):
    # SIGTERM used to end `pgen` on the spot: no message, and no `finally` cleanup of temporary files
    import os
    import signal
    import time

    import pgen_engine.cli as cli

    cleaned = []

    def stopped(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
            return 0
        finally:
            cleaned.append(True)

    monkeypatch.setattr(cli, "_info", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", str(tiny_ckpt)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert cleaned == [True] and err == ["pgen info: error: terminated by SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is before
