"""Typed run configuration: the dataclass schema of a run, loaded from YAML with dotted overrides.

A run config is one YAML file with the sections of :class:`RunConfig`::

    stage: sft                  # which trainer runs: sft or rl
    output_dir: runs/demo_sft
    seed: 0
    model: {...}                # ModelConfig
    data: {...}                 # DataConfig
    train: {...}                # TrainConfig
    deepspeed: {...}            # DeepSpeedSection
    logging: {...}              # LoggingConfig
    sft: {...}                  # SFTConfig (optional, stage sft only)
    rl: {...}                   # RLConfig (stage rl; defaults when omitted)

Command-line overrides are ``section.key=value`` (``train.max_steps=20``,
``output_dir=/tmp/run``); the value is parsed as YAML and then type-checked exactly like
the file (:mod:`pgen_engine.typed_config`). Every problem raises :class:`ConfigError` with
one line naming the file and the dotted key, and what was expected.

Batch arithmetic: ``train.global_batch_size`` is fixed by the config, so one config gives
the same optimisation on any number of ranks. ``train.micro_batch_size`` is either given
(then ``global / (micro * world_size)`` must be a positive integer: the gradient
accumulation) or omitted, in which case :meth:`TrainConfig.micro_batch_for` derives it
from the global batch, the world size and the memory hint ``train.max_micro_batch_size``.
The DeepSpeed JSON and the LR schedule are built by :mod:`pgen_engine.training.engine`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pgen_engine.data.history_mode import trained_history_mode
from pgen_engine.data.splits import DEFAULT_MIN_INTERACTIONS, SPLIT_MIN_INTERACTIONS
from pgen_engine.models.special_tokens import SpecialTokens
from pgen_engine.stage_config import RLConfig, RLConfigError, SFTConfig
from pgen_engine.typed_config import (ConfigError, build, check_finite, check_seed, deepcopy, load_yaml,
                                      parse_overrides, set_dotted)

__all__ = ["ConfigError", "RLConfigError", "ModelInitConfig", "ModelConfig", "SynthSection", "DataConfig",
           "TrainConfig", "DeepSpeedSection", "LoggingConfig", "SFTConfig", "RLConfig", "RunConfig", "STAGES",
           "PARAMETER_GROUPS", "DEFAULT_TRAINABLE", "config_from_dict", "load_config", "config_to_dict",
           "dump_config", "parse_overrides"]


# ----------------------------------------------------------------------------- sections
CODE_INITS = ("random", "tokenizer")  # the values of model.init.code_init
_INIT_DRAW_FIELDS = ("seed", "init_std", "code_init")  # model.init fields that are not geometry


@dataclasses.dataclass
class ModelInitConfig:
    """Geometry of a freshly initialised tiny Janus (used when ``model.checkpoint`` is null).

    ``init_std`` re-draws every weight matrix from N(0, init_std) (null keeps transformers'
    0.02). Tiny models learn to use their history much faster with a wider init and a
    wider VQ embedding (``vq_embed_dim``): with 0.02 and 8 dims, the code embeddings of a
    prompt are nearly identical and attention gets almost no gradient.

    ``code_init: tokenizer`` starts the image-code embedding and the image head's output
    rows from what each code looks like (the whitened principal components of the
    tokenizer's decoded codes, see ``training.init.code_init_weights``) instead of noise,
    the role pretrained code embeddings play in a released Janus. Measured on the
    synthetic demo (1,500 SFT steps, history as codes): final loss 0.66-0.81 over training seeds
    0-2 and init seeds 0-2, validation attr_acc_future 0.60-0.66; with ``random`` code rows the run stays
    on the "ignore the history" plateau (loss 1.13; ~1.2 is the catalogue's entropy per code).

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
    code_init: str = "random"
    seed: int = 0

    def geometry(self) -> dict[str, int]:
        """The architecture fields (``tiny_janus_config`` keywords): all but how weights are drawn."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _INIT_DRAW_FIELDS}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in _INIT_DRAW_FIELDS and getattr(self, f.name) < 1:
                raise ConfigError(f"model.init.{f.name}={getattr(self, f.name)}: expected a positive integer")
        if self.vocab_size < SpecialTokens.BUILTIN_VOCAB_MIN:  # else refused only after data preparation
            raise ConfigError(f"model.init.vocab_size={self.vocab_size}: expected >= {SpecialTokens.BUILTIN_VOCAB_MIN}")
        if self.init_std is not None and not 0 < self.init_std < 1:
            raise ConfigError(f"model.init.init_std={self.init_std}: expected a float in (0, 1) or null")
        if self.code_init not in CODE_INITS:
            raise ConfigError(f"model.init.code_init={self.code_init!r}: expected one of {CODE_INITS}")
        check_seed("model.init.seed", self.seed)  # else torch's "Overflow when unpacking long long" after data prep
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
        check_seed("data.synth.seed", self.seed)


@dataclasses.dataclass
class DataConfig:
    """Dataset, image tokenizer, splits and prompts.

    Attributes:
        dataset_dir: native-layout dataset folder (relative paths resolve against the
            config file's directory's parent, i.e. the repository root for configs/).
        synth: if set, the synthetic dataset is generated into ``dataset_dir`` when missing.
        work_dir: where the fitted tokenizer and the token cache live (reused across runs).
        tokenizer: "patch_kmeans" (fit on the dataset's images when missing), "vq" (a small
            Janus VQ-VAE trained on the train split's item images when missing, saved under
            ``work_dir`` and installed as the init model's ``vqmodel.*``) or "checkpoint_vq"
            (the model checkpoint's own VQ).
        tokenizer_image_size, patch_size, codebook_size: the code geometry of "patch_kmeans"
            and "vq": ``(tokenizer_image_size / patch_size)^2`` codes per image from
            ``codebook_size`` entries (for "vq", ``patch_size`` is the pixels per code side).
        kmeans_iters: PatchKMeans Lloyd iterations.
        vq_time_budget_s, vq_max_steps: "vq" training stops at whichever comes first.
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
    tokenizer: Literal["patch_kmeans", "vq", "checkpoint_vq"] = "patch_kmeans"
    tokenizer_image_size: int = 32
    patch_size: int = 8
    codebook_size: int = 64
    kmeans_iters: int = 20
    vq_time_budget_s: float = 780.0
    vq_max_steps: int = 100_000
    history_k: int = 4
    stride: int = 1
    max_windows_per_user: Optional[int] = None
    min_interactions: int = DEFAULT_MIN_INTERACTIONS
    history_mode: Optional[Literal["pixels", "codes"]] = None
    with_titles: bool = False
    instruction: str = "Generate the next item this user will like."
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer_image_size % self.patch_size or self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"data.patch_size={self.patch_size}: expected a power of two dividing "
                              f"data.tokenizer_image_size={self.tokenizer_image_size}")
        if not self.vq_time_budget_s > 0:  # NaN too: no elapsed time would ever exceed it
            raise ConfigError(f"data.vq_time_budget_s={self.vq_time_budget_s}: expected > 0")
        for name in ("codebook_size", "history_k", "stride", "kmeans_iters", "vq_max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)}: expected >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: expected >= 0")
        if self.min_interactions < SPLIT_MIN_INTERACTIONS:  # build_splits' rule, which runs after data prep
            raise ConfigError(f"data.min_interactions={self.min_interactions}: expected >= {SPLIT_MIN_INTERACTIONS} "
                              "(train + valid + test)")
        if self.max_windows_per_user is not None and self.max_windows_per_user < 1:
            raise ConfigError(f"data.max_windows_per_user={self.max_windows_per_user}: expected >= 1 or null")


DEFAULT_TRAINABLE = ("language_model", "aligner", "generation_aligner", "generation_embeddings", "generation_head")
PARAMETER_GROUPS = ("language_model", "lm_head", "aligner", "generation_aligner", "generation_embeddings",
                    "generation_head", "vision_model", "vqmodel")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing.

    Attributes:
        micro_batch_size: examples per rank per forward; null (or omitted) = derived per
            world size by :meth:`micro_batch_for`.
        global_batch_size: examples per optimizer step over all ranks (fixed across world sizes).
        max_micro_batch_size: memory hint for a derived micro-batch: the most examples one
            rank's forward may hold (ignored when ``micro_batch_size`` is set).
        max_steps: stage steps: optimizer steps in SFT, RL steps in RL (each several optimizer
            steps, see :class:`RLConfig`); ``save_every`` / ``log_every`` count the same steps.
        lr, min_lr_ratio, warmup_steps: linear warmup to ``lr`` then cosine to ``lr*min_lr_ratio``.
        weight_decay, betas, eps: AdamW.
        grad_clip: global gradient-norm clip (0 = off).
        cond_dropout_p: probability a training prompt is replaced by its unconditional
            counterpart (keeps CFG meaningful).
        trainable: parameter groups (name prefixes) that are trained; the rest are frozen.
        save_every: checkpoint every N steps (0 = only at the end).
        keep_checkpoints: how many resumable checkpoints to keep (older ones are deleted).
        log_every: metrics every N steps.
    """

    micro_batch_size: Optional[int] = None
    global_batch_size: int = 8
    max_micro_batch_size: int = 32
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
        for key in ("global_batch_size", "micro_batch_size", "max_micro_batch_size"):  # each named alone
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: expected >= 1")
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
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
        for key in ("grad_clip", "weight_decay", "eps"):
            check_finite(f"train.{key}", getattr(self, key), positive=key == "eps")
        if not 0.0 <= self.cond_dropout_p < 1.0:
            raise ConfigError(f"train.cond_dropout_p={self.cond_dropout_p}: expected a probability in [0, 1)")
        bad = [g for g in self.trainable if g not in PARAMETER_GROUPS]
        if bad or not self.trainable:
            raise ConfigError(f"train.trainable={self.trainable}: expected a non-empty subset of {list(PARAMETER_GROUPS)}")
        for key, low in (("save_every", 0), ("keep_checkpoints", 1), ("log_every", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"train.{key}={getattr(self, key)}: expected >= {low}")

    def micro_batch_for(self, world_size: int) -> int:
        """Examples per rank per forward for ``world_size`` ranks.

        The configured ``micro_batch_size`` when set; otherwise the largest divisor of
        ``global_batch_size / world_size`` that is at most ``max_micro_batch_size`` (fewest
        accumulation steps within the memory hint).

        Raises ConfigError when the global batch cannot be split over ``world_size`` ranks.
        """
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        if world_size < 1 or self.global_batch_size % world_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"world_size={world_size}")
        per_rank = self.global_batch_size // world_size
        return max(d for d in range(1, min(per_rank, self.max_micro_batch_size) + 1) if per_rank % d == 0)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank for ``world_size`` ranks.

        Raises ConfigError when ``global_batch_size`` is not divisible by
        ``micro_batch_size * world_size`` (or by ``world_size`` when the micro-batch is derived).
        """
        micro = self.micro_batch_for(world_size)
        per_step = micro * world_size
        if world_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"train.micro_batch_size={micro} x world_size={world_size}")
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
        for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "reduce_bucket_size"):
            if getattr(self, key) < 0:  # DeepSpeed fails on them only when the engine starts
                raise ConfigError(f"deepspeed.{key}={getattr(self, key)}: expected >= 0")


@dataclasses.dataclass
class LoggingConfig:
    """Observability: progress bar (rank 0), TensorBoard (needs the ``tensorboard`` package)."""

    progress: bool = True
    tensorboard: bool = False


# The stages and the top-level section each one reads (a plain table: no registration).
STAGES: dict[str, str] = {"sft": "sft", "rl": "rl"}


@dataclasses.dataclass
class RunConfig:
    """A whole run: the shared sections plus the section of its stage (``sft`` or ``rl``).

    Exactly the running stage's section may be set; for stage ``rl`` an omitted ``rl:``
    section means the :class:`RLConfig` defaults.
    """

    stage: Literal["sft", "rl"] = "sft"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    sft: Optional[SFTConfig] = None
    rl: Optional[RLConfig] = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: expected one of {sorted(STAGES)}")
        for name in STAGES.values():
            if getattr(self, name) is not None and name != STAGES[self.stage]:
                raise ConfigError(f"section {name!r} given but stage is {self.stage!r}")
        for key, value in (("output_dir", self.output_dir), ("data.dataset_dir", self.data.dataset_dir),
                           ("data.work_dir", self.data.work_dir), ("model.checkpoint", self.model.checkpoint)):
            if value is not None and not str(value).strip():  # Path("") is the current directory
                raise ConfigError(f"{key}={value!r}: expected a folder path (an empty one would mean the current "
                                  "directory)")
        check_seed("seed", self.seed)
        if self.stage == "rl" and self.rl is None:
            self.rl = RLConfig()
        if self.data.history_mode is None:
            self.data.history_mode = _default_history_mode(self.model.checkpoint)


def _default_history_mode(checkpoint: Optional[str]) -> Optional[str]:
    """``data.history_mode: null`` -> the checkpoint's trained / architecture default; None
    while the checkpoint folder does not exist yet (resolved again at data preparation)."""
    if checkpoint is None:
        return "pixels"  # the tiny init model has a vision tower
    if not (Path(checkpoint) / "config.json").is_file():
        return None
    try:
        return trained_history_mode(checkpoint)[0]
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.history_mode: cannot resolve the default from model.checkpoint={checkpoint} "
                          f"({e})") from None


