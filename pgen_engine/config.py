"""Typed run configuration: dataclasses loaded from YAML, dotted overrides, validation,
and the one function that turns them into a DeepSpeed config dict.

A run config is one YAML file with the sections of :class:`RunConfig`::

    stage: sft                  # which trainer runs (sft; rl registers itself)
    output_dir: runs/demo_sft
    seed: 0
    model: {...}                # ModelConfig
    data: {...}                 # DataConfig
    train: {...}                # TrainConfig
    deepspeed: {...}            # DeepSpeedSection
    logging: {...}              # LoggingConfig
    rl: {...}                   # only for stages that registered a section (see register_stage_section)

Command-line overrides are ``section.key=value`` (``train.max_steps=20``,
``output_dir=/tmp/run``); the value is parsed as YAML and then type-checked exactly like
the file. Every problem raises :class:`ConfigError` with one line naming the file and the
dotted key, and what was expected.

Batch arithmetic: ``train.global_batch_size`` is fixed by the config, so one config gives
the same optimisation on any number of ranks; gradient accumulation is derived as
``global / (micro * world_size)`` and must be a positive integer.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """An invalid run config; the message is one line naming the source and key."""


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass
class ModelInitConfig:
    """Geometry of a freshly initialised tiny Janus (used when ``model.checkpoint`` is null).

    ``init_std`` re-draws every weight matrix from N(0, init_std) (null keeps transformers'
    0.02). Tiny models learn to use their history much faster with a wider init and a
    wider VQ embedding (``vq_embed_dim``): with 0.02 and 8 dims, the code embeddings of a
    prompt are nearly identical and attention gets almost no gradient.

    ``codebook_size``, ``image_size`` and ``patch_size`` are not set here: they come from
    the image tokenizer, so the model's image tokens are exactly the tokenizer's codes.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 300
    vq_embed_dim: int = 8
    vision_hidden_size: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    max_position_embeddings: int = 1024
    init_std: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("seed", "init_std") and getattr(self, f.name) < 1:
                raise ConfigError(f"model.init.{f.name}={getattr(self, f.name)}: expected a positive integer")
        if self.init_std is not None and not 0 < self.init_std < 1:
            raise ConfigError(f"model.init.init_std={self.init_std}: expected a float in (0, 1) or null")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.init: hidden_size={self.hidden_size} must be a multiple of num_heads="
                              f"{self.num_heads}, which must be a multiple of num_kv_heads={self.num_kv_heads}")


@dataclasses.dataclass
class ModelConfig:
    """Which model to train.

    Attributes:
        checkpoint: a Hugging Face Janus directory; null -> a tiny random model is created
            under ``<output_dir>/init_model`` from ``init`` and the data tokenizer.
        init: geometry for the null-checkpoint case.
    """

    checkpoint: Optional[str] = None
    init: ModelInitConfig = dataclasses.field(default_factory=ModelInitConfig)


@dataclasses.dataclass
class SynthSection:
    """Synthetic dataset generated into ``data.dataset_dir`` when that folder is missing.

    ``drift``: per-step probability that a user's preferred value of an attribute changes;
    ``fidelity``: probability that an interaction follows the preferred value (see
    :mod:`pgen_engine.data.synth`).
    """

    users: int = 200
    items: int = 120
    image_size: int = 32
    seed: int = 0
    drift: float = 0.08
    fidelity: float = 0.85

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 1:
            raise ConfigError(f"data.synth: users={self.users} and items={self.items} must be >= 1")
        if not (0 <= self.drift <= 1 and 0 <= self.fidelity <= 1):
            raise ConfigError(f"data.synth: drift={self.drift} and fidelity={self.fidelity} must be in [0, 1]")
        if not 32 <= self.image_size <= 64:
            raise ConfigError(f"data.synth.image_size={self.image_size}: expected 32..64")


