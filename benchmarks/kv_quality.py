"""Quality of a low-precision KV cache (float8 e4m3 with per-head scales) against a reference cache.

    python -m benchmarks.kv_quality                      # CPU, small random Janus model, prints JSON
    python -m benchmarks.kv_quality --device cuda --ref-dtype bfloat16 --dtype bfloat16

A **fixed rollout** (the reference cache's greedy CFG codes, from :class:`~pgen_engine.generation.Generator`)
is teacher-forced through the decoder twice, once per cache dtype, in the Generator's wave layout
(each prompt and each distinct unconditional prompt once in a shared-prefix pool, every row's
own image tokens in its own row: :class:`~pgen_engine.models.decoder.KVCache`). Reported:

* ``lp_gap_mean`` / ``lp_gap_max``: mean / max over rollout tokens of ``|log p_test - log p_ref|``,
  the conditional log-probability of the rollout's code (what an RL objective uses);
* ``greedy_agreement``: fraction of steps whose CFG-mixed argmax under the test cache equals
  the rollout's code (each step from the same prefix, so one flip does not cascade);
* ``free_run_agreement``: fraction of codes equal between the two Generators' own greedy runs
  (a flip there changes every later step, so this is the stricter, noisier number);
* ``ref_self_agreement``: the teacher-forced reference argmax vs the rollout (1.0 unless the
  scorer's rounding differs from the Generator's at a near-tie).

The model has Janus-like proportions (benchmarks/test_bench_generation.py "realistic": MLP
4 x hidden, 1024-code codebook) with random weights drawn at ``init_std`` (default HF init
gives near-uniform logits whose argmax is a coin toss for any perturbation), or is a trained
checkpoint (``--checkpoint DIR``, e.g. the demo SFT model's ``final`` directory, whose
distributions are peaked as a real model's are):

    python train.py --config configs/demo_sft.yaml output_dir=runs/demo_sft
    python -m benchmarks.kv_quality --checkpoint runs/demo_sft/final --data runs/data/synth_demo \
        --num-prompts 128 --samples 1 --guidance 2      # the users' history prompts (pixels mode)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import pgen_engine as pg
from pgen_engine.config import load_config
from pgen_engine.data.dataset import load_dataset
from pgen_engine.data.history import prompter_for_checkpoint
from pgen_engine.data.prompts import uncond_pad_ids
from pgen_engine.data.splits import build_splits
from pgen_engine.generation.dataset_prompts import dataset_prompts
from pgen_engine.generation import Generator
from pgen_engine.models.decoder import KVCache
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.ops import kv_quant

REALISTIC = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, image_size=64, patch_size=8,
                 max_position_embeddings=512, intermediate_size=1024, codebook_size=1024)


def _wave_cache(model, P: int, Lp: int, rows: int, Lo: int, dtype: torch.dtype, prefix_row, prefix_len) -> KVCache:
    """Zeroed pool ``[P, Hkv, Lp, D]`` + own rows ``[rows, Hkv, Lo, D]`` per layer (+ float8 scales)."""
    c, dev = model.config.text, model.device
    z = lambda n, L: torch.zeros(n, c.num_kv_heads, L, c.head_dim, dtype=dtype, device=dev)  # noqa: E731
    sc = {}
    if kv_quant.is_fp8(dtype):
        store = kv_quant.ScaleStore(c.num_layers, P + rows, c.num_kv_heads, dev)
        (pks, pvs), (ks, vs) = store.views(0, P), store.views(P, rows)
        sc = dict(k_scale=ks, v_scale=vs, prefix_k_scale=pks, prefix_v_scale=pvs)
    return KVCache(k=[z(rows, Lo) for _ in range(c.num_layers)], v=[z(rows, Lo) for _ in range(c.num_layers)],
                   layout="bhsd", prefix_k=[z(P, Lp) for _ in range(c.num_layers)],
                   prefix_v=[z(P, Lp) for _ in range(c.num_layers)],
                   prefix_row=torch.tensor(prefix_row, dtype=torch.int32, device=dev),
                   prefix_len=torch.tensor(prefix_len, dtype=torch.int32, device=dev), **sc)


@torch.inference_mode()
def teacher_forced(model, prompts: list[list[int]], num_samples: int, codes: torch.Tensor, guidance_scale: float,
                   cache_dtype: torch.dtype, pixel_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-force ``codes`` (int64 ``[len(prompts) * num_samples, T]``, row ``i * num_samples + j``
    = sample ``j`` of prompt ``i``) through a wave cache of ``cache_dtype``. ``pixel_values``: the
    history images of the prompts' image placeholders, in prompt order (pixels-mode prompts).

    Returns:
        (float32 ``[R, T]`` conditional log-probs of ``codes``, int64 ``[R, T]`` CFG-mixed argmax).
    """
    m, dev, sp = model, model.device, model.special_tokens
    T = m.num_image_tokens
    R = len(prompts) * num_samples
    cfg = guidance_scale != 1.0
    ukeys: dict[tuple[int, ...], int] = {}
    unc = [tuple(uncond_pad_ids(torch.tensor(p), None, sp).tolist()) for p in prompts]
    for u in unc:
        ukeys.setdefault(u, len(ukeys))
    seqs = [list(p) for p in prompts] + ([list(u) for u in ukeys] if cfg else [])
    P, Lp, Lo = len(seqs), max(len(s) for s in seqs), max(T - 1, 1)
    prow = [i // num_samples for i in range(R)]
    plen = [len(prompts[i]) for i in prow]
    if cfg:
        prow += [len(prompts) + ukeys[unc[i]] for i in range(len(prompts)) for _ in range(num_samples)]
        plen += [len(unc[i]) for i in range(len(prompts)) for _ in range(num_samples)]
    rows = len(prow)
    cache = _wave_cache(m, P, Lp, rows, Lo, cache_dtype, prow, plen)
    pool = KVCache(k=cache.prefix_k, v=cache.prefix_v, layout="bhsd", k_scale=cache.prefix_k_scale,
                   v_scale=cache.prefix_v_scale)
    # prefill every pool row once, left-padded, token i of sequence r at slot r * Lp + i
    S = Lp
    ids = torch.full((P, S), sp.pad, dtype=torch.long)
    mask = torch.zeros((P, S), dtype=torch.long)
    slots = torch.full((P, S), -1, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, S - len(s):] = torch.tensor(s)
        mask[r, S - len(s):] = 1
        slots[r, S - len(s):] = r * Lp + torch.arange(len(s))
    emb = m.embed_inputs(ids.to(dev), None, None if pixel_values is None else pixel_values.to(dev))
    h_last = m.prefill(emb, mask.to(dev), pool, slots.to(dev))[:, -1]
    h = h_last.index_select(0, torch.tensor(prow, device=dev))
    base = torch.tensor(plen, dtype=torch.long, device=dev)
    slot0 = torch.arange(rows, dtype=torch.long, device=dev) * Lo
    codes = codes.to(dev)
    lps = torch.empty(R, T, dtype=torch.float32, device=dev)
    am = torch.empty(R, T, dtype=torch.long, device=dev)
    for t in range(T):
        if t > 0:
            e = m.embed_image_codes(codes[:, t - 1])
            pos = base + (t - 1)
            h = m.decode_step(torch.cat([e, e]) if cfg else e, pos, cache, slot0 + (t - 1), (pos + 1).to(torch.int32))
        logits = m.image_head_logits(h).float()
        c, u = (logits[:R], logits[R:]) if cfg else (logits, None)
        lps[:, t] = torch.log_softmax(c, -1).gather(1, codes[:, t:t + 1]).squeeze(1)
        am[:, t] = (c if u is None else u + guidance_scale * (c - u)).argmax(-1)
    return lps, am


def fp8_quality(model, prompts: list[list[int]], *, num_samples: int = 2, guidance_scale: float = 5.0,
                ref_dtype: torch.dtype = torch.float32, dtype: torch.dtype = kv_quant.FP8_DTYPE,
                max_batch_size: int = 64, pixel_values: torch.Tensor | None = None) -> dict[str, float]:
    """The module docstring's numbers for ``dtype`` against ``ref_dtype`` (dict of floats);
    ``pixel_values``: history images of pixels-mode prompts (see :func:`teacher_forced`)."""
    T = model.num_image_tokens
    longest = max(len(p) for p in prompts)
    kw = dict(max_batch_size=max_batch_size, max_seq_len=longest + T)
    run = dict(num_samples=num_samples, guidance_scale=guidance_scale, greedy=True)
    px = None if pixel_values is None else pixel_values.to(model.device)
    ref = Generator(model, cache_dtype=ref_dtype, **kw).generate(prompts, None, px, **run)
    test = Generator(model, cache_dtype=dtype, **kw).generate(prompts, None, px, **run)
    lp_ref, am_ref = teacher_forced(model, prompts, num_samples, ref, guidance_scale, ref_dtype, px)
    lp_test, am_test = teacher_forced(model, prompts, num_samples, ref, guidance_scale, dtype, px)
    gap = (lp_test - lp_ref).abs()
    ref = ref.to(am_ref.device)
    return {"tokens": float(ref.numel()), "lp_gap_mean": gap.mean().item(), "lp_gap_max": gap.max().item(),
            "lp_ref_mean": lp_ref.mean().item(), "greedy_agreement": (am_test == ref).float().mean().item(),
            "ref_self_agreement": (am_ref == ref).float().mean().item(),
            "free_run_agreement": (test.to(ref.device) == ref).float().mean().item()}


def quality_model(tmpdir: str, *, init_std: float = 0.04, seed: int = 0, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, **geometry):
    """The random realistic-proportions model (``geometry`` overrides :data:`REALISTIC`)."""
    path = make_tiny_checkpoint(f"{tmpdir}/kvq", seed=seed, init_std=init_std, **{**REALISTIC, **geometry})
    return pg.load_model(path, device=device, dtype=dtype)


def quality_prompts(model, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random ``<bos> text <boi>`` prompts of the given lengths."""
    sp, vocab = model.special_tokens, model.config.text.vocab_size
    g = torch.Generator().manual_seed(seed)
    return [[sp.bos, *torch.randint(6, vocab, (n - 2,), generator=g).tolist(), sp.boi] for n in lengths]


def history_prompts(model, checkpoint: str, data_dir: str, n: int, run_config: str | None = None
                    ) -> tuple[list[list[int]], torch.Tensor | None]:
    """The ``valid`` history prompts of the first ``n`` users of ``data_dir`` (a trained
    checkpoint's dataset), built as ``pgen generate --data`` builds them -> (prompt ids,
    pixel_values of their history images in prompt order, or None in codes mode)."""
    run_config = run_config or str(Path(checkpoint).parent / "config.resolved.yaml")
    if not Path(run_config).is_file():
        raise ValueError(f"--run-config {run_config}: file not found (the checkpoint's training config.resolved.yaml)")
    data = load_config(run_config).data
    prompter = prompter_for_checkpoint(checkpoint, model, run_config=run_config)
    splits = build_splits(load_dataset(data_dir, check_images=False), k=data.history_k,
                          min_interactions=data.min_interactions)
    users = [ex.user_id for ex in splits.valid if ex.history][:n]
    if not users:
        raise ValueError(f"--data {data_dir}: no user has a valid-split example")
    lines = dataset_prompts(data_dir, ",".join(users), "valid", prompter, history_k=data.history_k,
                            min_interactions=data.min_interactions,
                            max_positions=model.config.text.max_position_embeddings,
                            num_image_tokens=model.num_image_tokens)
    if any(any(ln.gen_code_mask or []) for ln in lines):
        raise ValueError(f"{checkpoint}: codes-mode history prompts are not supported here (pixels mode only)")
    px = [ln.pixel_values for ln in lines if ln.pixel_values is not None]
    return [list(ln.input_ids) for ln in lines], (torch.cat(px) if px else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model dtype (float32 / bfloat16)")
    ap.add_argument("--ref-dtype", default="float32", help="reference cache dtype")
    ap.add_argument("--prompt-lens", default="48,64,33,64", help="comma list of prompt lengths")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--init-std", type=float, default=0.04)
    ap.add_argument("--min-agreement", type=float, default=0.99, help="exit 1 below this greedy agreement")
    ap.add_argument("--checkpoint", default=None,
                    help="a trained model directory (pgen_engine.load_model) instead of the random model")
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="random prompts, lengths cycling through --prompt-lens (0: one per length); with "
                         "--data: the number of users")
    ap.add_argument("--data", default=None,
                    help="with --checkpoint: its dataset directory; prompts are its users' valid-split histories")
    ap.add_argument("--run-config", default=None, help="with --data: the checkpoint's config.resolved.yaml "
                    "(default: next to the checkpoint directory)")
    args = ap.parse_args(argv)
    lens = [int(x) for x in args.prompt_lens.split(",") if x]
    if not lens or min(lens) < 3 or args.num_prompts < 0:
        ap.error(f"--prompt-lens {args.prompt_lens!r} / --num-prompts {args.num_prompts}: need lengths >= 3 "
                 "(<bos> text <boi>) and a count >= 0")
    if args.num_prompts:
        lens = [lens[i % len(lens)] for i in range(args.num_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        dtype = getattr(torch, args.dtype)
        if args.checkpoint is not None:
            try:
                model = pg.load_model(args.checkpoint, device=args.device, dtype=dtype)
            except (OSError, ValueError) as e:
                ap.error(f"--checkpoint {args.checkpoint}: {e}")
        else:
            model = quality_model(tmp, init_std=args.init_std, device=args.device, dtype=dtype)
        px = None
        if args.data is not None:
            if args.checkpoint is None:
                ap.error("--data needs --checkpoint (the model trained on it)")
            try:
                prompts, px = history_prompts(model, args.checkpoint, args.data, args.num_prompts or 64, args.run_config)
            except ValueError as e:
                ap.error(str(e))
        else:
            prompts = quality_prompts(model, lens)
        res = fp8_quality(model, prompts, num_samples=args.samples, guidance_scale=args.guidance,
                          ref_dtype=getattr(torch, args.ref_dtype), max_batch_size=max(64, len(prompts) * args.samples),
                          pixel_values=px)
    print(json.dumps({"kv_cache": "float8_e4m3fn", "ref": args.ref_dtype, "model": args.checkpoint or "random",
                      "prompts": f"{args.data} valid histories" if args.data else "random text", "device": args.device,
                      "guidance_scale": args.guidance, **res}))
    return 0 if res["greedy_agreement"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
