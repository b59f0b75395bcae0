import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_check_mode_runs_and_ends_with_json():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    ops = {r["op"] for r in last["rows"]}
    assert {"sample_cfg_topp", "token_logprobs_fwd", "rms_norm", "apply_rotary"} <= ops
    assert all(r["ms"] > 0 for r in last["rows"] if r["op"] != "check")
    checks = [r for r in last["rows"] if r["op"] == "check"]
    assert checks and all(r["ok"] for r in checks)  # graph-ready decode == eager == transformers tokens
    backends = {r["backend"] for r in last["rows"] if r["op"] == "generate"}
    assert {"transformers", "pgen-static", "pgen-eager"} <= backends
    assert (results.read_text() if results.exists() else None) == before  # check mode never appends
