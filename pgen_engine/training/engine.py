"""DeepSpeed, behind one module: engine build, DeepSpeed JSON, LR schedule and ZeRO-3 internals.

Everything the package needs from DeepSpeed goes through here, so a DeepSpeed upgrade
that changes an internal changes this file only (``tests/training/test_engine.py`` fails
when another module imports ``deepspeed`` or reads its private attributes):

* :func:`build_deepspeed_config` (the JSON) and :func:`lr_lambda` (the schedule);
* :func:`build_engine` — load the model, freeze groups, ``deepspeed.initialize``;
* :func:`build_inference_engine` — a ZeRO-3 engine without optimizer (partitioned reference);
* :class:`ObjectiveModule` + :func:`register_zero3_external_params` — the objective runs
  as the engine's forward, so ZeRO-3 gathers what it touches;
* :func:`gathered_parameters` / :func:`gathered_module` — materialise ZeRO-3 weights once
  for many forwards (rollouts, export), detaching and re-attaching DeepSpeed's hooks;
* :func:`optimizer_states_offloaded` — ``offload_states`` / ``reload_states`` around a phase;
* :func:`zero3_shards` / :func:`zero_master_tensors` — what the memory ledger counts.

DeepSpeed is an optional dependency of the package (generation does not need it); when it
is missing, :func:`require_deepspeed` raises :class:`DeepSpeedMissingError` with one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from pgen_engine.config import PARAMETER_GROUPS, DeepSpeedSection, TrainConfig
from pgen_engine.errors import PgenUserError
from pgen_engine.models import load_model

from .distributed import DistInfo, barrier, comm_device_type, world_size

# DeepSpeed is imported on first use, not with this module: importing it detects the
# accelerator and logs a warning on CPU machines, which every `pgen` command (whose eval /
# demo modules import the training package) printed even when it trains nothing.
_NOT_LOADED = object()
deepspeed: Any = _NOT_LOADED  # the module once loaded; None when it is not installed


class DeepSpeedMissingError(PgenUserError):
    """Training was asked for but the ``deepspeed`` package is not installed."""


def require_deepspeed():
    """The ``deepspeed`` module; DeepSpeedMissingError (one line) when it is not installed."""
    global deepspeed
    if deepspeed is _NOT_LOADED:
        try:
            import deepspeed as module  # late import: see _NOT_LOADED
        except ImportError:  # exercised by tests with a patched module table
            module = None
        deepspeed = module
    if deepspeed is None:
        raise DeepSpeedMissingError("training needs DeepSpeed, which is not installed: pip install deepspeed "
                                    "(or pip install -r requirements-dev.txt)")
    return deepspeed


# ----------------------------------------------------------------------------- config JSON and schedule
def resolve_precision(section: DeepSpeedSection, device_type: str) -> str:
    """"bf16" or "fp32" for the run: "auto" means bf16 on CUDA and fp32 elsewhere."""
    if section.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return section.precision


def build_deepspeed_config(train: TrainConfig, ds_section: DeepSpeedSection, world_size: int, device_type: str,
                           *, offload_states: bool = False) -> dict:
    """The DeepSpeed config dict for a run — the only place it is built.

    Args:
        train: batch sizes, clipping and AdamW settings.
        ds_section: ZeRO stage, offload and precision switches.
        world_size: number of data-parallel ranks.
        device_type: "cuda" or "cpu" (decides "auto" precision).
        offload_states: the stage moves optimizer states off the device between phases
            (RL rollouts with ``rl.offload_optimizer_states``): needs DeepSpeed's FusedAdam.
    Returns:
        a dict for ``deepspeed.initialize(config=...)``: batch sizes, ZeRO stage and
        offload, precision, clipping and AdamW (the schedule itself is :func:`lr_lambda`,
        handed to DeepSpeed as a client ``LambdaLR`` so that the first step already trains
        at ``lr / warmup_steps``; DeepSpeed's ``WarmupCosineLR`` spends step 1 at lr 0).
    Raises:
        ConfigError: impossible batch arithmetic for ``world_size``.
    """
    t, d = train, ds_section
    accum = t.grad_accum_steps(world_size)
    precision = resolve_precision(d, device_type)
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        zero.update(overlap_comm=device_type == "cuda", contiguous_gradients=True,
                    reduce_bucket_size=d.reduce_bucket_size)
    if d.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=d.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=d.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_for(world_size),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
                       # torch's AdamW avoids a JIT-built fused kernel when states stay on device;
                       # RL's offload_states around rollouts needs DeepSpeed's FusedAdam instead.
                       **({} if d.offload_optimizer or offload_states else {"torch_adam": True})},
        },
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if d.zero_stage == 0 and precision == "bf16":
        # bf16 without ZeRO: keep fp32 master weights/grad accumulation.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` for 0-based optimizer step ``s``.

    Linear warmup ``(s+1)/warmup_steps`` for ``s < warmup_steps``, then cosine from 1 to
    ``min_lr_ratio`` reached at the last step (``max_steps - 1``), constant after.
    """
    warm, total, floor = train.warmup_steps, train.max_steps, train.min_lr_ratio

    def fn(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        span = max(total - 1 - warm, 1)
        progress = min(max(s - warm, 0) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# ----------------------------------------------------------------------------- engine build
class ObjectiveModule(nn.Module):
    """Wraps a JanusModel so any objective runs as this module's forward.

    ``forward(fn, *args)`` calls ``fn(model, *args)``: DeepSpeed's engine forward then
    covers the whole objective, so ZeRO-3 gathers every parameter it touches.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return fn(self.model, *args, **kwargs)


def register_zero3_external_params(wrapper: ObjectiveModule) -> None:
    """Tell ZeRO-3 that the wrapper's forward reads the generation head's final weight/bias directly
    (the fused log-prob op reads them outside the head's own forward)."""
    ds = require_deepspeed()
    head = wrapper.model.generation_head.vision_head
    for p in (head.weight, head.bias):
        if p is not None:
            ds.zero.register_external_parameter(wrapper, p)


@dataclasses.dataclass
class TrainEngine:
    """A DeepSpeed engine around an :class:`ObjectiveModule` holding a JanusModel.

    Attributes:
        engine: the ``deepspeed.DeepSpeedEngine``; ``engine.module.model`` is the JanusModel.
        ds_config: the DeepSpeed config dict it was built with.
        precision: "bf16" or "fp32".
        grad_accum: micro-batches per optimizer step on each rank.
        micro_batch_size: examples per rank per forward.
        trainable_params: number of trained parameters.
    """

    engine: Any
    ds_config: dict
    precision: str
    grad_accum: int
    micro_batch_size: int
    trainable_params: int

    @property
    def model(self) -> nn.Module:
        """The JanusModel being trained."""
        return self.engine.module.model

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def grad_norm(self) -> float:
        """The last optimizer step's global gradient norm (NaN when DeepSpeed did not compute one)."""
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")


def parameter_group(name: str) -> str:
    """The group (first name component) of a JanusModel parameter name; ValueError if unknown."""
    group = name.split(".", 1)[0]
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"parameter {name!r} belongs to no known group {PARAMETER_GROUPS}")
    return group


def set_trainable(model: nn.Module, groups: list[str]) -> int:
    """Freeze every parameter outside ``groups``; returns the number of trainable elements.

    A parameter of two groups (``lm_head`` tied to ``language_model.embed_tokens``,
    ``tie_word_embeddings``) trains when either is listed: ``["lm_head"]`` on a tied checkpoint
    left the head frozen (the shared matrix was looked up under its first name only)."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    n = 0
    for key, p in params.items():
        p.requires_grad_(any(parameter_group(name) in groups for name in names[key]))
        n += p.numel() if p.requires_grad else 0
    return n


def model_dtype(section: DeepSpeedSection, device: torch.device) -> torch.dtype:
    """The dtype weights are loaded in for this run (bf16 when training in bf16)."""
    return torch.bfloat16 if resolve_precision(section, device.type) == "bf16" else torch.float32


def build_engine(train: TrainConfig, ds_section: DeepSpeedSection, model_dir: str | Path, dist_info: DistInfo,
                 *, offload_states: bool = False) -> TrainEngine:
    """Load ``model_dir`` and wrap it (in an :class:`ObjectiveModule`) in a DeepSpeed engine.

    Trainable groups are set on the JanusModel first; under ZeRO-3 the generation head's
    external parameters are registered. Every rank loads the full checkpoint on CPU before
    ZeRO partitions it (weights in bf16 when training in bf16).
    """
    ds = require_deepspeed()
    precision = resolve_precision(ds_section, dist_info.device.type)
    if precision == "bf16" and dist_info.device.type != "cuda":
        raise ValueError("deepspeed.precision=bf16 needs a CUDA device; use fp32 (or auto) on CPU")
    ds_config = build_deepspeed_config(train, ds_section, dist_info.world_size, dist_info.device.type,
                                       offload_states=offload_states)
    model = load_model(model_dir, device="cpu", dtype=model_dtype(ds_section, dist_info.device))
    model.train()
    model.language_model.gradient_checkpointing = ds_section.activation_checkpointing
    n_train = set_trainable(model, train.trainable)
    module = ObjectiveModule(model)
    params = [p for p in module.parameters() if p.requires_grad]
    schedule = lr_lambda(train)
    engine, _, _, _ = ds.initialize(
        model=module, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    unlink_shm_buffer()
    te = TrainEngine(engine, ds_config, precision, ds_config["gradient_accumulation_steps"],
                     ds_config["train_micro_batch_size_per_gpu"], n_train)
    if te.zero3:
        register_zero3_external_params(engine.module)
    return te


def build_inference_engine(model: nn.Module, ds_config: dict) -> Any:
    """A ZeRO-3 engine without optimizer around ``ObjectiveModule(model)`` (frozen, partitioned).

    ``ds_config`` is a training config (:func:`build_deepspeed_config`); its optimizer,
    scheduler, clipping and optimizer offload are dropped. Returns the engine; call it as
    ``engine(fn, *args)``.
    """
    ds = require_deepspeed()
    cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
    zero = {k: v for k, v in cfg.get("zero_optimization", {}).items() if k != "offload_optimizer"}
    cfg["zero_optimization"] = {**zero, "stage": 3}
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = ds.initialize(model=ObjectiveModule(model), config=cfg)
    unlink_shm_buffer()
    register_zero3_external_params(engine.module)
    return engine


def unlink_shm_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU comm op (``ops/csrc/cpu/comm/shm.cpp``) creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB) per
    rank and never unlinks it: every multi-rank CPU run left them in RAM until reboot (20 GB
    after a day of runs on the development VM), and a later run on the same port could map a
    stale one. Each rank maps every other rank's buffer before DeepSpeed's init returns, so
    after a barrier the names can go: the mappings stay valid, and the kernel frees the memory
    when the last rank exits, whether it finishes, fails or is killed. Collective on CPU
    multi-rank runs (the buffers exist only there); idempotent.
    """
    if world_size() < 2 or comm_device_type() != "cpu":
        return
    barrier()  # every rank has returned from DeepSpeed's shm_initialize: all buffers are mapped
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch_dist.get_rank()}")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


# ----------------------------------------------------------------------------- ZeRO-3 internals
def is_zero3(module: nn.Module) -> bool:
    """True when ``module``'s parameters are ZeRO-3 partitioned (they carry ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered_parameters(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """All of ``params`` materialised (read-only) inside the block; a no-op for plain parameters."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    with require_deepspeed().zero.GatheredParameters(params, modifier_rank=None):
        yield


def _param_offload(engine: Any) -> Any:
    """The engine's ZeRO-3 ``DeepSpeedZeRoOffload`` (holds the module hooks), or None."""
    opt = getattr(engine, "optimizer", None)
    po = getattr(opt, "parameter_offload", None)
    if po is not None:
        return po
    if opt is not None and hasattr(opt, "forward_hooks") and hasattr(opt, "_register_deepspeed_module"):
        return opt  # inference-only ZeRO-3 engine: the optimizer slot holds the offload object
    return None


@contextlib.contextmanager
def gathered_module(module: nn.Module, engine: Any = None) -> Iterator[nn.Module]:
    """Yield ``module`` with all parameters materialised, once, for many forwards.

    Without ZeRO-3 this is a no-op. With ZeRO-3 the shards are all-gathered on entry
    (read-only) and re-partitioned on exit; DeepSpeed's per-module hooks are detached in
    between (they would otherwise release each sub-module's weights after every forward)
    and re-attached afterwards.
    """
    if not is_zero3(module):
        yield module
        return
    po = _param_offload(engine) if engine is not None else None
    if engine is not None and po is None:
        raise RuntimeError("gathered_module: ZeRO-3 parameters but the DeepSpeed engine exposes no parameter "
                           "offload object (engine.optimizer.parameter_offload); unsupported DeepSpeed version?")
    params = list(module.parameters())
    with gathered_parameters(params):
        if po is not None:
            for p in params:
                p.ds_active_sub_modules.clear()
            for h in (*po.forward_hooks, *po.backward_hooks):
                h.remove()
            po.forward_hooks, po.backward_hooks = [], []
        try:
            yield module
        finally:
            if po is not None:
                po._register_deepspeed_module(po.module)


def can_offload_states(engine: Any) -> bool:
    """True when ``engine`` supports DeepSpeed's ``offload_states`` / ``reload_states``."""
    return engine is not None and hasattr(engine, "offload_states")


@contextlib.contextmanager
def optimizer_states_offloaded(engine: Any, enabled: bool = True) -> Iterator[None]:
    """Inside the block the engine's optimizer states live off the device (``offload_states``)."""
    if not enabled:
        yield
        return
    engine.offload_states()
    try:
        yield
    finally:
        engine.reload_states()


def zero3_shards(module: nn.Module) -> list[torch.Tensor]:
    """This rank's ZeRO-3 parameter shards of ``module`` (empty for non-ZeRO-3 parameters)."""
    return [p.ds_tensor for p in module.parameters() if isinstance(getattr(p, "ds_tensor", None), torch.Tensor)]


def zero_master_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The fp32 master copies a DeepSpeed ZeRO optimizer holds (empty for a torch optimizer)."""
    out: list[torch.Tensor] = []
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        out += [t for t in getattr(optimizer, name, []) or [] if isinstance(t, torch.Tensor)]
    return out
