"""End-to-end SFT runs through ``train.py`` (CPU, DeepSpeed ZeRO-3, gloo).

Stated tolerances:
* 2-rank vs 1-rank (same global batch 8 = 2 x 4 vs 1 x 4 x 2 accumulation): per-step loss
  within 1e-3 absolute (observed ~1e-6: only the reduction order differs);
* kill-and-resume vs uninterrupted: per-step loss within 1e-5 (fp32, same rank count).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo_sft.yaml"
STEPS = 10
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env() -> dict:
    # a process group initialised by another test in this process must not leak into the children
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _common(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.dataset_dir={data / 'synth'}", f"data.work_dir={data / 'work'}",
            "data.synth.users=60", "train.micro_batch_size=4", "train.global_batch_size=8",
            # a small image vocabulary: this test is about ZeRO-3 equivalence, not the demo's fit
            "data.patch_size=8", "data.codebook_size=64", "model.init.init_std=null",
            f"train.max_steps={STEPS}", "train.warmup_steps=2", "logging.progress=false", *extra]


def _cmd(args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(REPO / "train.py"), "--config", str(CONFIG), *args]
    launcher = Path(sys.executable).parent / "deepspeed"
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*head, "--num_gpus", str(ranks), "--master_port", _port(), str(REPO / "train.py"),
            "--config", str(CONFIG), *args]


def _train(args: list[str], *, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args, ranks), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _sigterm_after_first_step(args: list[str], out: Path, *, ranks: int = 1) -> tuple[int, str]:
    """Start a run, send SIGTERM to its whole process group (as a scheduler does) once step 1 is
    logged; returns (exit status, stderr)."""
    # the run at low priority: on a busy machine this process must see step 1's row before the
    # run has trained all its steps
    proc = subprocess.Popen(_cmd(args, ranks), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: os.nice(15))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate/out-of-order steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-rank reference run (also builds the dataset/tokenizer/cache) and a 2-rank run."""
    root = tmp_path_factory.mktemp("sft_e2e")
    one = root / "one"
    _ok(_train(_common(root, one, "train.save_every=3")))
    two = root / "two"
    before = _shm_buffers()
    _ok(_train(_common(root, two), ranks=2))
    # DeepSpeed's CPU all-reduce buffers (2 x 69 MB of RAM) used to stay in /dev/shm after every run
    assert _shm_buffers() <= before, sorted(_shm_buffers() - before)
    return root, one, two


def _shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def test_two_rank_zero3_matches_one_rank_and_loss_decreases(runs):
    _, one, two = runs
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-3, f"step {s}: 1-rank loss {a[s]} vs 2-rank {b[s]}"
    first, last = sum(a[s] for s in (1, 2)) / 2, sum(a[s] for s in (STEPS - 1, STEPS)) / 2
    assert last < first - 0.1, f"loss did not decrease: {first} -> {last}"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grad_accum"] == 1
    assert json.loads((one / "summary.json").read_text())["grad_accum"] == 2
    for out in (one, two):
        assert (out / "config.resolved.yaml").is_file()
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
        assert (out / "final" / "config.json").is_file()
    rows = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)


