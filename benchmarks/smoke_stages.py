"""The stages of :mod:`benchmarks.gpu_smoke`, one per subprocess.

    python -m benchmarks.smoke_stages STAGE --out DIR --result FILE [--check]
    python -m benchmarks.smoke_stages probe --peak FILE [--record-generate FILE] -- SCRIPT [ARGS ...]
    python -m benchmarks.smoke_stages genref --checkpoint DIR --calls FILE --peak FILE [--check]

Each stage writes one JSON object to ``--result``: ``{"stage", "status": "ok"|"failed"|"skipped",
"reason": one line, "numbers": {...}}`` and exits 0 (the parent reads the status; a crash or a
timeout without a result file is a failure there). ``--check`` runs the same code paths on the
CPU at tiny sizes; whatever cannot run on a CPU (CUDA graphs, CUDA peaks) is named in
``numbers["not_on_cpu"]``, never passed over silently.

Stages use only public entry points — ``train.py``, the ``pgen_engine`` model / Generator /
ops API, ``pytest tests/ops``, ``benchmarks.gpu_ops`` / ``gpu_attention`` ``run()`` and
``python -m benchmarks.gpu_generation`` — so internal refactors do not break them.

``probe`` runs a script (``train.py``) in this process and, at exit, writes the process's peak
CUDA memory (``torch.cuda.max_memory_allocated``, kept across the resets the RL memory ledger
makes at each phase) and, with ``--record-generate``, the largest :class:`Generator` call it
made (the RL rollout). ``genref`` replays that call alone on a fresh model: the generation peak
the RL stage is compared with.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("kernels", "ops_tests", "generator", "sft", "rl", "op_bench", "gen_bench")
# bf16 rollout log-probs (bf16 logits) vs the trainer's recomputation (fp32 softmax over bf16 logits):
# ~1e-2 typical; a misaligned position or a wrong temperature gives gaps of whole nats.
BF16_GAP_MAX = 0.25
FP32_GAP_MAX = 1e-4
RL_PEAK_TARGET = 1.15
SFT_STEPS, SFT_SAVE_EVERY = 8, 2
RL_STEPS = 3
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE")


class StageFailure(Exception):
    """A check of a stage failed; the message is the stage's one-line reason."""


def _one_line(text: str, limit: int = 240) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    line = lines[-1] if lines else ""
    return line[:limit]


def _device(check: bool):
    import torch

    if check:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StageFailure("no CUDA device visible to torch")
    return torch.device("cuda")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- 1. kernels