@dataclasses.dataclass
class DataConfig:
    """Dataset, image tokenizer, splits and prompts.

    Attributes:
        dataset_dir: native-layout dataset folder (relative paths resolve against the
            config file's directory's parent, i.e. the repository root for configs/).
        synth: if set, the synthetic dataset is generated into ``dataset_dir`` when missing.
        work_dir: where the fitted tokenizer and the token cache live (reused across runs).
        tokenizer: "patch_kmeans" (fit on the dataset's images when missing) or
            "checkpoint_vq" (the model's own VQ).
        patch_size, codebook_size, kmeans_iters, tokenizer_image_size: PatchKMeans settings.
        history_k, stride, max_windows_per_user, min_interactions: training windows.
        history_mode: how history images enter the model: "pixels" (vision tower + aligner
            into ``<image>`` placeholders) or "codes" (VQ codes through the generation
            embedding). null resolves when the config is built: the mode ``model.checkpoint``
            was trained with (its run's ``config.resolved.yaml``), else "pixels" when the
            model has a vision tower (every Janus; the tiny init model too), else "codes".
            See :mod:`pgen_engine.data.history`.
        with_titles: put item titles in the prompt.
        instruction: the prompt instruction.
        num_workers: DataLoader workers.
    """

    dataset_dir: str = "data/synth"
    synth: Optional[SynthSection] = None
    work_dir: Optional[str] = None
    tokenizer: Literal["patch_kmeans", "checkpoint_vq"] = "patch_kmeans"
    tokenizer_image_size: int = 32
    patch_size: int = 8
    codebook_size: int = 64
    kmeans_iters: int = 20
    history_k: int = 4
    stride: int = 1
    max_windows_per_user: Optional[int] = None
    min_interactions: int = 5
    history_mode: Optional[Literal["pixels", "codes"]] = None
    with_titles: bool = False
    instruction: str = "Generate the next item this user will like."
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer_image_size % self.patch_size or self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"data.patch_size={self.patch_size}: expected a power of two dividing "
                              f"data.tokenizer_image_size={self.tokenizer_image_size}")
        for name in ("codebook_size", "history_k", "stride", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)}: expected >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: expected >= 0")


DEFAULT_TRAINABLE = ("language_model", "aligner", "generation_aligner", "generation_embeddings", "generation_head")
PARAMETER_GROUPS = ("language_model", "lm_head", "aligner", "generation_aligner", "generation_embeddings",
                    "generation_head", "vision_model", "vqmodel")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing.

    Attributes:
        micro_batch_size: examples per rank per forward.
        global_batch_size: examples per optimizer step over all ranks (fixed across world sizes).
        max_steps: optimizer steps.
        lr, min_lr_ratio, warmup_steps: linear warmup to ``lr`` then cosine to ``lr*min_lr_ratio``.
        weight_decay, betas, eps: AdamW.
        grad_clip: global gradient-norm clip (0 = off).
        cond_dropout_p: probability a training prompt is replaced by its unconditional
            counterpart (keeps CFG meaningful).
        trainable: parameter groups (name prefixes) that are trained; the rest are frozen.
        save_every: checkpoint every N optimizer steps (0 = only at the end).
        keep_checkpoints: how many resumable checkpoints to keep (older ones are deleted).
        log_every: metrics every N steps.
    """

    micro_batch_size: int = 4
    global_batch_size: int = 8
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    cond_dropout_p: float = 0.1
    trainable: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TRAINABLE))
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError(f"train: micro_batch_size={self.micro_batch_size} and global_batch_size="
                              f"{self.global_batch_size} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps}: expected >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr={self.lr}: expected a positive finite number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio}: expected a value in [0, 1]")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}: expected 0..max_steps={self.max_steps}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={list(self.betas)}: expected two values in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"train: grad_clip={self.grad_clip} and weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 <= self.cond_dropout_p < 1.0:
            raise ConfigError(f"train.cond_dropout_p={self.cond_dropout_p}: expected a probability in [0, 1)")
        bad = [g for g in self.trainable if g not in PARAMETER_GROUPS]
        if bad or not self.trainable:
            raise ConfigError(f"train.trainable={self.trainable}: expected a non-empty subset of {list(PARAMETER_GROUPS)}")
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError(f"train: save_every={self.save_every} (>= 0), keep_checkpoints={self.keep_checkpoints} "
                              f"(>= 1), log_every={self.log_every} (>= 1)")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank for ``world_size`` ranks.

        Raises ConfigError when ``global_batch_size`` is not divisible by
        ``micro_batch_size * world_size``.
        """
        per_step = self.micro_batch_size * world_size
        if world_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"train.micro_batch_size={self.micro_batch_size} x world_size={world_size}")
        return self.global_batch_size // per_step


