"""Image generation throughput on CPU: pgen ``Generator`` vs ``transformers`` Janus ``generate``.

    python -m pytest benchmarks/test_bench_generation.py -q -s
    PGEN_BENCH_GEOMETRY=all python -m pytest benchmarks/test_bench_generation.py -q -s
    (knobs PGEN_BENCH_{GEOMETRY,BATCHES,DEVICE,DTYPE,ROUNDS,PROMPT_LEN}; the GPU suite with CUDA-graph
    decode and the Janus-Pro-1B geometry is benchmarks/gpu_generation.py, see benchmarks/README.md)

Same random checkpoint and prompts for both: hidden 256, 4 layers, 4 heads, 64 image
tokens (image 64 px, patch 8), 128-token prompts, CFG 5 (pad unconditional prompt), plain
sampling (temperature 1, no top-k / top-p shortcuts); batch 1, 8, 32. The default geometry
"realistic" has Janus-like proportions: MLP 4 x hidden (1024) and a 1024-code codebook.
Labelled extras (``PGEN_BENCH_GEOMETRY``): "tiny-codebook64" (the tiny factory's codebook 64 /
MLP 96, where the decoder is nearly free) and "janus-ratio" (MLP 688 = 2.69x hidden,
codebook 16384: the generation head dominates a decode step).

Besides images/s the module measures this machine's float32 GEMM peak with a large
``torch.mm`` before and after every case of the run (the best of them: a single short
measurement during a load spike read half the peak) and prints pgen's decode FLOP/s as a fraction of it
(``decode_gemm_fraction``; ``decode_gemm_fraction_best`` divides by the faster of torch.mm and the C++
decode's own packed GEMM on the same shape, which on some CPUs is the faster one). Decode
FLOPs: 2 per ``nn.Linear`` weight per row — decoder layers and generation head for every row,
CFG rows included, the code aligner for the conditional rows, whose partners embed the same
codes — plus the attention's 4 * context * heads * head_dim per row and layer. It also prints
the Generator's ``kv_bytes_peak``.

It also measures this machine's read rate for a working set the size of the wave's K/V
(``torch.sum`` over a warm tensor of ``kv_bytes_peak`` bytes, after each case, the best of the
run) and prints a roofline for the decode loop in the layout in use: a step cannot take less than
its matrix FLOPs at the faster GEMM's rate plus the K/V bytes it must read at that bandwidth (sum, not
max: on CPU the GEMM phase and the attention phase of a layer run one after the other, and
the attention is bound by memory). ``decode_roofline_fraction`` = that bound / pgen's measured
decode time, ``speedup_cap`` = transformers' wall time / (pgen's prefill + the bound): the
best speed-up an implementation reading float32 K/V in this layout, with each layer's GEMMs and
attention one after the other (as on this CPU), could show in this run (one that overlapped them
could approach the larger of the two terms instead), and ``gemm_fraction_cap`` the decode GEMM
fraction a decode running at the bound would show. The bound leaves out streaming the weights.

Each round runs pgen and transformers on the same prompts and seed, in alternating order
(paired, so drifting machine load hits both and neither always runs second); the speed-up is
the median per-round ratio of wall (and of process CPU) time. Per case (``extra_info``):
images/s and decode tokens/s from the best round's wall time, prefill / decode seconds reported
separately (prefill: pgen's prompt passes, transformers' time inside its language model's first
call; decode: the rest of the call's wall time, for both; the GEMM and roofline fractions use
pgen's decode loop alone), and process CPU seconds — this machine's 2 cores are shared, so CPU
time is the steadier comparison. Every timed call's codes are checked to lie in the codebook,
and a greedy check asserts tokens identical to transformers' at every measured batch.
The module ends with a ratio table and one JSON line.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator
from pgen_engine.models.tiny import make_tiny_checkpoint

from benchmarks.hf_janus import load_hf_janus

BASE = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, image_size=64, patch_size=8,
            max_position_embeddings=512)
GEOMETRIES = {
    "realistic": dict(BASE, intermediate_size=4 * BASE["hidden_size"], codebook_size=1024),
    "tiny-codebook64": dict(BASE),  # labelled extra: codebook 64 / MLP 96, not representative
    "janus-ratio": dict(BASE, intermediate_size=688, codebook_size=16384, vocab_size=1024),
    # GPU only: Janus-Pro-1B's language model + generation head geometry with random weights
    "janus-pro-1b": dict(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=5504,
                         vocab_size=102400, image_size=384, patch_size=16, codebook_size=16384,
                         max_position_embeddings=4096),
}
SELECTED = ["realistic", "tiny-codebook64", "janus-ratio"] if os.environ.get("PGEN_BENCH_GEOMETRY") == "all" else \
    [g for g in os.environ.get("PGEN_BENCH_GEOMETRY", "realistic").split(",") if g]
BATCHES = tuple(int(b) for b in os.environ.get("PGEN_BENCH_BATCHES", "1,8,32").split(","))
DEVICE = os.environ.get("PGEN_BENCH_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("PGEN_BENCH_DTYPE", "float32"))
PROMPT_LEN = int(os.environ.get("PGEN_BENCH_PROMPT_LEN", "128"))
GUIDANCE, TOP_K, TOP_P = 5.0, 0, 1.0  # no top-k / top-p shortcuts: the full codebook is sampled
ROUNDS = int(os.environ.get("PGEN_BENCH_ROUNDS", "3"))
RESULTS: dict[tuple[str, int, str], dict] = {}


@pytest.fixture(scope="module", params=SELECTED)
def setup(request, tmp_path_factory):
    name = request.param
    if name not in GEOMETRIES:
        raise ValueError(f"PGEN_BENCH_GEOMETRY: unknown geometry {name!r}; expected {list(GEOMETRIES)} or 'all'")
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("bench_gen") / name, seed=0, **GEOMETRIES[name])
    hf = load_hf_janus(path, dtype=DTYPE, device=DEVICE)  # image generate ready on this transformers release
    special = pg.SpecialTokens.builtin()
    model = pg.load_model(path, device=DEVICE, dtype=DTYPE)
    gen = Generator(model, max_batch_size=max(BATCHES), max_seq_len=PROMPT_LEN + model.num_image_tokens)
    vocab = model.config.text.vocab_size
    g = torch.Generator().manual_seed(17)
    ids = torch.randint(6, vocab, (max(BATCHES), PROMPT_LEN), generator=g)
    ids[:, 0], ids[:, -1] = special.bos, special.boi
    return name, model, hf, gen, ids.to(DEVICE)


# every measurement of this run: the rates used are the best seen, as the decode times are the
# best round's (one short measurement under a load spike read 144-181 GFLOP/s against 306-330
# idle, 2026-12-07, and gave roofline fractions of 5: a "bound" 5x slower than pgen's decode)
_PEAK: list[float] = []


def gemm_peak_flops(n: int = 2048, reps: int = 3, measure: bool = False) -> float:
    """This machine's float32 GEMM rate: the best ``[n, n] @ [n, n]`` torch.mm of this run.
    ``measure`` (or no measurement yet) times ``reps`` more first, now."""
    if measure or not _PEAK:
        a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
        _PEAK.append(2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), reps))  # warm-up: BLAS threads, buffers
    return max(_PEAK)


def _best_seconds(fn, reps: int) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


_PACKED: list[float] = []


def packed_gemm_flops(n: int = 2048, reps: int = 3, measure: bool = False) -> float | None:
    """The C++ decode's packed AVX-512 GEMM (``_C.packed_mm_cpu``) on the same ``[n, n] @ [n, n]``:
    the best rate of this run on one thread times the threads in use, or None where it does not run
    (no AVX-512, no extension, a GPU).

    Why beside ``torch.mm``: the BLAS torch uses is not this CPU's best fp32 GEMM everywhere (on an
    AMD EPYC VM MKL's torch.mm on 2 threads read 174-200 GFLOP/s, this kernel 177-197 on one thread,
    and 337-357 on two threads with the decode's own rows, ``benchmarks/gemm_rows_cpu.cpp``), and a
    bound built on a slower GEMM than the decode's own is no bound (roofline fractions above 1).
    ``packed_mm_cpu`` runs on the calling thread; the decode gives each thread its own rows, so
    one thread's rate times the threads is the rate the decode's GEMM can reach."""
    try:
        from pgen_engine import _C
    except ImportError:
        return None
    if not DEVICE.startswith("cpu") or not _C.packed_gemm_available():
        return None
    if measure or not _PACKED:
        a, w = torch.randn(n, n), torch.randn(n, n)
        # each call packs w: ~1 % of the product's time at n = 2048
        _PACKED.append(2 * n ** 3 / _best_seconds(lambda: _C.packed_mm_cpu(a, w), reps) * torch.get_num_threads())
    return max(_PACKED)


def best_gemm_flops() -> float:
    """This run's fastest fp32 GEMM: the better of torch.mm and the packed kernel (the roofline's peak)."""
    return max(gemm_peak_flops(), max(_PACKED, default=0.0))


_BW: dict[int, list[float]] = {}


def read_bandwidth(nbytes: int, reps: int = 5, measure: bool = False) -> float:
    """This machine's read rate, bytes/s, for a working set of ``nbytes``: the best of this run's
    ``torch.sum`` over a warm float32 tensor of that size, with the current threads (``measure``, or
    no measurement of that size yet: ``reps`` more first, now).

    Sized like the K/V a wave holds, not fixed: a working set that fits a cache level reads
    several times faster than one that does not (this VM, one thread: ~22 GB/s at 17 MiB,
    ~6-7 GB/s at 67 MiB and above), and a lower bound must use the rate the cache could get.
    """
    key = max(int(nbytes), 2 ** 20)
    if measure or key not in _BW:
        x = torch.ones(key // 4, device=DEVICE)
        x.sum()  # warm-up: pages touched, threads started, cache filled
        best = float("inf")
        for _ in range(reps):
            _sync()
            t = time.perf_counter()
            x.sum()
            _sync()
            best = min(best, time.perf_counter() - t)
        _BW.setdefault(key, []).append(key / best)
    return max(_BW[key])


def decode_kv_bytes(model, batch: int, prompt_len: int, cfg: bool) -> float:
    """K/V bytes a wave's decode steps 1..T-1 must read in the Generator's cascade layout.

    Each distinct prompt (``batch`` random prompts here) and the one shared unconditional
    ("pad") prompt are a prefix read once per step (the C++ cascade attention reads a shared
    prefix once for all rows of its group), plus every row's own image tokens so far; every
    cached position holds ``layers * 2 * kv_heads * head_dim`` values of the cache dtype.
    """
    c = model.config.text
    rows = 2 * batch if cfg else batch
    pool_rows = batch + (1 if cfg else 0)
    per_pos = c.num_layers * 2 * c.num_kv_heads * c.head_dim * torch.empty((), dtype=DTYPE).element_size()
    T = model.num_image_tokens
    return sum((pool_rows * prompt_len + rows * t) * per_pos for t in range(1, T))


def roofline_columns(*, flops: float, matmul_flops: float, kv_bytes: float, loop_s: float, prefill_s: float,
                     hf_wall_s: float, peak: float, bandwidth: float) -> dict[str, float]:
    """The roofline columns of one case (module docstring) from its decode ``flops`` (matrix +
    attention), ``matmul_flops`` and ``kv_bytes`` (steps 1..T-1), pgen's decode ``loop_s`` and
    ``prefill_s``, transformers' best wall time, the GEMM ``peak`` (FLOP/s) and K/V read ``bandwidth``."""
    bound = matmul_flops / peak + kv_bytes / bandwidth
    return dict(gemm_fraction=flops / loop_s / peak, roofline_fraction=bound / loop_s,
                gemm_fraction_cap=flops / bound / peak, speedup_cap=hf_wall_s / (prefill_s + bound))