def stage_kernels(out: Path, check: bool) -> dict:
    """The extension's sampler and KV-write kernels against torch references, eagerly and inside a CUDA
    graph; the Triton shared-prefix decode kernel against its reference (float and float8 caches)."""
    import torch

    from pgen_engine.ops import paged_kv_write, sample
    from pgen_engine.ops._backend import extension

    dev = _device(check)
    ext = extension()
    if ext is None:
        raise StageFailure("pgen_engine._C is not built (python setup.py build_ext --inplace)")
    if not check and not getattr(ext, "with_cuda", False):
        raise StageFailure("pgen_engine._C was built without its CUDA kernels (torch without CUDA, or no nvcc)")
    sample_be, kv_be = ("cpp", "torch") if check else ("cuda", "cuda")
    nums: dict = {"sample_backend": sample_be, "kv_write_backend": kv_be}
    g = torch.Generator().manual_seed(0)
    B, V = (37, 4099) if not check else (9, 257)
    c = (torch.randn(B, V, generator=g) * 3).to(dev)
    u = (torch.randn(B, V, generator=g) * 3).to(dev)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (B,), generator=g, dtype=torch.int64).to(dev)
    # greedy (top_k=1) must be the argmax of the CFG-mixed logits, exactly
    greedy = sample(c, uncond_logits=u, guidance_scale=5.0, top_k=1, seed=seeds, backend=sample_be)
    want = (u.float() + 5.0 * (c.float() - u.float())).argmax(-1)
    if not torch.equal(greedy.cpu(), want.cpu()):
        raise StageFailure(f"sample({sample_be}) top_k=1 != torch argmax of the CFG logits "
                           f"in {int((greedy.cpu() != want.cpu()).sum())} of {B} rows")
    # sampled: the CUDA kernel draws the CPU sampler's tokens (an ulp of expf may flip one boundary)
    drawn = sample(c, uncond_logits=u, guidance_scale=3.0, temperature=0.8, top_k=57, top_p=0.9, seed=seeds,
                   backend=sample_be)
    ref = sample(c.cpu(), uncond_logits=u.cpu(), guidance_scale=3.0, temperature=0.8, top_k=57, top_p=0.9,
                 seed=seeds.cpu(), backend="cpp")
    nums["sample_vs_cpu_mismatches"] = int((drawn.cpu() != ref).sum())
    if nums["sample_vs_cpu_mismatches"] > 1:
        raise StageFailure(f"sample({sample_be}) differs from the CPU sampler in {nums['sample_vs_cpu_mismatches']} "
                           f"of {B} rows (at most 1 boundary flip allowed)")
    dtype = torch.float32 if check else torch.bfloat16
    nb, bs, hkv, d, n = 11, 16, 2, 64, 23

    def kv_inputs(seed: int):
        gg = torch.Generator().manual_seed(seed)
        kc, vc = (torch.randn(nb, bs, hkv, d, generator=gg).to(dtype).to(dev) for _ in range(2))
        kn, vn = (torch.randn(n, hkv, d, generator=gg).to(dtype).to(dev) for _ in range(2))
        slots = torch.randperm(nb * bs, generator=gg)[:n].to(torch.int64)
        slots[::5] = -1
        return kc, vc, kn, vn, slots.to(dev)

    def kv_reference(kc, vc, kn, vn, slots):
        kr, vr = kc.clone().view(-1, hkv, d), vc.clone().view(-1, hkv, d)
        keep = slots >= 0
        kr[slots[keep]], vr[slots[keep]] = kn[keep], vn[keep]
        return kr, vr

    kc, vc, kn, vn, slots = kv_inputs(1)
    kr, vr = kv_reference(kc, vc, kn, vn, slots)
    paged_kv_write(kc, vc, kn, vn, slots, backend=kv_be)
    if not (torch.equal(kc.view(-1, hkv, d), kr) and torch.equal(vc.view(-1, hkv, d), vr)):
        raise StageFailure(f"paged_kv_write({kv_be}) != torch index assignment")
    nums.update(_check_shared_prefix_decode(dev, check))
    if check:
        nums["not_on_cpu"] = ["cuda graph capture / replay of sample + paged_kv_write"]
        return {"status": "ok", "reason": "CPU sampler and KV write match torch (CUDA graph: needs a GPU)",
                "numbers": nums}
    # CUDA graph: capture both kernels once, feed new inputs through the static buffers, replay
    sc, su, ss = c.clone(), u.clone(), seeds.clone()
    kc0, vc0, kn0, vn0, sl0 = kv_inputs(2)
    skc, svc, skn, svn, ssl = kc0.clone(), vc0.clone(), kn0.clone(), vn0.clone(), sl0.clone()

    def body():
        tok = sample(sc, uncond_logits=su, guidance_scale=3.0, temperature=0.8, top_k=57, top_p=0.9, seed=ss,
                     backend="cuda")
        paged_kv_write(skc, svc, skn, svn, ssl, backend="cuda")
        return tok

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_tok = body()
    for trial in range(3):
        gg = torch.Generator().manual_seed(100 + trial)
        nc, nu = ((torch.randn(B, V, generator=gg) * 3).to(dev) for _ in range(2))
        ns = torch.randint(-(2 ** 62), 2 ** 62, (B,), generator=gg, dtype=torch.int64).to(dev)
        kc1, vc1, kn1, vn1, sl1 = kv_inputs(10 + trial)
        for dst, src in ((sc, nc), (su, nu), (ss, ns), (skc, kc1), (svc, vc1), (skn, kn1), (svn, vn1), (ssl, sl1)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = sample(nc, uncond_logits=nu, guidance_scale=3.0, temperature=0.8, top_k=57, top_p=0.9, seed=ns,
                       backend="cuda")
        if not torch.equal(static_tok, eager):
            raise StageFailure(f"CUDA graph replay {trial}: sampled tokens differ from the eager kernel")
        kr, vr = kv_reference(kc1, vc1, kn1, vn1, sl1)
        if not (torch.equal(skc.view(-1, hkv, d), kr) and torch.equal(svc.view(-1, hkv, d), vr)):
            raise StageFailure(f"CUDA graph replay {trial}: paged_kv_write != torch index assignment")
    nums["graph_replays"] = 3
    return {"status": "ok", "reason": "sample_cuda / paged_kv_write_cuda match torch, eager and in a CUDA graph",
            "numbers": nums}


def _check_shared_prefix_decode(dev, check: bool) -> dict:
    """The shared-prefix decode kernel (Triton on a GPU; the torch path in check mode) against its
    float64 reference, with bf16 and float8 caches, eagerly and (GPU) replayed from a CUDA graph."""
    import torch

    from pgen_engine.ops.decode_shared import shared_prefix_decode, shared_prefix_decode_ref
    from pgen_engine.ops.kv_quant import FP8_DTYPE, quantize

    be = "torch" if check else "triton"
    dt = torch.float32 if check else torch.bfloat16
    g = torch.Generator().manual_seed(7)
    B, P, hq, hkv, d, lp, lo = 12, 3, 8, 4, 128, 70, 9
    q = torch.randn(B, hq, d, generator=g)
    pk, pv = torch.randn(P, hkv, lp, d, generator=g), torch.randn(P, hkv, lp, d, generator=g)
    k, v = torch.randn(B, hkv, lo, d, generator=g), torch.randn(B, hkv, lo, d, generator=g)
    prow = torch.tensor([0, 1, 0, 2, 0, 1, 2, 2, 0, 1, 0, 2], dtype=torch.int32)
    plen = torch.tensor([70, 31, 2], dtype=torch.int32)[prow.long()]
    seqlens = plen + torch.tensor([1, 9, 4, 2, 9, 5, 3, 7, 6, 8, 1, 2], dtype=torch.int32)
    nums: dict = {"shared_prefix_decode_backend": be}
    for kind in ("float", "fp8"):
        if kind == "float":
            args = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
            scales: dict = {}
        else:  # per-(row, head) amax scales, as the cache write sets them
            sc = lambda x: x.abs().amax(dim=(2, 3)) / 448.0  # noqa: E731
            scales = dict(k_scale=sc(k), v_scale=sc(v), prefix_k_scale=sc(pk), prefix_v_scale=sc(pv))
            args = dict(q=q, k=quantize(k, scales["k_scale"]), v=quantize(v, scales["v_scale"]),
                        prefix_k=quantize(pk, scales["prefix_k_scale"]), prefix_v=quantize(pv, scales["prefix_v_scale"]))
        idx = dict(seqlens=seqlens, prefix_row=prow, prefix_len=plen)
        cast = {n: (t.to(dt) if t.dtype != FP8_DTYPE else t) for n, t in args.items()}
        # the reference sees exactly the kernel's (rounded) inputs, in float64
        ref = shared_prefix_decode_ref(**{n: (t.double() if t.dtype != FP8_DTYPE else t) for n, t in cast.items()},
                                       **idx, **scales)
        cast = {n: t.to(dev) for n, t in cast.items()}
        on_dev = {**cast, **{n: t.to(dev) for n, t in {**idx, **scales}.items()}}
        out = shared_prefix_decode(**on_dev, backend=be)
        err = float((out.double().cpu() - ref).abs().max())
        nums[f"shared_prefix_decode_{kind}_max_err"] = err
        if not err <= (1e-5 if dt == torch.float32 else 2e-2):
            raise StageFailure(f"shared_prefix_decode({be}, {kind} cache) differs from its reference by {err:.3g}")
        if not check:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                shared_prefix_decode(**on_dev, backend=be)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static = shared_prefix_decode(**on_dev, backend=be)
            on_dev["q"].mul_(-1)  # new inputs through the captured buffers
            graph.replay()
            torch.cuda.synchronize()
            if not torch.equal(static, shared_prefix_decode(**on_dev, backend=be)):
                raise StageFailure(f"shared_prefix_decode({be}, {kind}): CUDA graph replay != eager")
    return nums


# ----------------------------------------------------------------------------- 2. tests/ops
CHECK_OPS_TESTS = ("tests/ops/test_rotary.py", "tests/ops/test_rng.py")  # the quick ones under the interpreter


def stage_ops_tests(out: Path, check: bool, timeout: float) -> dict:
    """``pytest tests/ops`` with ``PGEN_TEST_DEVICE=cuda`` (compiled Triton / CUDA kernels on the GPU)."""
    if check:
        env = _env(PGEN_TEST_DEVICE="cpu", TRITON_INTERPRET="1")
        targets = list(CHECK_OPS_TESTS)
    else:
        env = _env(PGEN_TEST_DEVICE="cuda")
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the CPU interpreter
        targets = ["tests/ops"]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-m", "not slow", f"--junitxml={out / 'ops_tests.xml'}"]
    import importlib.util

    if not check and importlib.util.find_spec("xdist") is not None:
        # Triton compiles on the CPU: 8 workers share the one GPU and compile in parallel
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout - 5))
    except subprocess.TimeoutExpired:
        raise StageFailure(f"pytest {' '.join(targets)} did not finish within {timeout - 5:.0f} s") from None
    (out / "ops_tests.log").write_text(p.stdout + p.stderr)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", p.stdout)}
    nums = {"targets": targets, **counts}
    if p.returncode != 0 or counts.get("failed") or counts.get("error") or counts.get("errors"):
        first = next((ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))), _one_line(p.stdout))
        raise StageFailure(f"pytest exit {p.returncode}: {first[:200]}")
    if not counts.get("passed"):
        raise StageFailure("pytest ran no test")
    return {"status": "ok", "reason": f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped"
            + (" (check mode: a subset, Triton interpreter)" if check else ""), "numbers": nums}


