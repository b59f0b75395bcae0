"""SFT throughput on CPU for configs/demo_sft.yaml at 1 and 2 ranks (DeepSpeed ZeRO-3, fp32).

    python -m pytest benchmarks/test_bench_sft.py -q -s

Each case runs ``train.py`` for ``STEPS`` optimizer steps (global batch 16) and reports the
median ``tokens_per_s`` of metrics.jsonl over steps after the first two (start-up excluded);
tokens = all non-padding input tokens of the step, over every rank. Ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
RESULTS: dict[str, dict] = {}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(ranks: int, root: Path) -> dict:
    out = root / f"ranks{ranks}"
    args = ["--config", str(REPO / "configs" / "demo_sft.yaml"), f"output_dir={out}",
            f"data.dataset_dir={root / 'synth'}", f"data.work_dir={root / 'work'}", f"train.max_steps={STEPS}",
            "train.save_every=0", "logging.progress=false", "train.micro_batch_size=16"]  # 2 ranks x 16 = 32
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "train.py"), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", _port(),
               str(REPO / "train.py"), *args]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows[2:]]
    return {"ranks": ranks, "tokens_per_s": statistics.median(tps), "step_time_s":
            statistics.median(r["step_time_s"] for r in rows[2:]), "final_loss": rows[-1]["loss"]}


@pytest.mark.parametrize("ranks", [1, 2])
def test_sft_tokens_per_s(benchmark, tmp_path_factory, ranks):
    root = tmp_path_factory.getbasetemp() / "bench_sft"
    root.mkdir(exist_ok=True)
    res = benchmark.pedantic(_run, args=(ranks, root), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS[f"ranks{ranks}"] = res
    assert res["tokens_per_s"] > 0
    if len(RESULTS) == 2:
        print(json.dumps({"bench": "sft_cpu_demo", **RESULTS}))
