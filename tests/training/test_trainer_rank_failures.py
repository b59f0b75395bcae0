"""A real 2-rank ``train.py`` run whose rank 0 fails after the last collective of training.

``Trainer.run`` wrote ``summary.json`` on rank 0 only; when that failed, rank 0 exited while
the other ranks waited in train.py's shutdown barrier. The two ranks are started here without
a launcher that kills the survivors (as on another node of a multi-node run): the other rank
must stop with rank 0's error, not wait for the group's timeout (gloo: 'Connection closed by
peer'). The failure is injected by a wrapper script keyed on RANK.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.gloo_ranks import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WRAPPER = '''
import os, runpy, sys
from pathlib import Path
from pgen_engine.training import trainer
if os.environ["RANK"] == "0":
    real = trainer.atomic_write_json
    def fail(path, obj, *a, **k):
        if Path(path).name == "summary.json":
            raise OSError(28, "No space left on device")
        return real(path, obj, *a, **k)
    trainer.atomic_write_json = fail
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_summary_write_failure_on_rank0_stops_every_rank(tmp_path):
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(WRAPPER)
    data = tmp_path / "data"
    args = ["--config", str(REPO / "configs" / "demo_sft.yaml"), f"output_dir={tmp_path / 'out'}",
            f"data.dataset_dir={data / 'synth'}", f"data.work_dir={data / 'work'}", "data.synth.users=60",
            "train.global_batch_size=8", "data.patch_size=8", "data.codebook_size=64", "model.init.init_std=null",
            "train.max_steps=1", "train.warmup_steps=0", "logging.progress=false"]
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, str(wrapper), str(REPO / "train.py"), *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append((p.wait(timeout=240), p.stderr.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    (rc0, err0), (rc1, err1) = outs
    assert rc0 != 0 and "OSError: [Errno 28] No space left on device" in err0, err0[-3000:]
    assert rc1 != 0 and "RankFailedError: rank 0 failed: OSError: [Errno 28] No space left on device" in err1, \
        err1[-3000:]