# ----------------------------------------------------------------------------- 3. generator
def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    import torch

    import pgen_engine as pg

    special = pg.SpecialTokens.builtin()
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(6, vocab, (n,), generator=g).tolist()
        ids[0], ids[-1] = special.bos, special.boi
        out.append(ids)
    return out


def _left_pad(prompts: list[list[int]], repeat: int, pad: int):
    import torch

    S = max(len(p) for p in prompts)
    rows = [p for p in prompts for _ in range(repeat)]
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, S - len(p):] = torch.tensor(p)
        mask[r, S - len(p):] = 1
    return ids, mask


def stage_generator(out: Path, check: bool) -> dict:
    """bf16 Generator: graph, static and eager decode give identical tokens; rollout vs trainer log-prob gap."""
    import torch

    import pgen_engine as pg
    from pgen_engine.generation import Generator
    from pgen_engine.models.tiny import make_tiny_checkpoint

    dev = _device(check)
    geo = (dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=300,
                image_size=32, patch_size=8, codebook_size=64) if check else
           dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688, vocab_size=1024,
                image_size=64, patch_size=8, codebook_size=1024))
    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(d, seed=3, init_std=0.2, **geo)
        model = pg.load_model(path, device=dev, dtype=dtype).eval()
        model32 = pg.load_model(path, device=dev, dtype=torch.float32).eval()
    T = model.num_image_tokens
    prompts = _prompts(geo["vocab_size"], [12, 20, 7, 16], seed=5)
    G, max_len = 2, max(len(p) for p in prompts) + T
    modes = ["static", "eager"] if check else ["graph", "static", "eager"]
    nums: dict = {"dtype": "bfloat16", "modes": modes, "rows": len(prompts) * G, "image_tokens": T}
    kw = dict(num_samples=G, guidance_scale=5.0, top_k=100, top_p=0.95, seed=[11, 12, 13, 14])
    toks, lps, greedy = {}, {}, {}
    for m in modes:
        gen = Generator(model, max_batch_size=8, max_seq_len=max_len, decode_mode=m)
        toks[m], lps[m] = gen.generate(prompts, return_logprobs=True, **kw)
        again = gen.generate(prompts, **kw)  # second call: the cached graph replays
        if not torch.equal(again, toks[m]):
            raise StageFailure(f"decode_mode={m}: a second identical call gave other tokens")
        greedy[m] = gen.generate(prompts, num_samples=1, guidance_scale=5.0, greedy=True)
        del gen
    base = modes[0]
    for m in modes[1:]:
        for what, a, b in (("sampled", toks[base], toks[m]), ("greedy", greedy[base], greedy[m])):
            bad = int((a != b).sum())
            if bad:
                raise StageFailure(f"bf16 {what} tokens: {base} vs {m} differ in {bad} of {a.numel()}")
    nums["tokens_compared"] = int(toks[base].numel() + greedy[base].numel())
    # log-prob gap: the rollout's (from bf16 logits inside the decode step) vs teacher-forced recomputation
    pad = pg.SpecialTokens.builtin().pad
    ids, mask = _left_pad(prompts, G, pad)
    ids, mask, tk = ids.to(dev), mask.to(dev), toks[base]
    with torch.no_grad():
        ref16 = torch.log_softmax(model.image_logits(ids, tk, mask), -1).gather(-1, tk[..., None])[..., 0]
        ref32 = torch.log_softmax(model32.image_logits(ids, tk, mask), -1).gather(-1, tk[..., None])[..., 0]
    gap16 = (lps[base].float() - ref16.float()).abs()
    gap32 = (lps[base].float() - ref32.float()).abs()
    nums.update(logprob_gap_max=float(gap16.max()), logprob_gap_mean=float(gap16.mean()),
                logprob_gap_vs_fp32_max=float(gap32.max()), logprob_gap_vs_fp32_mean=float(gap32.mean()),
                logprob_gap_tolerance=BF16_GAP_MAX)
    if not (math.isfinite(nums["logprob_gap_max"]) and nums["logprob_gap_max"] <= BF16_GAP_MAX):
        raise StageFailure(f"bf16 rollout vs trainer log-prob gap {nums['logprob_gap_max']:.3g} > {BF16_GAP_MAX}")
    # the float32 model keeps the exact contract (tested at 1e-5 in tests/): check it here too
    gen32 = Generator(model32, max_batch_size=8, max_seq_len=max_len, decode_mode=base)
    t32, lp32 = gen32.generate(prompts, return_logprobs=True, **kw)
    with torch.no_grad():
        r32 = torch.log_softmax(model32.image_logits(ids, t32, mask), -1).gather(-1, t32[..., None])[..., 0]
    nums["fp32_logprob_gap_max"] = float((lp32 - r32).abs().max())
    if not nums["fp32_logprob_gap_max"] <= FP32_GAP_MAX:
        raise StageFailure(f"fp32 rollout vs trainer log-prob gap {nums['fp32_logprob_gap_max']:.3g} > {FP32_GAP_MAX}")
    if check:
        nums["not_on_cpu"] = ["decode_mode='graph' (CUDA graphs)"]
    return {"status": "ok", "reason": f"{'/'.join(modes)} tokens identical; bf16 log-prob gap max "
            f"{nums['logprob_gap_max']:.2g} (tolerance {BF16_GAP_MAX}), fp32 {nums['fp32_logprob_gap_max']:.1g}",
            "numbers": nums}