@dataclasses.dataclass
class DeepSpeedSection:
    """DeepSpeed switches (the JSON itself is built by :func:`build_deepspeed_config`).

    Attributes:
        zero_stage: 0, 2 or 3.
        precision: "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32".
        offload_optimizer: optimizer states on CPU (ZeRO 2/3).
        offload_params: parameters on CPU (ZeRO 3 only).
        activation_checkpointing: recompute decoder layers in backward.
        stage3_prefetch_bucket_size, stage3_param_persistence_threshold, reduce_bucket_size:
            ZeRO-3 tuning knobs passed through.
    """

    zero_stage: int = 3
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 50_000_000

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage}: expected 0, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params=true requires deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer=true requires deepspeed.zero_stage 2 or 3")


@dataclasses.dataclass
class LoggingConfig:
    """Observability: progress bar (rank 0), TensorBoard (needs the ``tensorboard`` package)."""

    progress: bool = True
    tensorboard: bool = False


@dataclasses.dataclass
class RunConfig:
    """A whole run. ``stage_config`` holds the parsed section of a registered stage (e.g. ``rl``)."""

    stage: str = "sft"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    stage_config: Any = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: expected one of {sorted(STAGES)}")
        if self.data.history_mode is None:
            self.data.history_mode = _default_history_mode(self.model.checkpoint)


def _default_history_mode(checkpoint: Optional[str]) -> Optional[str]:
    """``data.history_mode: null`` -> the checkpoint's trained / architecture default; None
    while the checkpoint folder does not exist yet (resolved again at data preparation)."""
    from pgen_engine.data.history import trained_history_mode

    if checkpoint is None:
        return "pixels"  # the tiny init model has a vision tower
    if not (Path(checkpoint) / "config.json").is_file():
        return None
    try:
        return trained_history_mode(checkpoint)[0]
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.history_mode: cannot resolve the default from model.checkpoint={checkpoint} "
                          f"({e})") from None


# Stages and their optional extra sections. A stage (e.g. rl) registers a dataclass for its
# own top-level section instead of editing RunConfig, so stages stay independent.
STAGES: dict[str, Optional[type]] = {"sft": None}
# Module implementing each stage: it exposes ``run(cfg, resume) -> dict`` and, on import,
# calls register_stage_section for its config section.
STAGE_MODULES = {"sft": "pgen_engine.training.sft", "rl": "pgen_engine.training.rl"}


def stage_module(stage: str):
    """Import and return the module implementing ``stage`` (registers its config section)."""
    import importlib

    if stage not in STAGE_MODULES:
        raise ConfigError(f"stage={stage!r}: expected one of {sorted(STAGE_MODULES)}")
    try:
        return importlib.import_module(STAGE_MODULES[stage])
    except ModuleNotFoundError as e:
        if e.name == STAGE_MODULES[stage]:
            raise ConfigError(f"stage={stage!r}: not available in this installation ({STAGE_MODULES[stage]} "
                              "is missing)") from None
        raise


def register_stage_section(stage: str, section: Optional[type]) -> None:
    """Declare a stage; ``section`` (a dataclass or None) parses the top-level key named ``stage``."""
    if section is not None and not dataclasses.is_dataclass(section):
        raise TypeError(f"section for stage {stage!r} must be a dataclass, got {section!r}")
    STAGES[stage] = section