def _linear_weights(module) -> int:
    """Weights of the ``nn.Linear`` layers in ``module`` (biases, norms and lookups are no matrix work)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def decode_matmul_flops(model, batch: int, cfg: bool) -> float:
    """Matrix FLOPs of one decode step: 2 per ``nn.Linear`` weight per row that needs it.

    The decoder layers' projections (q / k / v / o, so GQA's smaller k / v count as they are, and
    the MLP's gate / up / down) and the generation head run for every cache row, CFG partners
    included; the code aligner only for the ``batch`` conditional rows: a partner embeds the same
    code, so its aligned embedding is a copy (pgen's C++ loop copies it; ``transformers`` runs the
    aligner twice, work the bound must not ask for).
    """
    rows = 2 * batch if cfg else batch
    per_row = _linear_weights(model.language_model.layers) + _linear_weights(model.generation_head)
    return 2 * (per_row * rows + _linear_weights(model.generation_aligner) * batch)


def generate_matmul_flops(model, batch: int, prompt_len: int, cfg: bool) -> float:
    """Matrix FLOPs of a whole generate call of ``batch`` prompts of ``prompt_len`` tokens, counted as
    ``transformers`` runs it (the nominal work, the same number for both sides: pgen prefills one
    shared unconditional prompt, and the last layer for the last position only): the decoder layers
    over every row's prompt and its ``T - 1`` fed-back codes, the generation head on ``T`` positions
    per row, the aligner on ``T - 1`` codes per image (:func:`decode_matmul_flops` per decode step)."""
    rows = 2 * batch if cfg else batch
    T = model.num_image_tokens
    prompt = 2 * rows * (prompt_len * _linear_weights(model.language_model.layers)
                         + _linear_weights(model.generation_head))
    return prompt + decode_matmul_flops(model, batch, cfg) * (T - 1)


def decode_flops(model, batch: int, prompt_len: int, cfg: bool) -> float:
    """FLOPs of a wave's decode steps 1..T-1: matrix work (:func:`decode_matmul_flops`) + attention."""
    c = model.config.text
    rows = 2 * batch if cfg else batch
    T = model.num_image_tokens
    ctx = sum(prompt_len + t for t in range(1, T))  # keys attended over the T-1 steps
    return decode_matmul_flops(model, batch, cfg) * (T - 1) + 4 * rows * c.num_layers * c.num_heads * c.head_dim * ctx