# ----------------------------------------------------------------------------- 4. SFT
def _data_overrides(out: Path) -> list[str]:
    data = out / "data"
    return [f"data.dataset_dir={data / 'synth'}", f"data.work_dir={data / 'work'}", "data.synth.users=40",
            "data.codebook_size=32", "data.kmeans_iters=5", "logging.progress=false"]


def _sft_overrides(out: Path, run: Path, check: bool, steps: int) -> list[str]:
    return [f"output_dir={run}", *_data_overrides(out), f"train.max_steps={steps}", "train.micro_batch_size=4",
            "train.global_batch_size=8", "train.warmup_steps=1", f"train.save_every={SFT_SAVE_EVERY}",
            "train.keep_checkpoints=2", "deepspeed.zero_stage=3", "deepspeed.activation_checkpointing=true",
            f"deepspeed.precision={'auto' if check else 'bf16'}"]


def _train_cmd(config: str, args: list[str], *, peak: Path | None = None, record: Path | None = None) -> list[str]:
    script = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config), *args]
    if peak is None:
        return [sys.executable, *script]
    head = [sys.executable, "-m", "benchmarks.smoke_stages", "probe", "--peak", str(peak)]
    if record is not None:
        head += ["--record-generate", str(record)]
    return [*head, "--", *script]


def _run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as e:
        log.write_text(f"{e.stdout or ''}{e.stderr or ''}")
        raise StageFailure(f"{Path(cmd[cmd.index('--config') - 1]).name if '--config' in cmd else cmd[1]} "
                           f"did not finish within {timeout:.0f} s (log: {log})") from None
    log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise StageFailure(f"exit {p.returncode}: {_one_line(p.stderr or p.stdout)} (log: {log})")
    return p


def _metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {int(r["step"]): r for r in rows}


def _read_peak(path: Path, key: str = "max_memory_allocated") -> int | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(key)


def _plan(config: str, args: list[str], out: Path, timeout: float) -> dict:
    """``pgen plan`` of the same run on 1 GPU: its ``peak per GPU`` line, to set beside the measured peak."""
    import torch

    mem = ["--gpu-mem", f"{torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.1f}"] \
        if torch.cuda.is_available() else []
    cmd = [sys.executable, "-m", "pgen_engine", "plan", "--config", str(ROOT / "configs" / config), "--gpus", "1",
           *mem, *[a for a in args if not a.startswith(("output_dir=", "logging."))]]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"pgen plan did not finish within {timeout:.0f} s"}
    (out / f"plan_{Path(config).stem}.log").write_text(p.stdout + p.stderr)
    m = re.search(r"peak per GPU: ([0-9.]+) GiB of ([0-9.]+) GiB", p.stdout)
    if p.returncode not in (0, 3) or m is None:
        return {"status": "failed", "reason": f"pgen plan exit {p.returncode}: {_one_line(p.stderr or p.stdout)}"}
    return {"status": "ok", "peak_gib": float(m.group(1)), "gpu_gib": float(m.group(2)), "fits": p.returncode == 0}