# ----------------------------------------------------------------------------- loading
def config_from_dict(tree: dict, source: str = "<dict>", overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a RunConfig from a nested dict plus dotted overrides."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    tree = deepcopy(tree)
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value, "command line")
    stage = tree.get("stage", "sft")
    if stage not in STAGES:
        raise ConfigError(f"{source}: stage={stage!r}: expected one of {sorted(STAGES)}")
    return build(RunConfig, tree, "", source)


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
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML run config file (e.g. configs/demo_sft.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a YAML run config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    return config_from_dict(tree, str(path), overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (unset stage sections left out)."""
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)
                    if not (f.name in STAGES.values() and getattr(x, f.name) is None)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def config_defaults(cfg: RunConfig) -> dict[str, Any]:
    """Flattened ``"section.key" -> default value`` of every field in ``cfg``'s dataclass tree
    (the defaults the dataclasses declare, before a config file or override sets them)."""
    out: dict[str, Any] = {}

    def walk(x: Any, prefix: str) -> None:
        for f in dataclasses.fields(x):
            key = f"{prefix}.{f.name}" if prefix else f.name
            value = getattr(x, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key)
            elif f.default is not dataclasses.MISSING:
                out[key] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[key] = f.default_factory()  # type: ignore[misc]

    walk(cfg, "")
    return out


def dump_config(cfg: RunConfig) -> str:
    """YAML text of the resolved config; :func:`load_config` reads it back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
