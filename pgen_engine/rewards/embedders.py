"""Image embedders shared by the rewards and the evaluation metrics.

Every embedder maps uint8 RGB images ``[N, H, W, 3]`` to L2-normalised float32 vectors
``[N, D]``, so a dot product between two embeddings is their cosine similarity. Rewards
(``pgen_engine.rewards.rewards``) and eval metrics (``pgen_engine.eval.metrics``) both work
on these vectors, which keeps "how good is this image for this user" identical between the
RL reward and the reported numbers.

Two families:

* :class:`VisionTowerEmbedder` wraps a ``transformers`` vision encoder (the Janus
  understanding encoder, CLIP or SigLIP). :meth:`VisionTowerEmbedder.from_pretrained_local`
  loads only the vision weights of a local checkpoint, strictly.
* :class:`PixelStatsEmbedder` needs no weights: per-cell mean colours plus a joint colour
  histogram. On procedural / poster images (the synthetic dataset, the CPU demo) colour
  layout is what distinguishes items, so this is a meaningful similarity there.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

__all__ = [
    "ImageEmbedder",
    "PixelStatsEmbedder",
    "VisionTowerEmbedder",
    "make_embedder",
    "as_image_batch",
    "load_vision_tower",
]

# OpenAI CLIP preprocessing constants, used when a CLIP checkpoint ships no preprocessor_config.json.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_image_batch(images: Any, *, name: str = "images") -> torch.Tensor:
    """Validate and convert an image batch to a uint8 torch tensor ``[N, H, W, 3]``.

    Accepts a torch tensor or a numpy array. Raises ``ValueError``/``TypeError`` naming
    ``name`` and what was expected otherwise.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a uint8 tensor or numpy array [N,H,W,3], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype uint8 [N,H,W,3], got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [N,H,W,3], got {tuple(images.shape)}")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{name}: images have an empty spatial size {tuple(images.shape)}")
    return images


class ImageEmbedder(ABC):
    """Maps uint8 images ``[N, H, W, 3]`` to L2-normalised float32 embeddings ``[N, D]``.

    Subclasses implement :meth:`_embed_batch` on one batch already on :attr:`device`;
    :meth:`embed` validates, batches, disables autograd and normalises.
    """

    batch_size: int = 64

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding width D."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device the embedding runs on (and the device of the returned tensor)."""

    @abstractmethod
    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, H, W, 3]`` on :attr:`device` -> unnormalised float ``[n, D]``."""

    def embed(self, images: Any) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            images: uint8 ``[N, H, W, 3]`` (torch tensor on any device, or numpy array).
        Returns:
            float32 ``[N, D]`` on :attr:`device`, each row of unit L2 norm. ``N == 0`` gives ``[0, D]``.
        """
        images = as_image_batch(images)
        n = images.shape[0]
        if n == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        outs = []
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                chunk = images[start : start + self.batch_size].to(self.device, non_blocking=True)
                out = self._embed_batch(chunk).float()
                outs.append(F.normalize(out, dim=-1, eps=1e-12))
        emb = torch.cat(outs, dim=0)
        if emb.shape != (n, self.dim):
            raise RuntimeError(f"{type(self).__name__} produced shape {tuple(emb.shape)}, expected {(n, self.dim)}")
        return emb

    __call__ = embed