def paired_round(index: int, run) -> dict[str, dict]:
    """Round ``index``: ``run(impl)`` for both implementations, pgen first in even rounds and
    transformers first in odd ones — the second call of a round inherits the caches, the page
    state and the thread pool's spin the first left, so neither side always gets them."""
    order = ("pgen", "transformers") if index % 2 == 0 else ("transformers", "pgen")
    return {impl: run(impl) for impl in order}


def paired_speedups(measured: list[dict]) -> dict[str, float]:
    """Median over the rounds of transformers' / pgen's wall and process-CPU time of the same round
    (``{"speedup_wall", "speedup_cpu"}``); an even number of rounds takes the mean of the middle two.

    Also ``speedup_best``: transformers' best round / pgen's best round. Under load the two differ:
    transformers' ~30 OpenMP regions per step stall on a lost core far more than pgen's one C++ call
    (2026-12-07, 2-core VM next to another engineer's tests, 3 rounds: median 8.5x and 13.2x where
    the best rounds gave 3.5x and 7.7x); teardown warns when they disagree by more than 15 %."""
    out = {f"speedup_{k}": statistics.median(r["transformers"][k] / r["pgen"][k] for r in measured)
           for k in ("wall", "cpu")}
    out["speedup_best"] = min(r["transformers"]["wall"] for r in measured) / min(r["pgen"]["wall"] for r in measured)
    return out