def _deadline_left(t_end: float) -> float:
    return t_end - time.monotonic()


def stage_sft(out: Path, check: bool, timeout: float) -> dict:
    """1-GPU ZeRO-3 bf16 SFT with activation checkpointing: 8 steps, SIGKILL after a checkpoint, resume, load final/."""
    import torch

    import pgen_engine as pg

    t_end = time.monotonic() + timeout - 5
    run = out / "sft"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    args = _sft_overrides(out, run, check, SFT_STEPS)
    latest = run / "checkpoints" / "latest"
    with open(out / "sft_killed.log", "w") as log:
        proc = subprocess.Popen(_train_cmd("demo_sft.yaml", args), cwd=ROOT, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        while not latest.exists() and proc.poll() is None and _deadline_left(t_end) > 0:
            time.sleep(0.01)
        finished_first = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not latest.exists():
        raise StageFailure(f"no checkpoint appeared before the kill (exit {proc.returncode}; "
                           f"log: {out / 'sft_killed.log'}: {_one_line((out / 'sft_killed.log').read_text())})")
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    if finished_first or killed_at >= SFT_STEPS:
        raise StageFailure(f"the run ended (exit {proc.returncode}) before it could be killed; latest = step {killed_at}")
    peak_file = run / "peak.json"
    _run(_train_cmd("demo_sft.yaml", [*args, "--resume", "auto"], peak=peak_file), out / "sft_resumed.log",
         _deadline_left(t_end))
    summary = json.loads((run / "summary.json").read_text())
    rows = _metrics(run)
    if summary.get("resumed_from") != killed_at:
        raise StageFailure(f"summary.json resumed_from={summary.get('resumed_from')}, expected {killed_at}")
    if sorted(rows) != list(range(1, SFT_STEPS + 1)):
        raise StageFailure(f"metrics.jsonl steps {sorted(rows)} != 1..{SFT_STEPS}")
    losses = [rows[s]["loss"] for s in sorted(rows)]
    if not all(math.isfinite(x) for x in losses):
        raise StageFailure(f"non-finite loss in {losses}")
    want_precision = "fp32" if check else "bf16"
    if summary.get("precision") != want_precision:
        raise StageFailure(f"summary.json precision={summary.get('precision')}, expected {want_precision}")
    dev = _device(check)
    model = pg.load_model(run / "final", device=dev, dtype=torch.float32 if check else torch.bfloat16).eval()
    prompts = _prompts(model.config.text.vocab_size, [9, 6], seed=1)
    ids, mask = _left_pad(prompts, 1, pg.SpecialTokens.builtin().pad)
    from pgen_engine.generation import Generator

    codes = Generator(model, max_batch_size=2, max_seq_len=9 + model.num_image_tokens).generate(prompts, seed=3)
    logits = model.image_logits(ids.to(dev), codes, mask.to(dev))
    if not bool(torch.isfinite(logits).all()):
        raise StageFailure("final/ loads but its logits are not finite")
    nums = {"steps": SFT_STEPS, "killed_after_checkpoint": killed_at, "resumed_from": summary["resumed_from"],
            "loss_first": losses[0], "loss_last": losses[-1], "precision": summary.get("precision"),
            "activation_checkpointing": True, "zero_stage": 3,
            "step_time_s_median": sorted(rows[s].get("step_time_s", float("nan")) for s in rows)[len(rows) // 2],
            "peak_bytes": _read_peak(peak_file)}
    if check:
        nums["not_on_cpu"] = ["bf16 (fp32 on CPU)", "CUDA peak memory"]
    return {"status": "ok", "reason": f"killed after step {killed_at}, resumed, {SFT_STEPS} steps, final/ loads "
            f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})", "numbers": nums}


# ----------------------------------------------------------------------------- 5. RL
def stage_rl(out: Path, check: bool, timeout: float) -> dict:
    """1-GPU GRPO through the hybrid engine: CFG rollouts, graph decode, offload_states, memory ledger, peaks."""
    t_end = time.monotonic() + timeout - 5
    sft = out / "sft"
    notes = []
    if not (sft / "final" / "config.json").is_file():
        # stage 4 did not leave a model: make a 2-step one (same data) so this stage still runs
        sft = out / "sft_for_rl"
        _run(_train_cmd("demo_sft.yaml", _sft_overrides(out, sft, check, 2), peak=sft / "peak.json"),
             out / "sft_for_rl.log", _deadline_left(t_end) * 0.4)
        notes.append("own 2-step SFT (stage sft left no final/)")
    run = out / "rl"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    args = [f"output_dir={run}", f"model.checkpoint={sft / 'final'}", *_data_overrides(out),
            f"train.max_steps={RL_STEPS}", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.warmup_steps=1", "train.save_every=0", "rl.group_size=4", "rl.prompts_per_step=4",
            "rl.rollout_batch_size=16", "rl.guidance_scale=5.0", "rl.eval_prompts=4", "rl.eval_every=0",
            "rl.reference=device", "deepspeed.zero_stage=3", "deepspeed.activation_checkpointing=true",
            f"deepspeed.precision={'auto' if check else 'bf16'}",
            # DeepSpeed's offload_states moves FusedAdam states; CUDA only (refused on CPU)
            f"rl.offload_optimizer_states={'false' if check else 'true'}"]
    peak_file, calls_file = run / "peak.json", run / "generate_calls.json"
    _run(_train_cmd("demo_rl.yaml", args, peak=peak_file, record=calls_file), out / "rl.log",
         _deadline_left(t_end) * 0.8)
    rows = _metrics(run)
    steps = [s for s in sorted(rows) if s >= 1]
    if steps != list(range(1, RL_STEPS + 1)):
        raise StageFailure(f"metrics.jsonl RL steps {steps} != 1..{RL_STEPS}")
    need = ["reward", "loss", "kl", "logprob_gap_max", "logprob_gap_mean", "mem/rollout_kv_bytes",
            "mem/rollout_gathered_weights_bytes", "mem/update_activations_bytes", "mem/total_bytes"]
    if not check:
        need += ["mem/rollout_peak_bytes", "mem/update_peak_bytes"]
    for s in steps:
        missing = [k for k in need if k not in rows[s]]
        if missing:
            raise StageFailure(f"step {s} metrics lack {missing}")
        if not rows[s]["mem/rollout_kv_bytes"] > 0:
            raise StageFailure(f"step {s}: the memory ledger recorded no rollout KV bytes")
        if not all(math.isfinite(float(rows[s][k])) for k in ("reward", "loss", "kl")):
            raise StageFailure(f"step {s}: non-finite reward / loss / kl")
    if not (run / "final" / "config.json").is_file():
        raise StageFailure("the RL run wrote no final/")
    calls = json.loads(calls_file.read_text()) if calls_file.is_file() else {"calls": [], "largest": None}
    if not calls["calls"] or calls.get("largest") is None:
        raise StageFailure("the RL run made no Generator call (rollouts did not go through pg.Generator)")
    big = calls["largest"]
    if not big["generate"]["guidance_scale"] != 1.0:
        raise StageFailure(f"rollouts ran without CFG (guidance_scale={big['generate']['guidance_scale']})")
    want_mode = "eager" if check else "graph"
    if big["decode_mode"] != want_mode:
        raise StageFailure(f"rollout decode mode {big['decode_mode']!r}, expected {want_mode!r}")
    last = rows[steps[-1]]
    nums = {"steps": RL_STEPS, "decode_mode": big["decode_mode"], "guidance_scale": big["generate"]["guidance_scale"],
            "rollout_rows": big["rows"], "offload_optimizer_states": not check, "reference": "device",
            "logprob_gap_max": max(rows[s]["logprob_gap_max"] for s in steps),
            "logprob_gap_mean": sum(rows[s]["logprob_gap_mean"] for s in steps) / len(steps),
            "reward_last": last["reward"], "kl_last": last["kl"],
            "ledger": {k: v for k, v in last.items() if k.startswith("mem/")},
            "rl_peak_bytes": _read_peak(peak_file), "notes": notes}
    # generation alone: the largest rollout call replayed on the same weights in a fresh process
    gen_peak = run / "genref_peak.json"
    gcmd = [sys.executable, "-m", "benchmarks.smoke_stages", "genref", "--checkpoint", str(sft / "final"),
            "--calls", str(calls_file), "--peak", str(gen_peak)] + (["--check"] if check else [])
    _run(gcmd, out / "rl_genref.log", _deadline_left(t_end))
    nums["generation_peak_bytes"] = _read_peak(gen_peak)
    nums["sft_peak_bytes"] = _read_peak(sft / "peak.json")
    nums["rl_peak_reserved_bytes"] = _read_peak(peak_file, "max_memory_reserved")
    nums["plan"] = _plan("demo_rl.yaml", args, out, _deadline_left(t_end))
    ref = [x for x in (nums["generation_peak_bytes"], nums["sft_peak_bytes"]) if x]
    reason = f"{RL_STEPS} GRPO steps, {nums['rollout_rows']} rollout rows with CFG, {big['decode_mode']} decode"
    if nums["rl_peak_bytes"] and len(ref) == 2:
        ratio = nums["rl_peak_bytes"] / max(ref)
        nums.update(peak_ratio=ratio, peak_target=RL_PEAK_TARGET, peak_target_met=ratio <= RL_PEAK_TARGET)
        reason += (f"; peak {nums['rl_peak_bytes'] / 2 ** 20:.0f} MiB = {ratio:.2f}x max(SFT, generation) "
                   f"({'meets' if ratio <= RL_PEAK_TARGET else 'OVER'} the {RL_PEAK_TARGET}x target)")
    elif check:
        nums["not_on_cpu"] = ["bf16", "graph decode", "offload_states", "CUDA peaks (ratio vs SFT / generation)"]
        reason += " (CPU: no CUDA peaks)"
    else:
        raise StageFailure(f"peak memory not measured (RL {nums['rl_peak_bytes']}, SFT {nums['sft_peak_bytes']}, "
                           f"generation {nums['generation_peak_bytes']})")
    plan = nums["plan"]
    reason += (f"; pgen plan: {plan['peak_gib']:.2f} GiB incl. its CUDA context reserve" if plan["status"] == "ok"
               else f"; pgen plan {plan['status']}: {plan['reason']}")
    return {"status": "ok", "reason": reason, "numbers": nums}


# ----------------------------------------------------------------------------- 6. op benchmarks
def stage_op_bench(out: Path, check: bool) -> dict:
    """``benchmarks.gpu_ops.run`` and ``benchmarks.gpu_attention.run`` (tiny CPU shapes in check mode)."""
    import importlib

    rows: list[dict] = []
    for name in ("benchmarks.gpu_ops", "benchmarks.gpu_attention"):
        mod = importlib.import_module(name)
        rows += [dict(r, suite=name.rsplit(".", 1)[1]) for r in mod.run(check_only=check)]
    bad = [r for r in rows if r.get("ok") is False]
    if not rows:
        raise StageFailure("the op suites returned no rows")
    nums = {"rows": rows}
    if bad:
        return {"status": "failed", "reason": f"{len(bad)} op check(s) failed: {bad[0].get('op')} {bad[0].get('shape')}",
                "numbers": nums}
    timed = [r for r in rows if isinstance(r.get("ms"), (int, float))]
    if not timed or not all(r["ms"] > 0 for r in timed):
        raise StageFailure("op benchmark rows without a positive time")
    return {"status": "ok", "reason": f"{len(timed)} ops timed" + (" (tiny CPU shapes)" if check else ""),
            "numbers": nums}


# ----------------------------------------------------------------------------- 7. generation benchmark
def stage_gen_bench(out: Path, check: bool, timeout: float) -> dict:
    """``python -m benchmarks.gpu_generation`` (Janus-Pro-1B geometry vs transformers; tiny on CPU)."""
    res = out / "gen_bench.json"
    res.unlink(missing_ok=True)
    env = _env()
    # one graph-decode batch and one timed round by default so the whole smoke run fits its budget;
    # the caller's PGEN_BENCH_* settings win
    for k, v in (("PGEN_BENCH_BATCHES", "64"), ("PGEN_BENCH_HF_BATCHES", "64"), ("PGEN_BENCH_ROUNDS", "1")):
        env.setdefault(k, v)
    cmd = [sys.executable, "-m", "benchmarks.gpu_generation", "--json", str(res)] + (["--check"] if check else [])
    timed_out = False
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout - 5))
        (out / "gen_bench.log").write_text(p.stdout + p.stderr)
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        (out / "gen_bench.log").write_text(f"{e.stdout or ''}{e.stderr or ''}")
        timed_out, rc = True, None
    rows = json.loads(res.read_text())["rows"] if res.is_file() else []
    nums = {"rows": rows, "settings": {k: env[k] for k in env if k.startswith("PGEN_BENCH_")}}
    checks = [r for r in rows if r.get("op") == "check"]
    if timed_out:
        return {"status": "failed", "reason": f"did not finish within {timeout - 5:.0f} s ({len(rows)} rows saved)",
                "numbers": nums}
    if rc != 0 or not checks or not all(r.get("ok") for r in checks) or any(r.get("ok") is False for r in rows):
        bad = next((r for r in rows if r.get("ok") is False), None)
        why = f"{bad.get('shape')} {bad.get('error', '')}" if bad else _one_line((out / "gen_bench.log").read_text())
        return {"status": "failed", "reason": f"exit {rc}: {why}"[:240], "numbers": nums}
    speed = [r for r in rows if r.get("speedup_vs_transformers")]
    reason = f"{len(checks)} token checks ok"
    if speed:
        best = max(speed, key=lambda r: r["speedup_vs_transformers"])
        reason += f"; {best['speedup_vs_transformers']:.2f}x transformers at {best.get('shape')}"
    return {"status": "ok", "reason": reason + (" (tiny CPU shapes)" if check else ""), "numbers": nums}