class PixelStatsEmbedder(ImageEmbedder):
    """Hand-made deterministic embedding: colour layout + colour histogram.

    Features (D = 3·grid² + bins³):
      * mean RGB of each cell of a ``grid x grid`` partition, centred at 0 (so a cell's
        colour difference shows up as an angle, not only as a length);
      * the joint RGB histogram with ``bins`` levels per channel, as fractions of pixels.
    Each block is L2-normalised before concatenation so both weigh equally.
    """

    def __init__(self, grid: int = 4, bins: int = 8, *, batch_size: int = 256, device: str | torch.device = "cpu"):
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"PixelStatsEmbedder: grid must be an int >= 1, got {grid!r}")
        if not isinstance(bins, int) or not 1 <= bins <= 32:
            raise ValueError(f"PixelStatsEmbedder: bins must be an int in [1, 32], got {bins!r}")
        self.grid = grid
        self.bins = bins
        self.batch_size = batch_size
        self._device = torch.device(device)

    @property
    def dim(self) -> int:
        return 3 * self.grid * self.grid + self.bins**3

    @property
    def device(self) -> torch.device:
        return self._device

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = images.shape
        if h < self.grid or w < self.grid:
            raise ValueError(f"PixelStatsEmbedder: images {h}x{w} are smaller than grid={self.grid}")
        x = images.permute(0, 3, 1, 2).float() / 255.0
        cells = F.adaptive_avg_pool2d(x, self.grid).reshape(n, -1) - 0.5
        # Integer quantisation (not float division) so the same pixel always lands in the same bin.
        q = (images.long() * self.bins) // 256
        code = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
        nb = self.bins**3
        offsets = torch.arange(n, device=images.device).view(n, 1, 1) * nb
        hist = torch.bincount((code + offsets).reshape(-1), minlength=n * nb).view(n, nb).float() / (h * w)
        return torch.cat([F.normalize(cells, dim=-1), F.normalize(hist, dim=-1)], dim=-1) / math.sqrt(2.0)


def _channel_triplet(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        vals = (float(value),) * 3
    else:
        vals = tuple(float(v) for v in value)
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"VisionTowerEmbedder: {name} must be a finite number or 3 finite numbers, got {value!r}")
    return vals  # type: ignore[return-value]


class VisionTowerEmbedder(ImageEmbedder):
    """Embed images with a ``transformers`` vision encoder.

    Images are resized (bilinear, antialiased, no crop: posters keep their whole content)
    to ``image_size`` x ``image_size``, scaled to [0, 1], normalised by ``mean``/``std``
    and encoded. Pooling (``pool``):
      * ``"auto"``: ``image_embeds`` when the model returns them (CLIP with projection);
        the mean of ``last_hidden_state`` for Janus (its ``pooler_output`` is just the first
        patch token, there is no CLS); otherwise ``pooler_output`` when present, else mean;
      * ``"mean"`` / ``"pooler"`` / ``"image_embeds"``: force one.
    """

    POOLS = ("auto", "mean", "pooler", "image_embeds")

    def __init__(
        self,
        vision_model: torch.nn.Module,
        image_size: int,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        *,
        pool: str = "auto",
        batch_size: int = 64,
    ):
        if not isinstance(vision_model, torch.nn.Module):
            raise TypeError(f"VisionTowerEmbedder: vision_model must be a torch.nn.Module, got {type(vision_model).__name__}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"VisionTowerEmbedder: image_size must be a positive int, got {image_size!r}")
        if pool not in self.POOLS:
            raise ValueError(f"VisionTowerEmbedder: pool must be one of {self.POOLS}, got {pool!r}")
        std3 = _channel_triplet(std, "std")
        if any(s <= 0 for s in std3):
            raise ValueError(f"VisionTowerEmbedder: std must be > 0, got {std!r}")
        self.model = vision_model.eval()
        self.image_size = image_size
        self.pool = pool
        self.batch_size = batch_size
        self._mean = torch.tensor(_channel_triplet(mean, "mean")).view(1, 3, 1, 1)
        self._std = torch.tensor(std3).view(1, 3, 1, 1)
        self._dim: int | None = None

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def dim(self) -> int:
        if self._dim is None:
            # One dummy forward is the only model-independent way to learn the pooled width.
            probe = torch.zeros(1, self.image_size, self.image_size, 3, dtype=torch.uint8, device=self.device)
            with torch.no_grad():
                self._dim = int(self._embed_batch(probe).shape[-1])
        return self._dim

    def to(self, device: str | torch.device) -> "VisionTowerEmbedder":
        """Move the wrapped model; returns self."""
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, H, W, 3]`` -> normalised pixel values ``[n, 3, S, S]`` in the model dtype."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.dtype)

    def _pooled(self, out: Any) -> torch.Tensor:
        def get(key: str) -> torch.Tensor | None:
            return getattr(out, key, None)

        pool = self.pool
        if pool == "auto":
            model_type = getattr(getattr(self.model, "config", None), "model_type", "")
            if get("image_embeds") is not None:
                pool = "image_embeds"
            elif "janus" in str(model_type):
                pool = "mean"
            elif get("pooler_output") is not None:
                pool = "pooler"
            else:
                pool = "mean"
        key = {"mean": "last_hidden_state", "pooler": "pooler_output", "image_embeds": "image_embeds"}[pool]
        value = get(key)
        if value is None:
            raise ValueError(f"VisionTowerEmbedder: pool={pool!r} needs model output {key!r}, which {type(self.model).__name__} did not return")
        if pool == "mean":
            if value.ndim != 3:
                raise ValueError(f"VisionTowerEmbedder: last_hidden_state should be [n, tokens, D], got {tuple(value.shape)}")
            value = value.mean(dim=1)
        return value

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(images))
        return self._pooled(out)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained_local(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        pool: str = "auto",
        batch_size: int = 64,
    ) -> "VisionTowerEmbedder":
        """Load the vision tower of a local CLIP, SigLIP or Janus checkpoint (safetensors).

        Only the vision weights are read (a Janus-Pro-7B checkpoint does not load its LM),
        and they load strictly: a missing or mis-shaped vision weight is an error.
        Normalisation constants come from ``preprocessor_config.json`` when present.

        Args:
            path: a directory written by ``save_pretrained`` (``config.json`` + safetensors).
        Raises:
            FileNotFoundError: the directory, its config.json or its safetensors are missing.
            ValueError: the config's ``model_type`` is not CLIP, SigLIP or Janus.
        """
        model, image_size, mean, std = load_vision_tower(path, dtype=dtype)
        model.to(device)
        return cls(model, image_size, mean, std, pool=pool, batch_size=batch_size)