def print_rows(rows: list[dict]) -> None:
    """A ``|``-separated table of ``rows`` (the first row's keys as the header) on stdout."""
    cols = list(rows[0])
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _lm_params(model) -> int:
    """Parameters touched per generated token: decoder + generation head + code embedding path."""
    parts = (model.language_model, model.generation_head, model.generation_aligner)
    # the token-embedding table is a lookup, not matrix work
    return sum(p.numel() for m in parts for p in m.parameters()) - model.language_model.embed_tokens.weight.numel()


class _LMTimer:
    """Times transformers' language-model calls: the first (multi-token) one is prefill."""

    def __init__(self, hf):
        self.lm = hf.model.language_model
        self.orig = self.lm.forward
        self.prefill = self.decode = 0.0
        self.lm.forward = self._fwd

    def _fwd(self, *args, **kwargs):
        _sync()
        t = time.perf_counter()
        out = self.orig(*args, **kwargs)
        _sync()
        dt = time.perf_counter() - t
        if kwargs["inputs_embeds"].shape[1] > 1:
            self.prefill += dt
        else:
            self.decode += dt
        return out

    def close(self):
        del self.lm.forward  # back to the class method


def _run_pgen(gen: Generator, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, float, float]:
    out = gen.generate(ids, guidance_scale=GUIDANCE, top_k=TOP_K, top_p=TOP_P, seed=seed)
    return out, gen.last_stats["prefill_s"], gen.last_stats["decode_s"]


