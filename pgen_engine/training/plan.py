"""Memory plan of a run: device bytes per GPU in each phase, from the code that will run.

``pgen plan --config CONFIG [--gpus N] [--gpu-mem GIB] [key=value ...]`` and the start-up
check of ``train.py`` both call :func:`plan_run`. Nothing here is a parallel formula of
the model: every number comes from the real objects, built on the ``meta`` device (shapes
and dtypes, no storage):

* **model** — :class:`pgen_engine.models.JanusModel` from the checkpoint's ``config.json``
  (or a reference geometry, see :func:`resolve_model_config`), cast to the run's precision,
  with the trainable groups set by :func:`pgen_engine.training.engine.set_trainable`.
* **ZeRO states** — per parameter, from the DeepSpeed config the run builds
  (:func:`pgen_engine.training.engine.build_deepspeed_config`): stage, ``offload_optimizer`` /
  ``offload_param``, bucket sizes and the persistence threshold; see :func:`zero_states`.
* **rollout** — all weights gathered (:func:`pgen_engine.training.engine.gathered_module`
  materialises every parameter), plus the KV cache the rollout's
  :class:`pgen_engine.generation.Generator` allocates for the rows this rank generates
  (:func:`pgen_engine.training.rollout.generator_rows`), constructed on ``meta``
  (:func:`rollout_kv_bytes`), plus the measured prefill / decode-logits working set.
* **activations** — the training objective's forward and backward run on ``meta``
  tensors at the real micro-batch and sequence length, through the fused GPU ops' fake
  (shape) kernels, under a dispatch mode that tracks live storage bytes
  (:func:`measure_peak_bytes`); with and without activation checkpointing.

Sequence lengths come from the real :class:`pgen_engine.data.prompts.PromptBuilder`: the
checkpoint's text tokenizer when the checkpoint is on disk, else byte-level tokens (an
upper bound: a BPE token covers at least one byte); titles are the dataset's longest when
the dataset is readable, else :data:`TITLE_BUDGET_BYTES` bytes each.

Not measured (a fixed :data:`RUNTIME_RESERVE_BYTES` covers them): the CUDA context, NCCL
buffers, CUDA-graph pools and allocator fragmentation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from pgen_engine import envs
from pgen_engine.config import ConfigError, RunConfig

from .engine import build_deepspeed_config, resolve_precision
from .reference import resolve_reference_mode
from .rl import updates_per_step
from .rollout import generator_rows

GIB = 1 << 30
# CUDA context (~0.5 GiB), NCCL communicators, CUDA-graph pools and allocator fragmentation.
RUNTIME_RESERVE_BYTES = 2 * GIB
# Bytes per history-item title when the dataset cannot be read (the MovieLens titles are
# at most 110 bytes; 24 on average).
TITLE_BUDGET_BYTES = 128
# DeepSpeed ZeRO-3 optimizer sub-group (its default ``sub_group_size``): the step makes an
# fp32 copy of this many gradient elements of the rank's partition at a time.
ZERO3_SUB_GROUP_SIZE = 1_000_000_000
# fp32 master weights + AdamW exp_avg + exp_avg_sq, per trainable element.
OPTIMIZER_BYTES_PER_ELEMENT = 12
SFT_PHASES = ("sft step",)
RL_PHASES = ("rollout", "log-probs", "update")

# Released Janus-Pro geometries (their Hugging Face config.json values), used only when a
# config's checkpoint is not on disk yet and its path names one of them.
REFERENCE_GEOMETRIES: dict[str, dict] = {
    "Janus-Pro-1B": dict(
        text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=102400,
                         max_position_embeddings=16384),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                           patch_size=16, projection_dim=2048, intermediate_size=4096, num_image_tokens=576),
        vq_config=dict(projection_dim=2048, image_token_embed_dim=2048),
        image_token_id=100581, tie_word_embeddings=False),
    "Janus-Pro-7B": dict(
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=102400,
                         max_position_embeddings=16384),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                           patch_size=16, projection_dim=4096, intermediate_size=4096, num_image_tokens=576),
        vq_config=dict(projection_dim=4096, image_token_embed_dim=4096),
        image_token_id=100581, tie_word_embeddings=False),
}


class PlanError(ConfigError):
    """The run cannot be planned (unknown model geometry, impossible batch arithmetic...)."""


class PlanOverflowError(RuntimeError):
    """The planned run does not fit its GPUs; the message names the overflowing phase."""


# ----------------------------------------------------------------------------- result
@dataclasses.dataclass
class PhasePlan:
    """Device bytes one GPU holds at the peak of one phase, by item."""

    name: str
    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclasses.dataclass
class MemoryPlan:
    """The plan of one run on ``gpus`` GPUs of ``gpu_bytes`` each.

    Attributes:
        phases: the phases in execution order (SFT: one; RL: rollout, log-probs, update).
        notes: where inputs came from, and the activations with checkpointing flipped.
    """

    config: str
    gpus: int
    gpu_bytes: int
    precision: str
    zero_stage: int
    model: str
    phases: list[PhasePlan]
    notes: list[str]

    @property
    def peak(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_bytes

    def overflow_line(self) -> str | None:
        """One line naming the first phase that does not fit, or None when all fit."""
        for p in self.phases:
            if p.total > self.gpu_bytes:
                top = max(p.items, key=p.items.get)
                return (f"memory plan: the {p.name} phase needs {p.total / GIB:.1f} GiB per GPU but the GPU has "
                        f"{self.gpu_bytes / GIB:.1f} GiB (largest item: {top}, {p.items[top] / GIB:.1f} GiB); "
                        f"see `pgen plan --config {self.config} --gpus {self.gpus}`")
        return None


def format_plan(plan: MemoryPlan) -> str:
    """The table ``pgen plan`` prints; the last line is ``peak per GPU: X GiB of Y GiB``."""
    lines = [f"pgen plan: {plan.config} on {plan.gpus} GPU(s) x {plan.gpu_bytes / GIB:.1f} GiB "
             f"({plan.precision}, ZeRO stage {plan.zero_stage})", f"model: {plan.model}"]
    lines += [f"note: {n}" for n in plan.notes]
    width = max(len(k) for p in plan.phases for k in p.items) + 2
    lines.append(f"{'phase':<10}  {'item':<{width}}{'GiB':>8}")
    for p in plan.phases:
        for i, (k, v) in enumerate(p.items.items()):
            lines.append(f"{p.name if i == 0 else '':<10}  {k:<{width}}{v / GIB:>8.2f}")
        mark = "  <- peak" if p is plan.peak else ""
        lines.append(f"{'':<10}  {'total':<{width}}{p.total / GIB:>8.2f}{mark}")
    lines.append(f"peak per GPU: {plan.peak.total / GIB:.1f} GiB of {plan.gpu_bytes / GIB:.1f} GiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model on meta
def reference_geometry(name: str):
    """The :class:`JanusModelConfig` of a released model in :data:`REFERENCE_GEOMETRIES`."""
    from transformers import JanusConfig

    from pgen_engine.models.janus_config import JanusModelConfig

    return JanusModelConfig.from_dict(JanusConfig(**REFERENCE_GEOMETRIES[name]).to_dict(), source=name)


def _named_geometry(path: str) -> str | None:
    key = re.sub(r"[^a-z0-9]", "", path.lower())
    hits = [n for n in REFERENCE_GEOMETRIES if re.sub(r"[^a-z0-9]", "", n.lower()) in key]
    return hits[0] if len(hits) == 1 else None


def resolve_model_config(cfg: RunConfig):
    """-> (JanusModelConfig, description) of the model ``cfg`` trains.

    ``model.checkpoint`` with a ``config.json``: that. A checkpoint written by an earlier run
    that does not exist yet (``<run>/final``): that run's ``config.resolved.yaml`` is
    followed when present. Otherwise, a path naming a released model (``Janus-Pro-1B``,
    ``janus_pro_7b_sft/final`` ...) uses its reference geometry, said so in the
    description. ``model.checkpoint: null``: the tiny model the run would initialise from
    ``model.init`` and the data tokenizer's geometry.

    Raises:
        PlanError: a checkpoint that is neither on disk nor a known model.
    """
    from pgen_engine.models.janus_config import JanusModelConfig

    if cfg.model.checkpoint is None:
        from pgen_engine.models.tiny import tiny_janus_config

        d, init = cfg.data, cfg.model.init
        geo = {k: v for k, v in dataclasses.asdict(init).items() if k not in ("seed", "init_std")}
        tc = tiny_janus_config(**geo, image_size=d.tokenizer_image_size, patch_size=d.patch_size,
                               codebook_size=d.codebook_size)
        return JanusModelConfig.from_dict(tc.to_dict(), "model.init"), "tiny model from model.init"
    path = Path(cfg.model.checkpoint)
    for _ in range(4):  # follow at most a few run -> SFT run links
        if (path / "config.json").is_file():
            return JanusModelConfig.from_dir(path), f"{path} (config.json)"
        resolved = path.parent / "config.resolved.yaml"
        if not resolved.is_file():
            break
        import yaml

        nxt = ((yaml.safe_load(resolved.read_text()) or {}).get("model") or {}).get("checkpoint")
        if not nxt:
            break
        path = Path(nxt)
    name = _named_geometry(str(cfg.model.checkpoint)) or _named_geometry(str(path))
    if name is None:
        raise PlanError(f"model.checkpoint={cfg.model.checkpoint}: no config.json there, and the path names none of "
                        f"the known models ({', '.join(REFERENCE_GEOMETRIES)}); point it at a checkpoint folder")
    return reference_geometry(name), f"{name} reference geometry ({cfg.model.checkpoint} is not on disk)"


def meta_model(model_config, dtype: torch.dtype, trainable: list[str]):
    """The run's JanusModel on the meta device in ``dtype``, trainable groups set, train mode."""
    from pgen_engine.models.janus import JanusModel

    from .engine import set_trainable

    with torch.device("meta"):
        model = JanusModel(model_config)
    model = model.to(dtype)
    set_trainable(model, trainable)
    model.train()
    return model


