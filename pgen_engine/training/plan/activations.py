"""Activation memory measured on ``meta`` tensors: the training objective's forward (and
backward) and the rollout's prefill run through the fused GPU ops' fake kernels under a
dispatch mode that tracks live storage bytes."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from pgen_engine.models import op_dispatch
from pgen_engine.ops._backend import triton_available
from pgen_engine.training.grpo import guided_log_softmax


class _LiveStorageMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks bytes of live tensor storages created by ops under it, and their peak."""

    def __init__(self, ignore: set[int]):
        super().__init__()
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
                         history_images: int = 0, cached_features: bool = False,
                         uncond_seq: int | None = None) -> int:
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

    ``uncond_seq`` (RL with ``rl.policy_distribution: guided``): the objective is
    :func:`pgen_engine.training.sequences.guided_policy_logprobs` instead: a second forward
    over ``[rows, uncond_seq]`` unconditional-prompt sequences (no history images), batched
    with the conditional rows in one forward (left-padded to one length), both branches'
    ``[rows, T, K]`` float32 logits materialised and mixed; about twice the activations of
    the conditional objective, plus the logits.
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
            if uncond_seq is not None:
                # guided_policy_logprobs: conditional and unconditional rows in one batched
                # forward (left-padded to one length), both branches' logits mixed
                L = max(seq, uncond_seq)
                gids, gcm, gatt, _ = _meta_batch(2 * rows, L, T)
                x = _embed(model, gids[:rows], gcm[:rows], pixels, tower)
                x = torch.cat([x, model.embed_inputs(gids[rows:], gcm[rows:])])
                logits = model.image_head_logits(model.forward_train(x, gatt)[:, -T:])
                lsm = guided_log_softmax(logits[:rows], logits[rows:], 2.0, 1.0)
                lp = lsm.gather(-1, targets.unsqueeze(-1))
            else:
                h = model.forward_train(_embed(model, ids, cm, pixels, tower), att)[:, -T:]
                lp, _ = model.image_token_logprobs(h.reshape(rows * T, -1), targets.reshape(-1), temperature=1.0)
            return -lp.float().mean() if train else None

    try:
        return measure_peak_bytes(model, run, backward=train)
    finally:
        lm.gradient_checkpointing = was_ckpt
        model.train(was_training)


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