def _safetensors_keys(path: Path) -> dict[str, str]:
    """Map every tensor name in a local safetensors checkpoint to the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (need a 'weight_map' object): {e}") from e
        return {str(k): str(v) for k, v in weight_map.items()}
    if (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: "model.safetensors" for k in f.keys()}
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)")


def _load_prefixed(path: Path, model: torch.nn.Module, prefixes: Sequence[str]) -> None:
    """Strictly load ``model`` from the checkpoint tensors named ``prefix + key``.

    The first prefix under which every learned key of ``model`` exists is used: the same
    vision tower is stored under different names by a full CLIP/SigLIP/Janus model, a
    standalone vision model, and older/newer ``transformers`` versions.
    """
    files = _safetensors_keys(path)
    expected = model.state_dict()
    # position_ids buffers are derived, not learned; checkpoints may omit them.
    derived = {k for k in expected if k.endswith("position_ids")}
    learned = [k for k in expected if k not in derived]
    chosen = next((p for p in prefixes if all(p + k in files for k in learned)), None)
    if chosen is None:
        best = max(prefixes, key=lambda p: sum(p + k in files for k in learned))
        missing = [best + k for k in learned if best + k not in files]
        raise ValueError(
            f"{path}: vision weights for {type(model).__name__} are incomplete: {len(missing)} of {len(learned)} "
            f"missing (tried prefixes {list(prefixes)}), e.g. {missing[:4]}"
        )
    wanted = [k for k in expected if chosen + k in files]
    by_file: dict[str, list[str]] = {}
    for k in wanted:
        by_file.setdefault(files[chosen + k], []).append(k)
    state: dict[str, torch.Tensor] = {}
    for fname, keys in by_file.items():
        with safe_open(str(path / fname), framework="pt") as f:
            for k in keys:
                state[k] = f.get_tensor(chosen + k)
    for k in derived:
        state.setdefault(k, expected[k])
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: weight {chosen + k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)


def load_vision_tower(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, int, tuple, tuple]:
    """Build and strictly load the vision tower stored in a local checkpoint directory.

    Returns ``(model, image_size, mean, std)``. See :meth:`VisionTowerEmbedder.from_pretrained_local`.
    """
    import transformers  # late import: transformers takes seconds to import and `pgen` imports this module at start-up

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"vision checkpoint directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers save_pretrained directory)")
    cfg = transformers.AutoConfig.from_pretrained(str(path))
    model_type = getattr(cfg, "model_type", None)
    archs = list(getattr(cfg, "architectures", None) or [])

    # Candidate checkpoint prefixes per family, see _load_prefixed.
    if model_type == "clip":
        vcfg = transformers.CLIPVisionConfig(**{**cfg.vision_config.to_dict(), "projection_dim": cfg.projection_dim})
        model = transformers.CLIPVisionModelWithProjection(vcfg)
        prefixes: tuple[str, ...] = ("",)
        default_mean, default_std = _CLIP_MEAN, _CLIP_STD
    elif model_type == "clip_vision_model":
        vcfg = cfg
        with_proj = "CLIPVisionModelWithProjection" in archs
        model = (transformers.CLIPVisionModelWithProjection if with_proj else transformers.CLIPVisionModel)(vcfg)
        prefixes = ("", "vision_model.")
        default_mean, default_std = _CLIP_MEAN, _CLIP_STD
    elif model_type in ("siglip", "siglip_vision_model"):
        vcfg = cfg.vision_config if model_type == "siglip" else cfg
        model = transformers.SiglipVisionModel(vcfg)
        prefixes = ("vision_model.", "")
        default_mean, default_std = (0.5,) * 3, (0.5,) * 3
    elif model_type in ("janus", "janus_vision_model"):
        vcfg = cfg.vision_config if model_type == "janus" else cfg
        model = transformers.JanusVisionModel(vcfg)
        prefixes = ("model.vision_model.", "vision_model.", "")
        default_mean, default_std = (0.5,) * 3, (0.5,) * 3
    else:
        raise ValueError(
            f"{cfg_file}: model_type {model_type!r} is not a supported vision checkpoint "
            "(expected one of clip, clip_vision_model, siglip, siglip_vision_model, janus, janus_vision_model)"
        )
    _load_prefixed(path, model, prefixes)
    model.to(dtype).eval()

    mean, std = default_mean, default_std
    image_size = int(vcfg.image_size)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        try:
            pcfg = json.loads(pre.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{pre}: invalid JSON: {e}") from e
        mean = tuple(pcfg.get("image_mean", mean))
        std = tuple(pcfg.get("image_std", std))
    return model, image_size, mean, std


def _is_evaluator(path: str | Path) -> bool:
    # late import: import cycle (pgen_engine.eval.evaluator builds on this module's embedders)
    from pgen_engine.eval.evaluator import is_evaluator_artifact

    return is_evaluator_artifact(path)


#: the ``type`` values :func:`make_embedder` builds
EMBEDDER_TYPES = ("pixel_stats", "clip", "siglip", "janus", "pretrained", "model_vision", "cocons_cnn")


def make_embedder(
    spec: Mapping[str, Any],
    *,
    vision_model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
) -> ImageEmbedder:
    """Build an embedder from a config dict.

    Specs:
      * ``{"type": "pixel_stats", "grid": 4, "bins": 8}``
      * ``{"type": "clip" | "siglip" | "janus" | "pretrained", "path": DIR, "pool": "auto"}``
        (all load through :meth:`VisionTowerEmbedder.from_pretrained_local`, which dispatches
        on the checkpoint's own model_type)
      * ``{"type": "model_vision", "image_size": 384, "mean": 0.5, "std": 0.5, "pool": "mean"}``
        wraps ``vision_model`` (e.g. the policy's own understanding encoder).
      * ``{"type": "cocons_cnn", "path": DIR, <training fields>}`` loads the reward CNN trained on
        train-split co-consumption (:mod:`pgen_engine.rewards.cocons`; the RL stage trains it into
        DIR); training fields given in the spec must match the artifact's.
    Optional for every type: ``"batch_size"``. ``device`` defaults to CPU.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"embedder spec must be a dict, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.pop("type", None)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def take(allowed: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
        unknown = sorted(set(spec) - set(allowed) - set(required))
        if unknown:
            raise ValueError(f"embedder spec type={kind!r}: unknown field(s) {unknown}; allowed: {sorted(set(allowed) | set(required))}")
        for r in required:
            if r not in spec:
                raise ValueError(f"embedder spec type={kind!r}: missing required field {r!r}")
        bs = spec.get("batch_size", 1)  # else range(0, n, 0) fails at the first embed, mid-run
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"embedder spec type={kind!r}: batch_size must be an int >= 1, got {bs!r}")
        return {**allowed, **spec}

    # The evaluation embedder (pgen_engine.eval.evaluator) judges the policy; a reward that
    # used it would make the evaluation measure the optimised reward itself.
    if kind == "eval_cnn" or (isinstance(spec.get("path"), (str, Path)) and _is_evaluator(spec["path"])):
        raise ValueError(f"embedder spec {dict(spec, type=kind)}: this is the independent evaluation embedder; "
                         "rewards may not use it (pick pixel_stats or a pretrained encoder)")
    if kind == "pixel_stats":
        a = take({"grid": 4, "bins": 8, "batch_size": 256})
        return PixelStatsEmbedder(int(a["grid"]), int(a["bins"]), batch_size=int(a["batch_size"]), device=dev)
    if kind in ("clip", "siglip", "janus", "pretrained"):
        a = take({"pool": "auto", "batch_size": 64}, required=("path",))
        return VisionTowerEmbedder.from_pretrained_local(a["path"], device=dev, pool=a["pool"], batch_size=int(a["batch_size"]))
    if kind == "model_vision":
        a = take({"mean": 0.5, "std": 0.5, "pool": "auto", "batch_size": 64}, required=("image_size",))
        if vision_model is None:
            raise ValueError("embedder spec type='model_vision' needs the vision_model argument (the policy's vision encoder)")
        return VisionTowerEmbedder(vision_model, int(a["image_size"]), a["mean"], a["std"], pool=a["pool"], batch_size=int(a["batch_size"]))
    if kind == "cocons_cnn":
        # late import: pgen_engine.rewards.cocons builds on pgen_engine.eval.evaluator, which imports this module
        from .cocons import CoConsumptionEmbedder, reward_config_from_spec

        if "path" not in spec:
            raise ValueError("embedder spec type='cocons_cnn': missing required field 'path' (the RL stage fills it "
                             "in after training the reward embedder on the train split)")
        want = reward_config_from_spec(spec)  # validates the field names
        emb = CoConsumptionEmbedder.load(spec["path"])
        given = {k for k in spec if k != "path"}
        diff = {k: (getattr(emb.config, k), getattr(want, k)) for k in given if getattr(emb.config, k) != getattr(want, k)}
        if diff:
            raise ValueError(f"embedder spec {dict(spec, type=kind)}: the artifact in {spec['path']} was trained with "
                             f"other settings (field: (artifact, spec)) {diff}; retrain it (delete the folder) or fix the spec")
        emb.net.to(dev)
        return emb
    raise ValueError(f"embedder spec: unknown type {kind!r}; expected pixel_stats, clip, siglip, janus, pretrained, "
                     "model_vision or cocons_cnn")