# ----------------------------------------------------------------------------- probe / genref
def _install_peak_tracker(path: Path) -> None:
    """At exit write the process's CUDA peak, folding in the peaks that reset_peak_memory_stats would discard."""
    import atexit

    import torch

    state = {"max": 0}

    def current() -> int:
        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0

    orig = torch.cuda.reset_peak_memory_stats

    def reset(device=None):
        state["max"] = max(state["max"], current())
        return orig(device)

    torch.cuda.reset_peak_memory_stats = reset
    torch.cuda.memory.reset_peak_memory_stats = reset

    def write() -> None:
        peak = max(state["max"], current())
        path.parent.mkdir(parents=True, exist_ok=True)
        reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        path.write_text(json.dumps({"max_memory_allocated": peak if torch.cuda.is_available() else None,
                                    "max_memory_reserved": reserved,
                                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))

    atexit.register(write)


def _json_generate_kwargs(kw: dict) -> dict:
    """``Generator.generate`` keywords as JSON: a ``SamplingParams`` becomes its loose fields
    (which ``generate`` also accepts), so the replay can pass them back unchanged."""
    import dataclasses

    out = {}
    for k, v in kw.items():
        if k in ("gen_code_mask", "progress", "image_embeds"):  # image_embeds: saved as tensors beside the JSON
            continue
        if k == "sampling" and dataclasses.is_dataclass(v):
            out.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
            continue
        out[k] = v.tolist() if hasattr(v, "tolist") else v
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
    return out


def _install_generate_recorder(path: Path) -> None:
    """Record every Generator.generate call (size), and in full the one with the most rows."""
    import atexit

    from pgen_engine.generation import generator as gmod
    from pgen_engine.generation.decode_graph import resolve_decode_mode

    log: dict = {"calls": [], "largest": None}
    pixels: dict = {"largest": None}
    cls = gmod.Generator
    orig_init, orig_gen = cls.__init__, cls.generate

    def init(self, model, **kw):
        orig_init(self, model, **kw)
        self._smoke_init = {k: (str(v) if k == "cache_dtype" and v is not None else v) for k, v in kw.items()}

    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kw):
        as_lists = input_ids.tolist() if hasattr(input_ids, "tolist") else [list(p) for p in input_ids]
        if attention_mask is not None:
            m = attention_mask.tolist()
            as_lists = [[t for t, k in zip(r, mr) if k] for r, mr in zip(as_lists, m)]
        rows = len(as_lists) * int(kw.get("num_samples", 1))
        gm = kw.get("gen_code_mask")
        entry = {"rows": rows, "prompts": len(as_lists),
                 "decode_mode": resolve_decode_mode(getattr(self, "_smoke_init", {}).get("decode_mode", "auto"),
                                                    self.model.device),
                 "init": getattr(self, "_smoke_init", {}),
                 "generate": _json_generate_kwargs(kw)}
        log["calls"].append({k: entry[k] for k in ("rows", "prompts", "decode_mode")})
        if log["largest"] is None or rows > log["largest"]["rows"]:
            full = dict(entry, input_ids=as_lists, pixel_values=None if pixel_values is None else pixel_file.name,
                        gen_code_mask=None if gm is None else [list(map(bool, c)) for c in
                                                               (gm.tolist() if hasattr(gm, "tolist") else gm)])
            emb = kw.get("image_embeds")
            full["image_embeds"] = None if emb is None else embeds_file.name
            log["largest"] = full
            pixels["largest"] = None if pixel_values is None else pixel_values.detach().cpu().clone()
            # the rollout passes cached history features instead of pixels: keep them for the replay
            pixels["embeds"] = None if emb is None else [None if e is None else e.detach().cpu().clone() for e in emb]
        return orig_gen(self, input_ids, attention_mask, pixel_values, **kw)

    def write() -> None:
        import torch

        if pixels["largest"] is not None:
            torch.save(pixels["largest"], pixel_file)
        if pixels.get("embeds") is not None:
            torch.save(pixels["embeds"], embeds_file)
        path.write_text(json.dumps(log))

    pixel_file = path.with_name(path.stem + "_pixels.pt")
    embeds_file = path.with_name(path.stem + "_image_embeds.pt")
    cls.__init__, cls.generate = init, generate
    atexit.register(write)


