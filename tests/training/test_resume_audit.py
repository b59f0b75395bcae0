"""Resume edge cases found by an audit: missing checkpoint files, config and data changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pgen_engine.training.checkpoints import ResumeError, load_resumable, save_resumable
from pgen_engine.training.distributed import DistInfo, init_distributed
from tests.training.test_checkpoints import _engine, _step

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist_info() -> DistInfo:
    return init_distributed()


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_a_checkpoint_missing_a_deepspeed_file_is_one_resume_error_naming_it(dist_info, tmp_path, kind):
    # a missing *model_states.pt used to end in DeepSpeed's bare AssertionError traceback
    # (state_dict_factory: `assert len(self.ckpt_list) > 0`)
    eng = _engine(3)
    _step(eng, torch.randn(4, 7))
    ck = save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=1)
    (victim,) = ck.glob(f"*{kind}.pt")
    victim.unlink()
    with pytest.raises(ResumeError, match=rf"{ck}: cannot load the DeepSpeed state \({victim.name}: missing\); "
                                          r"the checkpoint is corrupt or truncated"):
        load_resumable(eng, ck, dist_info)


def test_resume_auto_in_a_finished_run_without_checkpoints_is_refused(tmp_path):
    # `--resume auto` where final/ exists but no complete checkpoint (deleted to save space, or all
    # half-written) used to train from scratch silently and replace the finished run's final/
    from pgen_engine.config import load_config
    from pgen_engine.training.stages import run_stage

    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "config.json").write_text("{}")
    (out / "checkpoints" / ".tmp-step00000004").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"output_dir={out}", f"data.dataset_dir={tmp_path / 'd'}"])
    with pytest.raises(ResumeError, match=r"output_dir=.*run holds a finished run \(.*run/final\) but no complete "
                                          r"checkpoint .* to resume from; --resume auto would train it again"):
        run_stage(cfg, resume="auto")
    assert not (tmp_path / "d").exists() and (out / "final" / "config.json").read_text() == "{}"
    run_stage_ok = tmp_path / "empty"  # an empty folder still starts fresh under --resume auto (pgen demo)
    from pgen_engine.training.checkpoints import check_fresh_start
    check_fresh_start(run_stage_ok, resume_auto=True)