# ----------------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple):
        return str(tp).replace("typing.", "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the typed value or raises ConfigError."""
    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}={value!r}: expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            if value is None:
                fail()
            return _coerce(value, args[0], key, source)
        fail()
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            fail()
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail()
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "2e-4" (no dot) as a string; accept numeric text for float fields.
            try:
                return float(value)
            except ValueError:
                fail()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "stage_config"}
    kwargs = {}
    for k, v in values.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"{source}: unknown key {dotted!r} (known keys here: {', '.join(sorted(fields))})")
        kwargs[k] = _coerce(v, hints[k], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: bad override key {dotted!r}: expected section.key=value")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.max_steps=20", ...]`` -> ``[("train.max_steps", 20), ...]`` (values parsed as YAML)."""
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"command line: override {ov!r}: expected key=value (e.g. train.max_steps=20)")
        key, text = ov.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def config_from_dict(tree: dict, source: str = "<dict>", overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a RunConfig from a nested dict plus dotted overrides."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    tree = _deepcopy(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, "command line")
    stage = tree.get("stage", "sft")
    if isinstance(stage, str) and stage not in STAGES and stage in STAGE_MODULES:
        stage_module(stage)
    if stage not in STAGES:
        raise ConfigError(f"{source}: stage={stage!r}: expected one of {sorted(STAGES)}")
    stage_values = None
    section_cls = STAGES[stage]
    for name, cls in STAGES.items():
        if cls is not None and name in tree:
            if name != stage:
                raise ConfigError(f"{source}: section {name!r} given but stage is {stage!r}")
            stage_values = tree.pop(name)
    cfg = _build(RunConfig, tree, "", source)
    if section_cls is not None:
        cfg.stage_config = _coerce(stage_values or {}, section_cls, stage, source)
    return cfg


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply dotted overrides.

    Relative ``output_dir``, ``model.checkpoint``, ``data.dataset_dir`` and ``data.work_dir``
    are kept as written (they resolve against the current directory, the repository root
    for the shipped configs).

    Raises:
        ConfigError: missing/unreadable file, YAML syntax error (with line), unknown key,
            wrong type, or invalid value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    return config_from_dict(tree, str(path), overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (stage section under its stage name)."""
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name != "stage_config"}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    out = plain(cfg)
    if cfg.stage_config is not None:
        out[cfg.stage] = plain(cfg.stage_config)
    return out


def dump_config(cfg: RunConfig) -> str:
    """YAML text of the resolved config; :func:`load_config` reads it back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- DeepSpeed
def resolve_precision(section: DeepSpeedSection, device_type: str) -> str:
    """"bf16" or "fp32" for the run: "auto" means bf16 on CUDA and fp32 elsewhere."""
    if section.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return section.precision


def build_deepspeed_config(cfg: RunConfig, world_size: int, device_type: str) -> dict:
    """The DeepSpeed config dict for this run — the only place it is built.

    Args:
        cfg: the run config.
        world_size: number of data-parallel ranks.
        device_type: "cuda" or "cpu" (decides "auto" precision).
    Returns:
        a dict for ``deepspeed.initialize(config=...)``: batch sizes, ZeRO stage and
        offload, precision, clipping and AdamW
        (the schedule itself is :func:`lr_lambda`, handed to DeepSpeed as a client
        ``LambdaLR`` so that the first step already trains at ``lr / warmup_steps``;
        DeepSpeed's ``WarmupCosineLR`` spends step 1 at lr 0).
    Raises:
        ConfigError: impossible batch arithmetic for ``world_size``.
    """
    t, d = cfg.train, cfg.deepspeed
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
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
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
                       **({} if d.offload_optimizer or _offloads_states(cfg) else {"torch_adam": True})},
        },
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if d.zero_stage == 0 and precision == "bf16":
        # bf16 without ZeRO: keep fp32 master weights/grad accumulation.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def _offloads_states(cfg: RunConfig) -> bool:
    """True when the stage moves optimizer states off the device between phases (RL rollouts)."""
    return bool(getattr(cfg.stage_config, "offload_optimizer_states", False))


def lr_lambda(train: TrainConfig) -> typing.Callable[[int], float]:
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
