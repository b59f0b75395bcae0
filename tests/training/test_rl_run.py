"""End-to-end RL runs through ``train.py`` (CPU, DeepSpeed ZeRO-3, gloo).

One module fixture makes a short SFT run (the RL stage starts from its ``final/`` and
reuses its data work dir); then: a 2-rank ZeRO-3 run with a *partitioned* reference
(exercises the hybrid engine's ZeRO-3 gather / hook detach / re-partition and the
partitioned reference engine), a 1-rank run via ``python train.py``, resume from a
mid-run checkpoint (steps after the resume reproduce the uninterrupted run's rewards
and losses within 1e-5), and one-line errors for bad configs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SFT_CONFIG = REPO / "configs" / "demo_sft.yaml"
RL_CONFIG = REPO / "configs" / "demo_rl.yaml"
STEPS = 4
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE")
# the reward components the shipped demo RL config optimises (each is logged per step and at eval)
COMPONENTS = tuple(yaml.safe_load(RL_CONFIG.read_text())["rl"]["rewards"])
PER_STEP_KEYS = ("step", "reward", *(f"reward/{c}" for c in COMPONENTS), "kl", "logprob_gap_max",
                 "logprob_gap_mean", "mem/rollout_kv_bytes", "mem/rollout_gathered_weights_bytes",
                 "mem/update_activations_bytes", "mem/update_optimizer_states_bytes", "mem/total_bytes",
                 "time/rollout_s", "time/reward_s", "time/logprobs_s", "time/update_s", "loss", "grad_norm")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _train(config: Path, args: list[str], *, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config), *args]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd = [*head, "--num_gpus", str(ranks), "--master_port", _port(), str(REPO / "train.py"),
               "--config", str(config), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"


def _data(root: Path) -> list[str]:
    return [f"data.dataset_dir={root / 'synth'}", f"data.work_dir={root / 'work'}", "data.synth.users=40",
            "data.codebook_size=32", "data.kmeans_iters=5", "logging.progress=false"]


def _rl(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"model.checkpoint={root / 'sft' / 'final'}", *_data(root),
            f"train.max_steps={STEPS}", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.warmup_steps=1", "train.save_every=0", "rl.group_size=4", "rl.prompts_per_step=4",
            "rl.rollout_batch_size=8", "rl.eval_prompts=4", "rl.eval_every=0",
            "rl.embedder.steps=20", "rl.embedder.batch_size=16", *extra]  # the learned reward CNN, tiny


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate/out-of-order steps: {steps}"
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_e2e")
    _ok(_train(SFT_CONFIG, [f"output_dir={root / 'sft'}", *_data(root), "train.max_steps=3", "train.warmup_steps=1",
                            "train.save_every=0"]))
    return root


def _check_run(out: Path, world: int) -> dict[int, dict]:
    rows = _rows(out)
    assert sorted(rows) == list(range(0, STEPS + 1))
    assert set(rows[0]) == {"step", "eval/reward", *(f"eval/reward/{c}" for c in COMPONENTS)}
    for s in range(1, STEPS + 1):
        missing = [k for k in PER_STEP_KEYS if k not in rows[s]]
        assert not missing, f"step {s} lacks {missing}"
        assert all(math.isfinite(rows[s][f"reward/{c}"]) for c in COMPONENTS)
        assert rows[s]["logprob_gap_max"] <= 1e-4, rows[s]["logprob_gap_max"]
        assert rows[s]["mem/rollout_kv_bytes"] > 0 and rows[s]["mem/update_activations_bytes"] > 0
    assert "eval/reward" in rows[STEPS]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world and summary["stage"] == "rl"
    assert summary["eval_before"]["eval/reward"] == rows[0]["eval/reward"]
    assert summary["eval_after"]["eval/reward"] == rows[STEPS]["eval/reward"]
    assert (out / "final" / "config.json").is_file() and summary["final"] == str(out / "final")
    # the export records how it was trained; the SFT it started from says the same mode
    record = json.loads((out / "final" / "pgen_training.json").read_text())
    sft_record = json.loads((out.parent / "sft" / "final" / "pgen_training.json").read_text()) \
        if (out.parent / "sft").is_dir() else None
    assert record["stage"] == "rl" and record["history_mode"] in ("pixels", "codes")
    assert sft_record is None or (sft_record["stage"] == "sft" and sft_record["history_mode"] == record["history_mode"])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    return rows


def test_two_rank_zero3_with_partitioned_reference(sft_root):
    import torch

    import pgen_engine as pg

    out = sft_root / "rl_two"
    _ok(_train(RL_CONFIG, _rl(sft_root, out, "rl.reference=partitioned", "rl.beta=0.05"), ranks=2))
    rows = _check_run(out, world=2)
    assert rows[STEPS]["kl"] > 0  # the partitioned reference answered, and the policy moved away from it
    assert rows[1]["mem/logprobs_reference_weights_bytes"] > 0
    # ZeRO-3 re-partitioned after every rollout: training continued and the export holds trained weights
    sft = pg.load_model(sft_root / "sft" / "final")
    rl = pg.load_model(out / "final")
    assert not torch.equal(sft.generation_head.vision_head.weight, rl.generation_head.vision_head.weight)
    assert torch.equal(sft.vision_model.embeddings.patch_embedding.weight,
                       rl.vision_model.embeddings.patch_embedding.weight), "frozen vision encoder changed"


def test_one_rank_run_and_resume_reproduces_steps(sft_root):
    out = sft_root / "rl_one"
    _ok(_train(RL_CONFIG, _rl(sft_root, out, "train.save_every=2")))
    ref = _check_run(out, world=1)
    assert (out / "checkpoints" / "step00000002" / "pgen_checkpoint.json").is_file()
    resumed = sft_root / "rl_resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    _ok(_train(RL_CONFIG, _rl(sft_root, resumed, "train.save_every=2") + ["--resume", "auto"]))
    got = _rows(resumed)
    assert sorted(got) == [3, 4]  # rows from before the resume are not rewritten
    for s in (3, 4):
        for key in ("reward", "loss", "kl", f"reward/{COMPONENTS[0]}"):
            assert abs(ref[s][key] - got[s][key]) <= 1e-5, f"step {s} {key}: {ref[s][key]} vs {got[s][key]}"
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    assert summary["eval_before"] == json.loads((out / "summary.json").read_text())["eval_before"]


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line, got stderr:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("rl.group_size=1", "rl.group_size=1: expected >= 2 for grpo"),
    ("rl.rewardz={}", "unknown key 'rl.rewardz'"),
    ("rl.reference=none", "rl.reference='none' needs rl.beta=0"),
    ("rl.prompts_per_step=3", "not a multiple of train.global_batch_size=8"),
    ("rl.rewards={attribute_matsh: {weight: 1.0}}", "unknown component 'attribute_matsh'"),
])
def test_bad_rl_config_exits_with_one_line(sft_root, tmp_path, override, needle):
    p = _train(RL_CONFIG, _rl(sft_root, tmp_path / "out", override), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert needle in _one_error_line(p)


def test_rl_refuses_a_different_tokenizer(sft_root, tmp_path):
    # same geometry, other fit (fewer k-means iterations): same shapes, different codes
    args = _rl(sft_root, tmp_path / "out") + [f"data.work_dir={tmp_path / 'other_work'}", "data.kmeans_iters=2"]
    p = _train(RL_CONFIG, args, timeout=180)
    assert p.returncode == 1, p.stderr[-2000:]
    line = _one_error_line(p)
    assert "trained with the image tokenizer" in line and str(tmp_path / "other_work") in line