def test_kill_and_resume_reproduces_losses(runs):
    root, one, _ = runs
    out = root / "killed"
    args = _common(root, out, "train.save_every=3")
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(CONFIG), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "no checkpoint appeared before the kill"
    resumed_from = int(latest.read_text().strip().removeprefix("step"))
    assert resumed_from < STEPS, "the run finished before it could be killed"
    _ok(_train(args + ["--resume", "auto"]))
    ref, got = _losses(one), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    after = [s for s in range(resumed_from + 1, STEPS + 1)]
    assert after, "nothing ran after the resume"
    for s in after:
        assert abs(ref[s] - got[s]) <= 1e-5, f"step {s}: uninterrupted {ref[s]} vs resumed {got[s]}"
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == resumed_from
    # resuming the finished run runs no step: the summary keeps the last step's loss (not NaN)
    _ok(_train(args + ["--resume", "auto"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == STEPS and abs(summary["final_loss"] - got[STEPS]) <= 1e-6
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_that_resumes_exactly(runs, ranks):
    # SIGTERM (preemption) used to kill the run where it stood: exit 143, no message, every step
    # since the last periodic checkpoint lost. Now every rank finishes the step, the ranks agree
    # on it, write a resumable checkpoint and exit with one line.
    root, one, two = runs
    out = root / f"sigterm{ranks}"
    args = _common(root, out, "train.save_every=3")
    before = _shm_buffers()
    rc, err = _sigterm_after_first_step(args, out, ranks=ranks)
    assert _shm_buffers() <= before  # also when the run ends on a signal
    assert "error:" in err and "Traceback" not in err, err[-3000:]
    assert not (out / "summary.json").exists(), "the run finished before the signal reached it"
    # the ranks share one stderr pipe, so their lines may interleave: find each rank's message
    steps = re.findall(r"error: stopped by SIGTERM after step (\d+) of \d+: resumable checkpoint \S+ written "
                       r"\(continue with --resume auto\)", err)
    assert len(steps) == ranks and len(set(steps)) == 1, err[-3000:]  # every rank stopped at the same step
    stopped = int(steps[0])
    assert 1 <= stopped < STEPS, f"the run finished before the signal: step {stopped}"
    if ranks == 1:
        assert rc == 143
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{stopped:08d}"
    assert not (out / "final").exists()
    _ok(_train(args + ["--resume", "auto"], ranks=ranks))
    ref, got = _losses(one if ranks == 1 else two), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(stopped + 1, STEPS + 1):
        assert abs(ref[s] - got[s]) <= 1e-5, f"step {s}: uninterrupted {ref[s]} vs resumed {got[s]}"


def test_exported_checkpoint_loads_in_transformers_with_matching_logits(runs):
    from transformers import JanusForConditionalGeneration

    import pgen_engine as pg

    final = runs[2] / "final"
    ours = pg.load_model(final)
    hf = JanusForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(int(time.time()))
    B, S = 3, 29
    ids = torch.randint(6, ours.config.text.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ref_text = out.logits.float()
        ref_img = hf.model.generation_head(out.hidden_states[-1]).float()
        hidden = ours.forward_train(ours.embed_inputs(ids), mask)
        got_text = ours.text_logits(ids, mask)
        got_img = ours.image_head_logits(hidden).float()
    keep = mask.bool()
    torch.testing.assert_close(got_text[keep], ref_text[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_img[keep], ref_img[keep], rtol=1e-4, atol=1e-4)
    # the export holds the *trained* weights, not the initial ones
    init = pg.load_model(runs[2] / "init_model")
    assert not torch.equal(init.generation_head.vision_head.weight, ours.generation_head.vision_head.weight)
    assert torch.equal(init.vision_model.embeddings.patch_embedding.weight,
                       ours.vision_model.embeddings.patch_embedding.weight), "frozen vision encoder changed"


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line, got stderr:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("train.max_stepz=3", "unknown key 'train.max_stepz'"),
    ("train.max_steps=three", "train.max_steps='three': expected int"),
    ("train.micro_batch_size=3", "not a multiple of train.micro_batch_size=3"),
    ("deepspeed.zero_stage=1", "deepspeed.zero_stage=1: expected 0, 2 or 3"),
])
def test_bad_config_exits_with_one_line(tmp_path, override, needle):
    p = _train([f"output_dir={tmp_path / 'out'}", override], timeout=120)
    assert p.returncode == 2
    assert needle in _one_error_line(p)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_exits_with_one_line(tmp_path):
    missing = tmp_path / "no_such_dataset"
    p = _train([f"output_dir={tmp_path / 'out'}", f"data.dataset_dir={missing}", "data.synth=null"], timeout=120)
    assert p.returncode == 1
    line = _one_error_line(p)
    assert str(missing) in line and "dataset not found" in line


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(runs, tmp_path):
    root = runs[0]
    out = tmp_path / "nan"
    p = _train(_common(root, out, "train.lr=1.0e+30", "train.warmup_steps=0", "train.grad_clip=0.0",
                       "train.save_every=1"))
    assert p.returncode == 1, p.stderr[-3000:]
    line = _one_error_line(p)
    assert "not finite" in line
    ckpts = out / "checkpoints"
    good = (ckpts / "latest").read_text().strip()
    bad_step = int(line.split("step ")[1].split(":")[0])
    assert good == f"step{bad_step - 1:08d}"
    assert (ckpts / good / "pgen_checkpoint.json").is_file()
    assert not (ckpts / f"step{bad_step:08d}").exists()
    assert not (out / "final").exists()