def probe(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="smoke_stages probe")
    ap.add_argument("--peak", type=Path, required=True)
    ap.add_argument("--record-generate", type=Path)
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    import runpy

    _install_peak_tracker(a.peak)
    if a.record_generate is not None:
        _install_generate_recorder(a.record_generate)
    sys.argv = [a.script, *a.args]
    sys.path.insert(0, str(Path(a.script).resolve().parent))
    runpy.run_path(a.script, run_name="__main__")
    return 0


def genref(argv: list[str]) -> int:
    """Replay the recorded largest Generator call alone; write the process's CUDA peak."""
    ap = argparse.ArgumentParser(prog="smoke_stages genref")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--calls", type=Path, required=True)
    ap.add_argument("--peak", type=Path, required=True)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    import torch

    import pgen_engine as pg
    from pgen_engine.generation import Generator

    _install_peak_tracker(a.peak)
    big = json.loads(a.calls.read_text())["largest"]
    dev = _device(a.check)
    model = pg.load_model(a.checkpoint, device=dev, dtype=torch.float32 if a.check else torch.bfloat16).eval()
    px = None
    if big.get("pixel_values"):
        px = torch.load(a.calls.with_name(big["pixel_values"])).to(dev)
    init = {k: v for k, v in big["init"].items() if k != "cache_dtype"}
    if big["init"].get("cache_dtype"):
        init["cache_dtype"] = getattr(torch, big["init"]["cache_dtype"].removeprefix("torch."))
    gen = Generator(model, **init)
    kw = dict(big["generate"])
    if big.get("image_embeds"):
        kw["image_embeds"] = [None if e is None else e.to(dev, model.dtype)
                              for e in torch.load(a.calls.with_name(big["image_embeds"]))]
    out = gen.generate(big["input_ids"], None, px, gen_code_mask=big["gen_code_mask"], **kw)
    codes = out[0] if isinstance(out, tuple) else out
    print(f"genref: {tuple(codes.shape)} codes, cache {gen.cache_nbytes()} B")
    return 0