def _run_hf(hf, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, float, float]:
    torch.manual_seed(seed)
    timer = _LMTimer(hf)
    try:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", guidance_scale=GUIDANCE,
                          do_sample=True, top_k=TOP_K, top_p=TOP_P, temperature=1.0)
    finally:
        timer.close()
    return out, timer.prefill, None  # no decode-loop time of its own: its decode is wall - prefill


@pytest.mark.parametrize("batch", BATCHES)
def test_generation_throughput(benchmark, setup, batch):
    """One benchmark round = one pgen call and one transformers call on the same prompts and seed,
    in alternating order (:func:`paired_round`).

    Pairing the two inside every round keeps the comparison fair on a shared machine whose
    load drifts over minutes; the speed-up is the median of the per-round ratios.
    """
    name, model, hf, gen, ids = setup
    x = ids[:batch]
    T = model.num_image_tokens
    codebook = model.generation_head.vision_head.out_features
    rounds: list[dict] = []

    def timed(impl: str, seed: int) -> dict:
        _sync()
        c0, w0 = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            out, pre, dec = _run_pgen(gen, x, seed) if impl == "pgen" else _run_hf(hf, x, seed)
        _sync()
        wall = time.perf_counter() - w0
        assert out.shape == (batch, T)
        assert 0 <= int(out.min()) and int(out.max()) < codebook, f"{impl}: codes outside [0, {codebook})"
        # decode = the call's wall time but its prompt pass, on both sides alike (set-up, head and
        # sampling included); ``loop`` = pgen's decode loop alone, what the roofline columns judge
        return dict(wall=wall, cpu=time.process_time() - c0, prefill=pre, decode=wall - pre, loop=dec)

    def one_round():
        seed = len(rounds)
        rounds.append(paired_round(seed, lambda impl: timed(impl, seed)))

    gemm_peak_flops(measure=True)  # rates measured around every case; the columns use the run's best
    packed_gemm_flops(measure=True)
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    gemm_peak_flops(measure=True)
    packed_gemm_flops(measure=True)
    read_bandwidth(gen.last_stats["kv_bytes_peak"], measure=True)
    measured = rounds[1:]  # rounds[0] is the warm-up
    for impl in ("pgen", "transformers"):
        best = min((r[impl] for r in measured), key=lambda r: r["wall"])
        info = dict(geometry=name, impl=impl, batch=batch, images_per_s=batch / best["wall"],
                    decode_tokens_per_s=batch * T / best["decode"] if best["decode"] else float("nan"),
                    prefill_s=best["prefill"], decode_s=best["decode"], wall_s=best["wall"],
                    cpu_s=min(r[impl]["cpu"] for r in measured), threads=torch.get_num_threads(), device=DEVICE,
                    # nominal matrix work of the call (generate_matmul_flops) per wall second
                    tflops=generate_matmul_flops(model, batch, PROMPT_LEN, GUIDANCE != 1.0) / best["wall"] / 1e12)
        benchmark.extra_info.update({f"{impl}_{k}": v for k, v in info.items() if k not in ("geometry", "batch")})
        RESULTS[(name, batch, impl)] = info
    pg_best = min(measured, key=lambda r: r["pgen"]["wall"])["pgen"]
    cfg = GUIDANCE != 1.0
    RESULTS[(name, batch, "pgen")]["kv_bytes_peak"] = gen.last_stats["kv_bytes_peak"]
    # the roofline columns are computed at teardown, with the best rates of the whole run
    RESULTS[(name, batch, "pgen")]["roofline_inputs"] = dict(
        flops=decode_flops(model, batch, PROMPT_LEN, cfg),
        matmul_flops=decode_matmul_flops(model, batch, cfg) * (T - 1),
        kv_bytes=decode_kv_bytes(model, batch, PROMPT_LEN, cfg), loop_s=pg_best["loop"],
        prefill_s=pg_best["prefill"], hf_wall_s=min(r["transformers"]["wall"] for r in measured))
    speedups = paired_speedups(measured)
    RESULTS[(name, batch, "pgen")].update(speedups)
    benchmark.extra_info.update(geometry=name, batch=batch, **speedups)


