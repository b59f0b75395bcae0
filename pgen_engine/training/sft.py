"""Supervised fine-tuning: history -> next item's image codes, loss on image tokens only.

Objective: for every position ``i`` with ``loss_mask[i]`` (the collator's shift
convention: position ``i`` predicts token ``i + 1``, True exactly where token ``i + 1`` is
a target image code), the negative log-prob of ``labels[i]`` under the generation head,
via :meth:`JanusModel.image_token_logprobs` (the fused, chunked ``token_logprobs`` op), averaged
over the micro-batch's target tokens. Condition dropout (prompt -> its "pad"
unconditional counterpart with probability ``train.cond_dropout_p``) happens in the loader.

The model runs inside :class:`ObjectiveModule`, whose ``forward(fn, ...)`` calls
``fn(model, ...)``: DeepSpeed's engine forward then covers the whole objective, so ZeRO-3
gathers every parameter it touches (including the generation-head weight the fused op
reads directly, registered as an external parameter).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pgen_engine.config import RunConfig, dump_config, register_stage_section
from pgen_engine.io_utils import atomic_write_json, atomic_write_text

from .checkpoints import CHECKPOINTS, export_hf, latest_checkpoint, load_resumable, save_resumable
from .distributed import all_ranks_true, init_distributed, mean_over_ranks
from .errors import NonFiniteError  # noqa: F401  (re-exported: sft.NonFiniteError is public)
from .metrics import MetricsLogger, device_peak_flops, train_flops_per_token

register_stage_section("sft", None)

BATCH_KEYS = ("input_ids", "gen_code_mask", "attention_mask", "position_ids", "loss_mask", "labels")


class ObjectiveModule(nn.Module):
    """Wraps a JanusModel so any objective runs as this module's forward (see module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return fn(self.model, *args, **kwargs)


