"""One command that proves the GPU paths on a lent GPU: ``make gpu-smoke`` (``python -m benchmarks.gpu_smoke``).

    python -m benchmarks.gpu_smoke --out runs/gpu_smoke          # on a CUDA machine, <= 8 min on one H100
    python -m benchmarks.gpu_smoke --check --out /tmp/smoke      # every stage on the CPU at tiny sizes (CI)

Uses the Python it is started with: it never creates a virtual environment, never reaches a
package registry and never replaces the installed torch. Steps:

1. **deps** — what the stages need and the machine lacks (DeepSpeed, pytest-benchmark,
   pytest-xdist, scipy) is installed from ``wheelhouse/`` only (``pip --no-index``; build the
   folder with ``make wheelhouse`` where a registry is reachable, see :mod:`benchmarks.wheelhouse`).
2. **build** — ``python setup.py build_ext --inplace`` builds ``pgen_engine._C`` with its CUDA
   kernels; DeepSpeed's FusedAdam (needed by RL's ``offload_states``) is JIT-built alongside.
3. **stages**, each in its own subprocess with its own time budget (:mod:`benchmarks.smoke_stages`):
   ``kernels`` (the extension's CUDA kernels vs torch, also inside a CUDA graph), ``ops_tests``
   (``tests/ops`` on CUDA), ``generator`` (bf16: graph = static = eager tokens; log-prob gap),
   ``sft`` (1-GPU ZeRO-3 bf16 with activation checkpointing: 8 steps, SIGKILL, resume, ``final/``
   loads), ``rl`` (3 GRPO steps through the hybrid engine: CFG rollouts, graph decode,
   ``offload_states``, memory ledger; peak vs max(SFT peak, generation peak), target <= 1.15x),
   ``op_bench`` and ``gen_bench`` (the generation benchmark vs ``transformers``, Janus-Pro-1B geometry).

Writes ``OUT/gpu_smoke.json`` (rewritten after every stage: device, per-step and per-stage
``status`` ok / failed / skipped, a one-line ``reason``, seconds and numbers) and appends a
table to ``benchmarks/RESULTS.md`` (GPU runs only; ``--check`` writes ``OUT/results.md``).
Exit status: 0 when every selected stage is ok, 1 otherwise, 2 for a usage error (e.g. no GPU
without ``--check``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
STAGES = ("kernels", "ops_tests", "generator", "sft", "rl", "op_bench", "gen_bench")
# seconds; each is a ceiling (most stages need far less), and the run as a whole stops at TOTAL
GPU_BUDGET = {"kernels": 40, "ops_tests": 80, "generator": 40, "sft": 90, "rl": 110, "op_bench": 40, "gen_bench": 120}
CHECK_BUDGET = {"kernels": 60, "ops_tests": 150, "generator": 120, "sft": 300, "rl": 300, "op_bench": 90,
                "gen_bench": 240}
GPU_TOTAL, CHECK_TOTAL = 480.0, 1200.0
BUILD_TIMEOUT = 240.0
GRACE = 20.0  # seconds a stage process gets past its budget to import, clean up and write its result


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _one_line(text: str, limit: int = 240) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "")[:limit]


def _env() -> dict:
    from benchmarks.smoke_stages import _env as stage_env

    return stage_env()


def install_deps(wheelhouse: Path, check: bool) -> dict:
    """Install the missing pure-Python dependencies from ``wheelhouse`` (GPU runs only)."""
    from benchmarks import wheelhouse as wh

    t0 = time.monotonic()
    missing = wh.missing_modules()
    if not missing:
        return {"status": "ok", "reason": "all present", "seconds": time.monotonic() - t0}
    if check:  # CI has what it needs; a stage that lacks something fails with its own reason
        return {"status": "skipped", "reason": f"missing {', '.join(missing)} (check mode installs nothing)",
                "seconds": time.monotonic() - t0}
    try:
        got = wh.install(wheelhouse)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        return {"status": "failed", "reason": _one_line(str(e)), "seconds": time.monotonic() - t0}
    return {"status": "ok", "reason": f"installed {', '.join(got)} from {wheelhouse}", "seconds": time.monotonic() - t0}


def build_extension(out: Path, timeout: float) -> dict:
    """``setup.py build_ext --inplace`` (CUDA kernels included) next to DeepSpeed's FusedAdam JIT build.

    Logs: ``OUT/build__C.log`` and ``OUT/build_fused_adam.log``.
    """
    import importlib.util

    t0 = time.monotonic()
    env = _env()
    cmds = {"_C": [sys.executable, "setup.py", "build_ext", "--inplace"]}
    if importlib.util.find_spec("deepspeed") is not None:
        # RL's offload_states needs DeepSpeed's FusedAdam; building it here keeps the JIT out of the RL budget
        cmds["fused_adam"] = [sys.executable, "-c", "from deepspeed.ops.op_builder import FusedAdamBuilder; "
                              "FusedAdamBuilder().load(verbose=False)"]
    procs, logs = {}, {}
    for name, cmd in cmds.items():
        logs[name] = out / f"build_{name}.log"
        with open(logs[name], "w") as log:  # files, not pipes: neither build can stall on a full pipe
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    late = []
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            late.append(name)
    secs = time.monotonic() - t0
    if "_C" in late or procs["_C"].returncode != 0:
        why = f"did not finish within {timeout:.0f} s" if "_C" in late else _one_line(logs["_C"].read_text())
        return {"status": "failed", "reason": f"build_ext: {why} (log: {logs['_C']})", "seconds": secs}
    probe = subprocess.run([sys.executable, "-c", "import pgen_engine._C as C; print(bool(C.with_cuda))"], cwd=ROOT,
                           env=env, capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        return {"status": "failed", "reason": "pgen_engine._C built without CUDA kernels (torch without CUDA or no "
                f"nvcc) {_one_line(probe.stderr)}".strip(), "seconds": secs}
    notes = []
    if "fused_adam" in procs and ("fused_adam" in late or procs["fused_adam"].returncode != 0):
        notes.append(f"FusedAdam JIT build failed: {_one_line(logs['fused_adam'].read_text())}")
    return {"status": "ok", "reason": "pgen_engine._C with CUDA kernels" + ("; " + "; ".join(notes) if notes else ""),
            "seconds": secs}


def run_stage(name: str, out: Path, check: bool, budget: float) -> dict:
    """One stage in its own process group; a timeout kills the group (train.py children included)."""
    result = out / f"stage_{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.smoke_stages", name, "--out", str(out), "--result", str(result),
           "--timeout", f"{budget:.0f}"] + (["--check"] if check else [])
    t0 = time.monotonic()
    with open(out / f"stage_{name}.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=budget + GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return {"stage": name, "status": "failed", "reason": f"killed after its {budget:.0f} s budget (+{GRACE:.0f} s)",
                    "seconds": time.monotonic() - t0, "numbers": {}}
    if p.returncode == 0 and result.is_file():
        res = json.loads(result.read_text())
        res["seconds"] = time.monotonic() - t0
        return res
    tail = _one_line((out / f"stage_{name}.log").read_text())
    return {"stage": name, "status": "failed", "reason": f"stage process exit {p.returncode}: {tail}",
            "seconds": time.monotonic() - t0, "numbers": {}}


def _key_numbers(r: dict) -> str:
    n = r.get("numbers") or {}
    keys = ("sample_vs_cpu_mismatches", "graph_replays", "passed", "failed", "skipped", "tokens_compared",
            "logprob_gap_max", "logprob_gap_mean", "killed_after_checkpoint", "loss_first", "loss_last",
            "step_time_s_median", "peak_bytes", "rl_peak_bytes", "sft_peak_bytes", "generation_peak_bytes",
            "peak_ratio")
    parts = []
    for k in keys:
        if n.get(k) is None:
            continue
        v = n[k]
        if k.endswith("_bytes"):
            v = f"{v / 2 ** 20:.0f} MiB"
        elif isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def tables(report: dict) -> str:
    """Markdown: the stage table, then the benchmark rows of op_bench and gen_bench."""
    lines = ["| stage | status | s | reason | numbers |", "|---|---|---|---|---|"]
    for name, r in report["steps"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | {r['reason']} | |")
    for r in report["stages"]:
        reason = r["reason"].replace("|", "/")
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', 0):.1f} | {reason} | {_key_numbers(r)} |")
    rows = [row for r in report["stages"] if r["stage"] in ("op_bench", "gen_bench")
            for row in (r.get("numbers") or {}).get("rows", [])]
    text = "\n".join(lines)
    if rows:
        from benchmarks.gpu import table

        text += "\n\n" + table(rows)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_smoke", help="run folder (JSON, logs, runs)")
    ap.add_argument("--check", action="store_true", help="every stage on the CPU at tiny sizes (CI)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--total-budget", type=float, default=None,
                    help=f"seconds for the whole run (default {GPU_TOTAL:.0f} on GPU, {CHECK_TOTAL:.0f} with --check)")
    ap.add_argument("--no-build", action="store_true", help="use the pgen_engine._C already built")
    ap.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse")
    ap.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        ap.error(f"--stages: unknown {unknown}; expected a subset of {','.join(STAGES)}")
    import torch

    gpu = not args.check
    if gpu and not torch.cuda.is_available():
        print(f"gpu_smoke: error: no CUDA device visible to torch {torch.__version__} (torch.version.cuda="
              f"{torch.version.cuda}); on a machine without a GPU run `python -m benchmarks.gpu_smoke --check`",
              file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budgets = GPU_BUDGET if gpu else CHECK_BUDGET
    total = args.total_budget or (GPU_TOTAL if gpu else CHECK_TOTAL)
    t_start = time.monotonic()
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu (check mode)", "mode": "gpu" if gpu else "check",
              "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
              "started": _now(), "total_budget_s": total, "steps": {}, "stages": [], "ok": False}
    json_path = out / "gpu_smoke.json"

    def save() -> None:
        from pgen_engine.io_utils import atomic_write_text

        report["elapsed_s"] = time.monotonic() - t_start
        atomic_write_text(json_path, json.dumps(report, indent=1, default=str))

    report["steps"]["deps"] = install_deps(args.wheelhouse, args.check)
    print(f"[deps] {report['steps']['deps']['status']}: {report['steps']['deps']['reason']}", flush=True)
    if gpu and not args.no_build:
        report["steps"]["build"] = build_extension(out, min(BUILD_TIMEOUT, total / 2))
    else:
        report["steps"]["build"] = {"status": "skipped", "seconds": 0.0,
                                    "reason": "--no-build" if gpu else "check mode uses the extension `make build` made"}
    print(f"[build] {report['steps']['build']['status']}: {report['steps']['build']['reason']}", flush=True)
    save()
    for name in STAGES:
        if name not in chosen:
            continue
        left = total - (time.monotonic() - t_start)
        if left < 10:
            res = {"stage": name, "status": "skipped", "seconds": 0.0, "numbers": {},
                   "reason": f"the run's {total:.0f} s budget was spent before this stage"}
        else:
            res = run_stage(name, out, args.check, min(budgets[name], left))
        report["stages"].append(res)
        print(f"[{name}] {res['status']}: {res['reason']} ({res.get('seconds', 0):.1f} s)", flush=True)
        save()
    report["ok"] = all(r["status"] == "ok" for r in report["stages"]) and report["steps"]["build"]["status"] != "failed"
    report["finished"] = _now()
    save()
    text = tables(report)
    print(text)
    head = f"## gpu_smoke — {report['device']} — {report['finished']}"
    if gpu and not args.no_results:
        from pgen_engine.io_utils import atomic_write_text

        old = RESULTS.read_text() if RESULTS.exists() else "# GPU benchmark results\n"
        atomic_write_text(RESULTS, f"{old}\n{head}\n\n`make gpu-smoke` (torch {report['torch']}, "
                                   f"{report['elapsed_s']:.0f} s; JSON: {json_path.name})\n\n{text}\n")
    else:
        (out / "results.md").write_text(f"{head}\n\n{text}\n")
    failed = [r["stage"] for r in report["stages"] if r["status"] != "ok"]
    print(f"gpu_smoke: {'all ' + str(len(report['stages'])) + ' stages ok' if report['ok'] else 'NOT ok: ' + ', '.join(failed or ['build'])}"
          f" in {report['elapsed_s']:.0f} s; {json_path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
