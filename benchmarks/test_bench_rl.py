"""RL step time on CPU for configs/demo_rl.yaml, split into rollout / reward / log-probs / update.

    python -m pytest benchmarks/test_bench_rl.py -q -s

Runs ``train.py`` (1 rank, DeepSpeed ZeRO-3, fp32) for ``STEPS`` RL steps of the demo
config (8 prompts x 8 samples = 64 images of 16 tokens per step, 2 optimizer steps) from a
freshly initialised demo-geometry model (``model.checkpoint=null``: timings do not depend
on the weights' values) and reports the median over steps after the first (start-up
excluded) of each phase's seconds from metrics.jsonl (``time/<phase>_s``), their sum, and
images/s of the rollout. ``extra_info`` holds the split; ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
PHASES = ("rollout", "reward", "logprobs", "update")


def _run(root: Path) -> dict:
    out = root / "run"
    args = ["--config", str(REPO / "configs" / "demo_rl.yaml"), f"output_dir={out}", "model.checkpoint=null",
            f"data.dataset_dir={root / 'synth'}", f"data.work_dir={root / 'work'}", f"train.max_steps={STEPS}",
            "train.save_every=0", "rl.eval_prompts=0", "logging.progress=false"]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    split = {f"{ph}_s": statistics.median(r[f"time/{ph}_s"] for r in rows) for ph in PHASES}
    total = sum(split.values())
    import yaml

    rl = yaml.safe_load((REPO / "configs" / "demo_rl.yaml").read_text())["rl"]
    images = rl["prompts_per_step"] * rl["group_size"]
    return {**split, "step_s": total, "images_per_step": images, "rollout_images_per_s": images / split["rollout_s"],
            "share": {ph: split[f"{ph}_s"] / total for ph in PHASES}, "steps_measured": len(rows),
            "mem_total_bytes": rows[-1]["mem/total_bytes"]}


def test_rl_step_time_split(benchmark, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_rl")
    res = benchmark.pedantic(_run, args=(root,), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert all(res[f"{ph}_s"] > 0 for ph in PHASES)
    print(json.dumps({"bench": "rl_cpu_demo_step_split", **res}))
