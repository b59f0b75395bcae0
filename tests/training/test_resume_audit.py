"""Resume edge cases found by an audit: missing checkpoint files, config and data changes."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.training.checkpoints import ResumeError, load_resumable, save_resumable
from pgen_engine.training.distributed import DistInfo, init_distributed
from tests.training.test_checkpoints import _engine, _step


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