# ----------------------------------------------------------------------------- entry
def run_stage(name: str, out: Path, check: bool, timeout: float) -> dict:
    """Run one stage; never raises (a failure becomes the result)."""
    t0 = time.monotonic()
    try:
        fn = globals()[f"stage_{name}"]
        takes_timeout = "timeout" in fn.__code__.co_varnames[:fn.__code__.co_argcount]
        res = fn(out, check, timeout) if takes_timeout else fn(out, check)
    except StageFailure as e:
        res = {"status": "failed", "reason": _one_line(str(e)), "numbers": {}}
    except ModuleNotFoundError as e:
        res = {"status": "failed", "reason": f"cannot run: {e} (missing dependency; see `make wheelhouse`)",
               "numbers": {}}
    except Exception as e:  # a crash is a failure with its exception line; the trace goes to stderr
        traceback.print_exc()
        res = {"status": "failed", "reason": f"{type(e).__name__}: {_one_line(str(e))}", "numbers": {}}
    res["stage"] = name
    res["seconds"] = time.monotonic() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "probe":
        return probe(argv[1:])
    if argv and argv[0] == "genref":
        return genref(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="this stage's budget in seconds")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run_stage(a.stage, a.out, a.check, a.timeout)
    from pgen_engine.io_utils import atomic_write_text

    atomic_write_text(a.result, json.dumps(res, indent=1, default=str))
    print(f"[{a.stage}] {res['status']}: {res['reason']} ({res['seconds']:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