@pytest.mark.parametrize("batch", BATCHES)
def test_greedy_tokens_identical(setup, batch):
    """At every measured batch (the C++ loop decodes small batches as a thread team, larger ones in
    per-thread groups and passes: each timed path is checked), through the benchmark's own calls."""
    name, model, hf, gen, ids = setup
    x = ids[:batch]
    if DTYPE != torch.float32:
        pytest.skip("bitwise greedy parity is checked in float32 only")
    with torch.inference_mode():
        ours = gen.generate(x, guidance_scale=GUIDANCE, greedy=True)
        ref = hf.generate(x, attention_mask=torch.ones_like(x), generation_mode="image", guidance_scale=GUIDANCE,
                          do_sample=False)
    assert torch.equal(ours, ref), f"{name} batch {batch}: {(ours != ref).sum()} of {ref.numel()} greedy tokens differ"
    RESULTS[(name, batch, "greedy_identical")] = {"value": True}


def teardown_module(module):
    rows = []
    for (name, batch, impl), info in sorted(RESULTS.items()):
        if impl != "pgen" or (name, batch, "transformers") not in RESULTS:
            continue
        ref = RESULTS[(name, batch, "transformers")]
        info["read_bandwidth"] = read_bandwidth(info["kv_bytes_peak"])
        info.update(roofline_columns(**info["roofline_inputs"], peak=best_gemm_flops(), bandwidth=info["read_bandwidth"]))
        # the definition: decode FLOP/s over one large torch.mm's rate
        info["gemm_fraction_mm"] = info["roofline_inputs"]["flops"] / info["roofline_inputs"]["loop_s"] / gemm_peak_flops()
        rows.append(dict(geometry=name, batch=batch, pgen_images_per_s=round(info["images_per_s"], 3),
                         hf_images_per_s=round(ref["images_per_s"], 3),
                         speedup_wall=round(info["speedup_wall"], 2), speedup_cpu=round(info["speedup_cpu"], 2),
                         speedup_best=round(info["speedup_best"], 2),
                         pgen_prefill_s=round(info["prefill_s"], 3), hf_prefill_s=round(ref["prefill_s"], 3),
                         pgen_decode_tok_s=round(info["decode_tokens_per_s"], 1),
                         hf_decode_tok_s=round(ref["decode_tokens_per_s"], 1),
                         decode_gemm_fraction=round(info["gemm_fraction_mm"], 3),
                         decode_gemm_fraction_best=round(info["gemm_fraction"], 3),
                         decode_roofline_fraction=round(info["roofline_fraction"], 3),
                         gemm_fraction_cap=round(info["gemm_fraction_cap"], 3),
                         speedup_cap=round(info["speedup_cap"], 2),
                         kv_read_gb_s=round(info["read_bandwidth"] / 1e9, 1),
                         kv_bytes_peak=int(info["kv_bytes_peak"])))
    if not rows:
        return
    print_rows(rows)
    for r in rows:
        if abs(r["speedup_wall"] / r["speedup_best"] - 1) > 0.15:
            print(f"WARNING {r['geometry']} batch {r['batch']}: median per-round speed-up {r['speedup_wall']}x vs "
                  f"{r['speedup_best']}x between the best rounds: the machine was loaded during some rounds")
    greedy = {k[0]: v["value"] for k, v in RESULTS.items() if k[2] == "greedy_identical"}
    checked = sorted(f"{k[0]} b{k[1]}" for k in RESULTS if k[2] == "greedy_identical")
    print(f"greedy tokens identical to transformers at: {', '.join(checked) or 'none (not run)'}")
    peak = max(_PEAK) if _PEAK else float("nan")
    print(f"fp32 GEMM peak (best {2048}^3 torch.mm of {len(_PEAK)} measurements around the cases, this run): "
          f"{peak / 1e9:.1f} GFLOP/s (lowest measurement {min(_PEAK) / 1e9:.1f})")
    packed = max(_PACKED) if _PACKED else None
    if packed is not None:
        print(f"fp32 packed GEMM (the C++ decode's kernel, same shape, one thread's best of {len(_PACKED)} x "
              f"{torch.get_num_threads()} threads): {packed / 1e9:.1f} "
              f"GFLOP/s; decode_gemm_fraction_best and the roofline columns use the faster of the two, "
              f"{max(peak, packed) / 1e9:.1f} GFLOP/s")
    print("kv_read_gb_s: best read rate of a warm kv_bytes_peak-sized tensor (torch.sum, around the cases, this run)")
    print(json.dumps({"bench": "generation", "rows": rows, "greedy_identical": greedy, "gemm_peak_flops": peak,
                      "packed_gemm_flops": packed}))