def unique_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters with tied tensors once (DeepSpeed partitions each tensor once)."""
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


# ----------------------------------------------------------------------------- ZeRO
@dataclasses.dataclass(frozen=True)
class ZeroStates:
    """Per-rank device bytes of a DeepSpeed engine's model states (0 where offloaded).

    Attributes:
        param_shards: the rank's partition of every parameter (ZeRO-3; full params below 3).
        persistent_params: ZeRO-3 parameters at or below the persistence threshold, kept whole.
        grads: the rank's gradient partition (the trainable parameters' dtype).
        optimizer: fp32 master weights + AdamW moments of the rank's trainable partition.
        reduce_bucket: the gradient reduce bucket (``reduce_bucket_size`` elements).
        gather_working_set: parameters gathered during a forward/backward: the largest
            module's own parameters plus the prefetch bucket.
        step_fp32_grads: the fp32 gradient copy the optimizer step makes per sub-group.
        full_weights: every parameter materialised (the rollout's gathered copy).
    """

    param_shards: int
    persistent_params: int
    grads: int
    optimizer: int
    reduce_bucket: int
    gather_working_set: int
    step_fp32_grads: int
    full_weights: int


def zero_states(model: torch.nn.Module, ds_config: dict, world: int) -> ZeroStates:
    """Model-state bytes per rank under ``ds_config`` (what ``build_engine`` hands DeepSpeed).

    ZeRO-3 partitions every parameter tensor into ``world`` equal pieces (padded), each
    rank keeping one; stage 2 partitions gradients and optimizer states only; stage 0
    keeps everything whole (bf16 then accumulates fp32 gradients). Offloaded states are
    on the host and count 0 here.
    """
    z = ds_config["zero_optimization"]
    stage = int(z["stage"])
    off_opt = "offload_optimizer" in z
    off_par = "offload_param" in z
    params = unique_params(model)
    esize = params[0][1].element_size()

    def shard(n: int) -> int:
        return math.ceil(n / world)

    train = [p.numel() for _, p in params if p.requires_grad]
    everything = sum(p.numel() for _, p in params)
    part_train = sum(shard(n) for n in train) if stage >= 2 else sum(train)
    if stage == 3:
        thresh = int(z.get("stage3_param_persistence_threshold", 100_000))
        param_shards = 0 if off_par else sum(shard(p.numel()) for _, p in params) * esize
        persistent = sum(p.numel() for _, p in params if p.numel() <= thresh) * esize
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        working = (largest + int(z.get("stage3_prefetch_bucket_size", 50_000_000))) * esize
    else:
        param_shards, persistent, working = everything * esize, 0, 0
    grad_bytes = esize if stage >= 2 or esize == 4 else 4  # stage 0 bf16: fp32 accumulation
    grads = 0 if off_opt else part_train * grad_bytes
    optimizer = 0 if off_opt else part_train * OPTIMIZER_BYTES_PER_ELEMENT
    bucket = int(z.get("reduce_bucket_size", 0)) * esize if stage >= 2 else 0
    step = 0 if off_opt or esize == 4 else min(part_train, ZERO3_SUB_GROUP_SIZE) * 4
    return ZeroStates(param_shards, persistent, grads, optimizer, bucket, working, step, everything * esize)


# ----------------------------------------------------------------------------- measuring on meta
class _LiveStorageMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks bytes of live tensor storages created by ops under it, and their peak."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.ignore = ignore
        self.live: dict[int, tuple[object, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in self.ignore:
                    self.live[key] = (self._ref(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@contextlib.contextmanager
def _gpu_ops_on_meta() -> Iterator[None]:
    """Route the decoder's ops to their fused (GPU) kernels, whose fake kernels run on meta.

    The fused ops save for backward exactly what their GPU kernels save (e.g. attention
    keeps q, k, v, out and the log-sum-exp, never an ``[S, S]`` matrix), so meta tensors
    measure the GPU path rather than the CPU reference.
    """
    from pgen_engine.models import op_dispatch
    from pgen_engine.ops._backend import triton_available

    saved_env = {k: os.environ.get(k) for k in ("PGEN_OPS_BACKEND", "TRITON_INTERPRET")}
    saved_fused = op_dispatch._FORCE_FUSED
    os.environ["PGEN_OPS_BACKEND"] = "triton"
    if not triton_available():
        # no GPU: lets backend resolution pick "triton" (the fakes run, no kernel does). Never
        # set on a GPU machine, where a kernel module first imported now would be jitted for
        # the interpreter for the rest of the run (train.py plans before it trains).
        os.environ["TRITON_INTERPRET"] = "1"
    op_dispatch._FORCE_FUSED = True
    try:
        yield
    finally:
        op_dispatch._FORCE_FUSED = saved_fused
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_peak_bytes(model: torch.nn.Module, fn: Callable[[], torch.Tensor | None], *, backward: bool) -> int:
    """Peak bytes of tensors (not parameters) alive while ``fn()`` and its backward run on meta.

    Parameter gradients are dropped as soon as they are accumulated: DeepSpeed reduces
    them into its bucket and partition (counted in :class:`ZeroStates`).
    """
    params = [p for p in model.parameters()]
    ignore = {p.untyped_storage()._cdata for p in params}
    hooks = [p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
             for p in params if p.requires_grad]
    try:
        with _gpu_ops_on_meta(), _LiveStorageMode(ignore) as mode:
            out = fn()
            if backward:
                out.backward()
            del out
        return mode.peak
    finally:
        for h in hooks:
            h.remove()


def _meta_batch(rows: int, seq: int, image_tokens: int):
    dev = torch.device("meta")
    ids = torch.zeros(rows, seq, dtype=torch.long, device=dev)
    code_mask = torch.zeros(rows, seq, dtype=torch.bool, device=dev)
    att = torch.ones(rows, seq, dtype=torch.long, device=dev)
    targets = torch.zeros(rows, image_tokens, dtype=torch.long, device=dev)
    return ids, code_mask, att, targets


def _meta_pixels(model, images: int) -> torch.Tensor | None:
    """``[images, 3, S, S]`` meta history images in the model's dtype (None for none)."""
    if images == 0:
        return None
    S = model.config.image_size
    return torch.zeros(images, 3, S, S, dtype=model.dtype, device="meta")


def _meta_tower_outputs(model, images: int) -> torch.Tensor | None:
    """``[images, T_img, D_vision]`` meta vision-tower outputs (the cached features a frozen
    tower's run feeds the aligner), or None for none."""
    if images == 0:
        return None
    v = model.config.vision_config_dict
    return torch.zeros(images, model.num_image_tokens, int(v["hidden_size"]), dtype=model.dtype, device="meta")


def _embed(model, ids: torch.Tensor, code_mask: torch.Tensor, pixels: torch.Tensor | None,
           tower_outputs: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`JanusModel.embed_inputs` on meta: the same embedding, vision tower (or its cached
    outputs) + aligner and ``masked_scatter`` into the ``<image>`` placeholders, without its
    host-side count check (meta tensors hold no values to count); the placeholders are the
    first positions."""
    x = model.embed_inputs(ids, code_mask)
    if pixels is None and tower_outputs is None:
        return x
    if tower_outputs is not None:
        feats = model.aligner(tower_outputs).reshape(-1, x.shape[-1]).to(x.dtype)
    else:
        feats = model.vision_features(pixels).reshape(-1, x.shape[-1]).to(x.dtype)
    n = feats.shape[0] // ids.shape[0]
    slots = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    slots[:, :n] = True
    return x.masked_scatter(slots[..., None], feats)


def objective_peak_bytes(model, rows: int, seq: int, *, checkpointing: bool, train: bool,
                         history_images: int = 0, cached_features: bool = False) -> int:
    """Peak activation bytes of one micro-batch of the training objective on meta.

    The objective is :func:`pgen_engine.training.rl.policy_logprobs` (``[rows, seq]``
    sequences, the last ``T`` positions scored by the fused log-prob op); the SFT loss runs
    the same embedding, decoder and log-prob op over the same ``T`` target positions. The
    GRPO loss on top is element-wise over ``[rows, T]`` float32 log-probs (kilobytes; it
    reads ``.any()`` on the host, which meta tensors cannot answer), so the mean log-prob
    stands in for it. ``train=False`` is the no-grad scoring pass of the log-probs phase.
    ``history_images`` per row (pixels history mode) go through the vision tower and aligner,
    or with ``cached_features`` (a frozen tower: the run caches its outputs per item) through
    the aligner only.
    """
    T = model.num_image_tokens
    ids, cm, att, targets = _meta_batch(rows, seq, T)
    pixels = None if cached_features else _meta_pixels(model, rows * history_images)
    tower = _meta_tower_outputs(model, rows * history_images) if cached_features else None
    lm = model.language_model
    was_ckpt, was_training = lm.gradient_checkpointing, model.training
    lm.gradient_checkpointing = checkpointing
    model.train(train)

    def run():
        with torch.set_grad_enabled(train):
            # pgen_engine.training.rl.policy_logprobs, with _embed for embed_inputs
            h = model.forward_train(_embed(model, ids, cm, pixels, tower), att)[:, -T:]
            lp, _ = model.image_token_logprobs(h.reshape(rows * T, -1), targets.reshape(-1), temperature=1.0)
            return -lp.float().mean() if train else None

    try:
        return measure_peak_bytes(model, run, backward=train)
    finally:
        lm.gradient_checkpointing = was_ckpt
        model.train(was_training)


def rollout_kv_bytes(model, rows: int, max_seq_len: int, uncond_mode: str, num_samples: int = 1,
                     guidance_scale: float = 5.0) -> int:
    """KV-cache bytes the rollout's Generator holds for ``rows`` output rows: ``rows //
    num_samples`` prompts of ``max_seq_len - num_image_tokens`` tokens, ``num_samples`` each.

    Constructs the real :class:`pgen_engine.generation.Generator` on the meta model (nothing
    is allocated) and asks it (:meth:`~pgen_engine.generation.Generator.kv_bytes`: the wave
    plan and sizing code its calls run, with a prompt's samples and identical unconditional
    prompts sharing their K/V). This is the one place the planner sizes the cache; it builds
    the Generator exactly as :meth:`pgen_engine.training.rollout.HybridEngine.rollout` does.
    """
    from pgen_engine.generation.generator import Generator

    gen = Generator(model, max_batch_size=rows, max_seq_len=max_seq_len, uncond_mode=uncond_mode,
                    decode_mode="eager")
    plen = max_seq_len - model.num_image_tokens
    return int(gen.kv_bytes([plen] * max(1, rows // num_samples), num_samples=num_samples,
                            guidance_scale=guidance_scale))


def rollout_work_bytes(model, prompts: int, seq: int, rows: int, history_images: int = 0) -> int:
    """Peak transient bytes of a rollout wave besides the cache: the no-grad prefill of
    ``prompts`` distinct prompts of ``seq`` tokens (the Generator prefills each prompt
    once; pixels mode: their ``history_images`` each through the vision tower) and the
    float32 codebook logits of the ``2 * rows`` decode rows."""
    ids, cm, att, _ = _meta_batch(prompts, seq, 1)
    pixels = _meta_pixels(model, prompts * history_images)
    h = torch.zeros(2 * rows, model.config.text.hidden_size, dtype=model.dtype, device="meta")
    was = model.training
    model.eval()

    def run():
        with torch.inference_mode():
            model.forward_train(_embed(model, ids, cm, pixels), att)
            return model.image_head_logits(h).float()

    try:
        return measure_peak_bytes(model, run, backward=False)
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- sequence lengths
def history_mode(cfg: RunConfig) -> str:
    """The run's ``data.history_mode``; unresolved (checkpoint not on disk yet) -> "pixels",
    the default of every model with a vision tower (every Janus)."""
    return cfg.data.history_mode or "pixels"


def prompt_tokens(cfg: RunConfig) -> tuple[int, str]:
    """-> (tokens of the longest prompt the run builds, where the text lengths came from).

    Builds a prompt of ``data.history_k`` history images with the real PromptBuilder in the
    run's history mode (codes, or ``<image>`` placeholders in pixels mode).
    """
    from pgen_engine.data.prompts import PromptBuilder
    from pgen_engine.data.text_tokenizer import ByteTokenizer, load_text_tokenizer
    from pgen_engine.models.special_tokens import SpecialTokens

    d = cfg.data
    ckpt = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    tok, where = ByteTokenizer(), "byte-level text lengths (an upper bound)"
    special = SpecialTokens.builtin()
    if ckpt is not None and (ckpt / "config.json").is_file():
        special = SpecialTokens.from_checkpoint(ckpt)
        tok = load_text_tokenizer(ckpt, special)
        where = f"{ckpt}'s text tokenizer"
        if isinstance(tok, ByteTokenizer):
            where = "byte-level text (the checkpoint has no tokenizer files)"
    title = "x" * TITLE_BUDGET_BYTES
    if d.with_titles:
        try:
            from pgen_engine.data.dataset import load_dataset

            titles = [it.title for it in load_dataset(d.dataset_dir, check_images=False).items.values()]
            title = max(titles, key=lambda t: len(tok.encode(f"{t}\n")))
            where += ", the dataset's longest title"
        except Exception:  # dataset not readable here: the documented budget instead
            where += f", titles of {TITLE_BUDGET_BYTES} bytes (dataset not readable)"
    per_image = (d.tokenizer_image_size // d.patch_size) ** 2
    mode = history_mode(cfg)
    builder = PromptBuilder(tok, special, per_image, mode=mode, with_titles=d.with_titles,
                            instruction=d.instruction)
    codes = torch.zeros(d.history_k, per_image, dtype=torch.long) if mode == "codes" else None
    p = builder.build(codes, [title] * d.history_k if d.with_titles else None, num_history=d.history_k)
    return len(p), where


# ----------------------------------------------------------------------------- the plan
def _dtype(cfg: RunConfig) -> tuple[str, torch.dtype]:
    precision = resolve_precision(cfg.deepspeed, "cuda")  # the plan is for GPUs
    return precision, torch.bfloat16 if precision == "bf16" else torch.float32


def _reference_bytes(rl, states_ref: ZeroStates) -> int:
    mode = resolve_reference_mode(rl.reference, torch.device("cuda"))  # the plan is for GPUs
    if mode == "partitioned":
        return states_ref.param_shards + states_ref.persistent_params
    if mode == "device":
        return states_ref.full_weights
    return 0  # "cpu" keeps it on the host, "none" has none


def plan_run(cfg: RunConfig, *, gpus: int, gpu_mem_gib: float, config_name: str = "CONFIG") -> MemoryPlan:
    """Plan ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gib`` GiB each.

    Raises:
        PlanError / ConfigError: an impossible configuration for ``gpus`` ranks or an
            unknown model geometry (one line).
    """
    if gpus < 1:
        raise PlanError(f"--gpus={gpus}: expected >= 1")
    if not (gpu_mem_gib > 0 and math.isfinite(gpu_mem_gib)):
        raise PlanError(f"--gpu-mem={gpu_mem_gib}: expected a positive number of GiB")
    rl = cfg.rl if cfg.stage == "rl" else None
    # checks the batch arithmetic for `gpus` ranks
    ds = build_deepspeed_config(cfg.train, cfg.deepspeed, gpus, "cuda",
                                offload_states=rl is not None and rl.offload_optimizer_states)
    precision, dtype = _dtype(cfg)
    mcfg, model_note = resolve_model_config(cfg)
    model = meta_model(mcfg, dtype, cfg.train.trainable)
    n_all = sum(p.numel() for _, p in unique_params(model))
    n_train = sum(p.numel() for _, p in unique_params(model) if p.requires_grad)
    st = zero_states(model, ds, gpus)
    plen, len_note = prompt_tokens(cfg)
    T = mcfg.num_image_tokens
    ckpt = cfg.deepspeed.activation_checkpointing
    micro = cfg.train.micro_batch_for(gpus)
    states = {"param shards": st.param_shards, "persistent params": st.persistent_params, "gradients": st.grads,
              "optimizer states": st.optimizer}
    train_work = {"gathered params (working set)": st.gather_working_set, "reduce bucket": st.reduce_bucket,
                  "optimizer step fp32 grads": st.step_fp32_grads}
    from .sft_data import caches_vision_features

    mode = history_mode(cfg)
    n_img = cfg.data.history_k if mode == "pixels" else 0
    cached = caches_vision_features(cfg, mode)
    how = "VQ codes" if not n_img else ("pixels, frozen tower: cached features in training" if cached
                                        else "pixels through the vision tower")
    notes = [f"sequence: {plen} prompt tokens ({len_note}) + {T} image tokens; history: {how}"]
    model_desc = f"{model_note}; {n_all / 1e9:.2f} B parameters, {n_train / 1e9:.2f} B trainable"
    phases: list[PhasePlan] = []
    seq = plen + T if rl is None else plen + T - 1
    act = objective_peak_bytes(model, micro, seq, checkpointing=ckpt, train=True, history_images=n_img,
                               cached_features=cached)
    other = objective_peak_bytes(model, micro, seq, checkpointing=not ckpt, train=True, history_images=n_img,
                               cached_features=cached)
    notes.append(f"activations of {micro} x {seq} tokens: {act / GIB:.2f} GiB with activation checkpointing "
                 f"{'on' if ckpt else 'off'}, {other / GIB:.2f} GiB with it {'off' if ckpt else 'on'}")
    act_name = f"activations (checkpointing {'on' if ckpt else 'off'})"
    reserve = {"CUDA context / NCCL / allocator reserve": RUNTIME_RESERVE_BYTES}
    if rl is None:
        phases.append(PhasePlan("sft step", {**states, **train_work, act_name: act, **reserve}))
    else:
        if rl.prompts_per_step % gpus:
            raise PlanError(f"rl.prompts_per_step={rl.prompts_per_step} is not divisible by --gpus={gpus}")
        updates_per_step(rl, cfg.train)  # the run's own check: a rollout is whole optimizer batches

        prompts_here = rl.prompts_per_step // gpus
        rows = generator_rows(prompts_here, rl.group_size, rl.rollout_batch_size)
        kv = rollout_kv_bytes(model, rows, plen + T, rl.uncond_mode, rl.group_size, rl.guidance_scale)
        work = rollout_work_bytes(model, rows // rl.group_size, plen, rows, n_img)
        ref = _reference_bytes(rl, st)
        kept = {} if rl.offload_optimizer_states else {**states, "reduce bucket": st.reduce_bucket}
        if rl.offload_optimizer_states:
            notes.append("rollout: rl.offload_optimizer_states moves the policy's ZeRO states to the host")
        notes.append(f"rollout: {prompts_here} prompts x {rl.group_size} samples on each GPU; the Generator holds "
                     f"{rows} rows (x2 for CFG) of {plen + T} tokens")
        phases.append(PhasePlan("rollout", {**kept, f"reference ({rl.reference})": ref,
                                            "gathered weights (all)": st.full_weights, "KV cache": kv,
                                            "prefill + logits working set": work, **reserve}))
        score = objective_peak_bytes(model, micro, seq, checkpointing=ckpt, train=False, history_images=n_img,
                               cached_features=cached)
        phases.append(PhasePlan("log-probs", {**states, f"reference ({rl.reference})": ref,
                                              "gathered params (working set)": st.gather_working_set,
                                              "reduce bucket": st.reduce_bucket,
                                              "no-grad forward": score, **reserve}))
        phases.append(PhasePlan("update", {**states, f"reference ({rl.reference})": ref, **train_work,
                                           act_name: act, **reserve}))
    for p in phases:
        p.items = {k: v for k, v in p.items.items() if v}
    return MemoryPlan(config_name, gpus, int(gpu_mem_gib * GIB), precision, cfg.deepspeed.zero_stage, model_desc,
                      phases, notes)


def startup_check(cfg: RunConfig, *, world_size: int, gpu_bytes: int, config_name: str) -> MemoryPlan:
    """``train.py``'s start-up check: the plan for this launch, or PlanOverflowError (one line)."""
    plan = plan_run(cfg, gpus=world_size, gpu_mem_gib=gpu_bytes / GIB, config_name=config_name)
    line = plan.overflow_line()
    if line is not None:
        raise PlanOverflowError(line)
    return plan


# ----------------------------------------------------------------------------- CLI
EXIT_FITS, EXIT_CONFIG_ERROR, EXIT_DOES_NOT_FIT = 0, 2, 3


def _cmd_plan(args) -> int:
    import sys

    from pgen_engine.config import load_config
    from pgen_engine.models.janus_config import CheckpointError

    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_run(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, config_name=args.config)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pgen plan: error: {msg}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(format_plan(plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def register(subparsers) -> None:
    """Add ``pgen plan`` to the ``pgen`` command."""
    p = subparsers.add_parser(
        "plan", help="size a training run per GPU (exit 0: fits, 3: does not fit, 2: bad config)",
        description="Memory per GPU of each phase of a run (SFT step; RL rollout, log-probs, update), computed "
                    "from the model built on the meta device, the DeepSpeed config the run builds and the "
                    "Generator's KV cache. Exit status 0 when the peak fits, 3 when it does not, 2 on a bad "
                    "config or key.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (ranks); default 8")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB; default 80")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")
    p.set_defaults(func=_cmd_plan)


# ----------------------------------------------------------------------------- train.py start-up
def launch_gpu_bytes() -> int | None:
    """Memory of this process's GPU (``LOCAL_RANK``), or None on a machine without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory)


def preflight(cfg: RunConfig, config_name: str, *, gpu_bytes: int | None = None) -> MemoryPlan | None:
    """``train.py``'s start-up check of a launch: the plan, or PlanOverflowError (one line).

    Plans for ``WORLD_SIZE`` ranks (1 without a launcher) on GPUs of ``gpu_bytes`` (default:
    this process's GPU). Skipped (None) without CUDA — CPU runs are fp32 demos the plan
    does not describe — and when ``PGEN_PLAN=0`` (to run a config the plan rejects anyway).
    """
    if not envs.get("PGEN_PLAN"):
        return None
    if gpu_bytes is None:
        gpu_bytes = launch_gpu_bytes()
        if gpu_bytes is None:
            return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return startup_check(cfg, world_size=world, gpu_bytes=gpu_bytes, config_name=config_name)