def register_zero3_external_params(wrapper: ObjectiveModule) -> None:
    """Tell ZeRO-3 that the wrapper's forward reads the generation head's final weight/bias directly."""
    import deepspeed

    head = wrapper.model.generation_head.vision_head
    for p in (head.weight, head.bias):
        if p is not None:
            deepspeed.zero.register_external_parameter(wrapper, p)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean image-token cross-entropy of a collated batch.

    Args:
        model: a JanusModel.
        batch: the collator's dict — ``input_ids``/``labels`` int64 ``[B,L]``, ``gen_code_mask``/
            ``attention_mask``/``loss_mask`` bool ``[B,L]``, ``position_ids`` int64 ``[B,L]``,
            optional ``pixel_values`` ``[n_img,3,H,W]`` or cached ``image_features``
            ``[n_img,T_img,D_vision]`` (frozen vision tower).
    Returns:
        (loss: fp32 scalar, n_targets: int64 scalar — target tokens in the batch).
    """
    mask = batch["loss_mask"]
    embeds = model.embed_inputs(batch["input_ids"], batch["gen_code_mask"], batch.get("pixel_values"),
                                image_features=batch.get("image_features"))
    hidden = model.forward_train(embeds, batch["attention_mask"], batch.get("position_ids"))
    targets = batch["labels"][mask]
    if targets.numel() == 0:
        raise ValueError("batch has no target image tokens (loss_mask is all False)")
    logp, _ = model.image_token_logprobs(hidden[mask], targets)
    return -logp.float().mean(), mask.sum()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``--resume`` value -> a checkpoint folder or None.

    "auto": the latest complete checkpoint under ``output_dir/checkpoints`` (None when there
    is none); a path: that checkpoint (FileNotFoundError when it is not a complete one).
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir / CHECKPOINTS)
    p = Path(resume)
    found = latest_checkpoint(p) if (p / "latest").is_file() else p
    if found is None or not (found / "pgen_checkpoint.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
    return found


class _Batches:
    """Endless iteration over the loader's epochs, counting consumed micro-batches."""

    def __init__(self, loader):
        self.loader = loader
        self.it = iter(loader)

    def next(self) -> dict[str, torch.Tensor]:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def run(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` (stage sft) to ``train.max_steps``; returns a summary dict (rank 0's view).

    Writes ``output_dir/{config.resolved.yaml, metrics.jsonl, checkpoints/, final/, summary.json}``.

    Raises:
        NonFiniteError: loss or gradient norm not finite (no checkpoint written for that step).
        DataPrepError, ConfigError, ResumeError: bad inputs, with one-line messages.
    """
    from pgen_engine.data.prompts import build_sft_loader

    from .engine import build_engine
    from .sft_data import prepare_sft_data

    dist = init_distributed()
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.resolved.yaml", dump_config(cfg))
    torch.manual_seed(cfg.seed + dist.rank)
    data = prepare_sft_data(cfg, dist)
    te = build_engine(cfg, data.model_dir, dist, wrap=ObjectiveModule)
    engine = te.engine
    model = engine.module.model
    if engine.zero_optimization_stage() == 3:
        register_zero3_external_params(engine.module)

    ckpt = resolve_resume(resume, out)
    start_step, consumed = 0, 0
    if ckpt is not None:
        client = load_resumable(engine, ckpt, dist)
        start_step, consumed = int(client["step"]), int(client["micro_batches"])
    t = cfg.train
    probe = build_sft_loader(data.dataset, data.special, batch_size=t.micro_batch_size, seed=cfg.seed,
                             rank=dist.rank, world_size=dist.world_size)
    per_epoch = probe.batch_sampler.batches_per_epoch()
    epoch, position = divmod(consumed, per_epoch)
    loader = build_sft_loader(data.dataset, data.special, batch_size=t.micro_batch_size, seed=cfg.seed,
                              rank=dist.rank, world_size=dist.world_size, epoch=epoch, position=position,
                              cond_dropout_p=t.cond_dropout_p, num_workers=cfg.data.num_workers)
    batches = _Batches(loader)
    logger = MetricsLogger(out, is_main=dist.is_main, total_steps=t.max_steps, start_step=start_step,
                           progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
    peak = device_peak_flops(dist.device)
    lm_params = sum(p.numel() for n, p in model.named_parameters()
                    if n.split(".")[0] in ("language_model", "generation_head", "generation_aligner"))
    ckpt_root = out / CHECKPOINTS
    last_saved: Path | None = ckpt
    loss_val = float("nan")
    try:
        for step in range(start_step, t.max_steps):
            t0 = time.perf_counter()
            lr = float(engine.get_lr()[0])
            losses, tokens, seq_len = [], 0, 0
            for _ in range(te.grad_accum):
                batch = _to_device(batches.next(), dist.device)
                loss, _ = engine(sft_loss, batch)
                value = float(loss.detach())
                if not all_ranks_true(math.isfinite(value)):
                    raise NonFiniteError(f"step {step + 1}: loss is not finite ({value}) — stopping; last good "
                                         f"checkpoint: {last_saved or 'none'} (left untouched)")
                engine.backward(loss)
                engine.step()
                consumed += 1
                losses.append(value)
                tokens += int(batch["attention_mask"].sum())
                seq_len = max(seq_len, batch["input_ids"].shape[1])
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"step {step + 1}: gradient norm is not finite ({grad_norm}) — stopping; "
                                     f"last good checkpoint: {last_saved or 'none'} (left untouched)")
            loss_val = mean_over_ranks(sum(losses) / len(losses))
            dt = time.perf_counter() - t0
            tok_s = mean_over_ranks(tokens / dt) * dist.world_size
            done = step + 1
            if done % t.log_every == 0 or done == t.max_steps:
                row = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                       "step_time_s": dt, "epoch": consumed // per_epoch}
                if peak is not None:
                    cfg_t = model.config.text
                    flops = train_flops_per_token(lm_params, cfg_t.num_layers, cfg_t.hidden_size, seq_len)
                    row["mfu"] = tok_s * flops / (peak * dist.world_size)
                logger.log(row)
            logger.advance()
            if t.save_every and done % t.save_every == 0 and done < t.max_steps:
                last_saved = save_resumable(engine, ckpt_root, done, {"micro_batches": consumed}, dist,
                                            keep=t.keep_checkpoints)
        if start_step < t.max_steps or last_saved is None:
            last_saved = save_resumable(engine, ckpt_root, t.max_steps, {"micro_batches": consumed}, dist,
                                        keep=t.keep_checkpoints)
        export_hf(model, out / "final", dist)
    finally:
        logger.close()
    summary = {"steps": t.max_steps, "resumed_from": start_step, "final_loss": loss_val,
               "world_size": dist.world_size, "grad_accum": te.grad_accum, "precision": te.precision,
               "trainable_params": te.trainable_params, "checkpoint": str(last_saved), "final": str(out / "final")}
    if dist.is_main:
        atomic_write_json(out / "summary.json", summary)
    return summary
