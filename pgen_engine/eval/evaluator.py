"""The independent evaluation embedder: a small CNN trained on the dataset's train split.

Why: a metric computed with the RL reward's own embedder measures the optimised reward,
not the user. The evaluator is trained here, on the **train split only**, with a signal
the generator never optimises:

* co-consumption: two items the same user consumed within ``window`` steps of each
  other (train sequences only; valid/test targets never enter) are positives;
* metadata: two items sharing a value of ``metadata_field`` (e.g. MovieLens ``genres``;
  several fields separated by commas, e.g. ``attr_shape,attr_color``) are positives, for a
  ``metadata_frac`` share of each batch;
* instance: an item and an augmented view of itself, for an ``instance_frac`` share of
  each batch. Why: where co-consumption is barely visible in pixels (real posters), the
  InfoNCE optimum without this term is a collapsed embedding (loss log B, every image at
  cosine ~1 to every other), and then every similarity metric reads ~1 for every system.
  The instance term makes the evaluator tell images apart; the other pairs bend that
  space towards what users consume together. ``sanity.mean_cosine`` reports the spread.
  Measured (300 steps): on 2,943 MovieLens posters, instance_frac 0 / 0.25 / 0.5 / 0.65
  gives mean cosine 0.98 / 0.63 / 0.33 / 0.23 and held-out recall@10 0.0055 / 0.0072 /
  0.0077 / 0.0069 (pixel statistics 0.0067, chance 0.0034); on the synthetic demo's 120
  items recall@10 is unchanged (0.31 / 0.32 / 0.31) while the mean cosine drops 0.76 -> 0.22;

with a symmetric InfoNCE loss over in-batch negatives (``tau``). Images are resized to
``image_size`` (64 px). What it measures: "would the same kind of user consume these two
items close in time", read from pixels only.

Sanity number (``sanity``): users are split 90/10 *before* training; for the held-out
users' co-consumed pairs (a, b) we rank b among the whole catalogue by cosine to a
(a itself excluded) and report recall@10, next to the same number for the
pixel-statistics embedding and for chance (10 / (C - 1), at most 1); ties rank pessimistically.

Artifact: ``DIR/evaluator.safetensors`` + ``DIR/evaluator.json`` (config, training-data
hash, sanity numbers). Rewards must not use it: :func:`is_evaluator_artifact` lets the
reward embedder factory refuse it, and reports mark a run whose reward embedder is the
evaluator as not independent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save as safetensors_bytes
from tqdm.auto import tqdm

from pgen_engine.errors import one_line
from pgen_engine.io_utils import atomic_write_bytes, atomic_write_json
from pgen_engine.rewards.embedders import ImageEmbedder, PixelStatsEmbedder

META_FILE = "evaluator.json"
WEIGHTS_FILE = "evaluator.safetensors"
KIND = "pgen_eval_embedder"


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
    """Training settings of the evaluation embedder (all part of the artifact's hash)."""

    image_size: int = 64
    dim: int = 64
    width: int = 32
    window: int = 3
    metadata_field: str = "genres"
    metadata_frac: float = 0.25
    instance_frac: float = 0.5
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    tau: float = 0.1
    holdout_users: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            # else numpy's bare "expected non-negative integer" when training starts
            raise ValueError(f"evaluator: seed must be an int in [0, 2**63 - 1], got {self.seed!r}")
        if not 16 <= self.image_size <= 256:
            raise ValueError(f"evaluator image_size must be in [16, 256], got {self.image_size}")
        if self.window < 1 or self.steps < 1 or self.batch_size < 2 or self.dim < 2 or self.width < 4:
            raise ValueError("evaluator: window, steps >= 1, batch_size >= 2, dim >= 2, width >= 4 required, got "
                             f"{self.window}, {self.steps}, {self.batch_size}, {self.dim}, {self.width}")
        if not 0 <= self.metadata_frac < 1 or not 0 < self.holdout_users < 1 or self.tau <= 0:
            raise ValueError(f"evaluator: metadata_frac in [0, 1), holdout_users in (0, 1), tau > 0 required, got "
                             f"{self.metadata_frac}, {self.holdout_users}, {self.tau}")
        if not 0 <= self.instance_frac < 1 or self.metadata_frac + self.instance_frac >= 1:
            raise ValueError(f"evaluator: instance_frac in [0, 1) and metadata_frac + instance_frac < 1 required "
                             f"(co-consumption pairs need a share), got {self.instance_frac}, {self.metadata_frac}")


class SmallCNN(nn.Module):
    """4 stride-2 conv blocks + global average pool + linear: ``[N,3,S,S] -> [N, dim]``."""

    def __init__(self, dim: int = 64, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N,H,W,3]`` -> float ``[N,3,size,size]`` in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class CNNArtifactEmbedder(ImageEmbedder):
    """A trained :class:`SmallCNN` saved as an artifact folder, used as an :class:`ImageEmbedder`.

    Subclasses name their artifact (``KIND``, ``META_FILE``, ``WEIGHTS_FILE``, ``LABEL``):
    the evaluator here and the reward embedder in :mod:`pgen_engine.rewards.cocons` share
    the loading, embedding and train-or-reuse logic but are distinct artifacts.

    Attributes:
        meta: the artifact's metadata JSON (kind, config, data_hash, sanity).
    """

    KIND: str = ""
    META_FILE: str = ""
    WEIGHTS_FILE: str = ""
    LABEL: str = ""

    def __init__(self, net: SmallCNN, config: EvaluatorConfig, meta: dict, *, batch_size: int = 256):
        self.net = net.eval()
        self.config = config
        self.meta = meta
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, H, W, 3]`` -> ``[n, dim]`` (unnormalised; :meth:`embed` normalises)."""
        return self.net(_to_input(images, self.config.image_size))

    @classmethod
    def _missing_hint(cls) -> str:
        return ""

    @classmethod
    def load(cls, directory: str | Path):
        """Load an artifact folder of this class's kind.

        Raises:
            FileNotFoundError: the metadata or weights file is missing.
            ValueError: the metadata is malformed or of another kind, or the weights file is
                truncated, not safetensors, or holds tensors of other shapes.
        """
        d = Path(directory)
        meta_path = d / cls.META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a{'n' if cls.LABEL[0] in 'aeiou' else ''} {cls.LABEL} "
                                    f"artifact (missing {cls.META_FILE}{cls._missing_hint()})")
        try:  # JSON / UTF-8 errors are ValueErrors; so are out-of-range config values (image_size 8)
            meta = json.loads(meta_path.read_text())
            cfg = EvaluatorConfig(**meta["config"])
            net = SmallCNN(cfg.dim, cfg.width)  # a float or str dim / width: TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: malformed {cls.LABEL} metadata ({one_line(e)})") from None
        if meta.get("kind") != cls.KIND:
            raise ValueError(f"{meta_path}: kind is {meta.get('kind')!r}, expected {cls.KIND!r}")
        if not (d / cls.WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{d / cls.WEIGHTS_FILE}: missing {cls.LABEL} weights")
        try:  # truncated / garbage file (SafetensorError), or weights of another shape (RuntimeError)
            net.load_state_dict(load_file(str(d / cls.WEIGHTS_FILE)))
        except (SafetensorError, RuntimeError, OSError) as e:
            raise ValueError(f"{d / cls.WEIGHTS_FILE}: unreadable {cls.LABEL} weights ({one_line(e)}); delete {d} "
                             "to train a new one") from None
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # a diverged or damaged artifact: every embedding would be NaN
            raise ValueError(f"{d / cls.WEIGHTS_FILE}: {cls.LABEL} weights hold NaN or inf ({bad[0]}); delete {d} "
                             "to train a new one")
        return cls(net, cfg, meta)

    @classmethod
    def train_or_reuse(cls, images: torch.Tensor, train_sequences: Sequence[Sequence[int]],
                       item_meta: Sequence[dict], out_dir: str | Path, cfg: EvaluatorConfig, *,
                       progress: bool = False):
        """Reuse ``out_dir``'s artifact when its data hash matches, else train and save it atomically.

        Args: as :func:`fit_cocons_cnn` (images uint8 ``[C, H, W, 3]``, train-split sequences
        of item indices, per-item metadata dicts).
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():  # mkdir would say only "[Errno 17] File exists"
            raise ValueError(f"{out}: exists and is not a folder (expected the {cls.LABEL} artifact folder)")
        # e.g. `pgen eval --evaluator data_work/reward_embedder`: an evaluator written next to the
        # reward embedder made the RL stage refuse that folder as "the evaluation embedder"
        # late import: an import cycle (cocons imports this module); importing it registers the reward
        # CNN subclass, which a process that never imported rewards (pgen eval) did not list below
        import pgen_engine.rewards.cocons  # noqa: F401
        other = [sub for sub in CNNArtifactEmbedder.__subclasses__()
                 if sub.META_FILE != cls.META_FILE and (out / sub.META_FILE).is_file()]
        if other:
            raise ValueError(f"{out}: holds a {other[0].LABEL} artifact ({other[0].META_FILE}); the {cls.LABEL} "
                             "needs a folder of its own")
        digest = data_hash(images, train_sequences, item_meta, cfg)
        if (out / cls.META_FILE).is_file():
            try:
                old = cls.load(out)
                if old.meta.get("data_hash") == digest:
                    return old
            except (ValueError, OSError, RuntimeError):
                pass  # stale or broken artifact: retrain below
        net, info = fit_cocons_cnn(images, train_sequences, item_meta, cfg, progress=progress, desc=cls.LABEL)
        meta = {"kind": cls.KIND, "config": dataclasses.asdict(cfg), "data_hash": digest, **info}
        out.mkdir(parents=True, exist_ok=True)
        # the metadata goes first, so an interruption before the new one is written leaves no artifact,
        # never the new weights under the old data hash (which a run on the old data would reuse)
        (out / cls.META_FILE).unlink(missing_ok=True)
        atomic_write_bytes(out / cls.WEIGHTS_FILE,
                           safetensors_bytes({k: v.contiguous() for k, v in net.state_dict().items()}))
        atomic_write_json(out / cls.META_FILE, meta)
        return cls(net, cfg, meta)


class EvalEmbedder(CNNArtifactEmbedder):
    """The trained evaluator as an :class:`ImageEmbedder` (eval mode, CPU by default)."""

    KIND, META_FILE, WEIGHTS_FILE, LABEL = KIND, META_FILE, WEIGHTS_FILE, "evaluator"

    def describe(self) -> dict:
        """The report's ``evaluator`` section."""
        return {"type": "eval_cnn", **{k: self.meta[k] for k in ("data_hash", "sanity", "config", "train_seconds")
                                       if k in self.meta}}


def is_evaluator_artifact(path: str | Path) -> bool:
    """True when ``path`` (a folder or a file in it) is an evaluation-embedder artifact."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    meta = d / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("kind") == KIND
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------- training data

def co_consumption_pairs(sequences: Sequence[Sequence[int]], window: int) -> np.ndarray:
    """``[P, 2]`` item-index pairs (a, b), b within ``window`` steps after a in one sequence, a != b."""
    out = []
    for seq in sequences:
        for i, a in enumerate(seq):
            for b in seq[i + 1:i + 1 + window]:
                if a != b:
                    out.append((a, b))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def metadata_fields(field: str) -> list[str]:
    """The item fields named by ``field``: one name, or several separated by commas."""
    return [f.strip() for f in field.split(",") if f.strip()]


def metadata_values(extra: dict, field: str) -> list[str]:
    """The string values of ``field`` (a string or list of strings per item) in one item's metadata.

    With several comma-separated fields, each value is prefixed by its field (``shape=cross``),
    so equal strings of different fields are different values.
    """
    names = metadata_fields(field)
    out: list[str] = []
    for name in names:
        v = extra.get(name)
        vals = [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
        out += [f"{name}={x}" for x in vals] if len(names) > 1 else vals
    return out


def metadata_groups(item_meta: Sequence[dict], field: str, allowed: set[int]) -> list[list[int]]:
    """Item indices grouped by each value of ``field`` (see :func:`metadata_values`), for allowed items."""
    groups: dict[str, list[int]] = {}
    for j, extra in enumerate(item_meta):
        if j not in allowed:
            continue
        for x in metadata_values(extra, field):
            groups.setdefault(x, []).append(j)
    return [g for g in groups.values() if len(g) >= 2]


def data_hash(images: torch.Tensor, train_sequences: Sequence[Sequence[int]], item_meta: Sequence[dict],
              config: EvaluatorConfig) -> str:
    """sha256 of everything the evaluator was trained from (images, train sequences, metadata, config)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(json.dumps([list(map(int, s)) for s in train_sequences]).encode())
    # one field hashes as before (artifacts trained earlier keep their hash); several hash all their values
    names = metadata_fields(config.metadata_field)
    meta = [e.get(config.metadata_field) if len(names) == 1 else [e.get(n) for n in names] for e in item_meta]
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def recall_at_k(embeds: torch.Tensor, pairs: np.ndarray, k: int = 10) -> float:
    """Share of pairs (a, b) whose b is among the k items nearest a (a excluded). ``embeds [C, D]``.

    Ties rank pessimistically (an item as close as b counts above it), as in the metrics: a
    collapsed embedding, every cosine equal, scores no better than it deserves, never 1.0."""
    if len(pairs) == 0:
        return float("nan")
    e = F.normalize(embeds.float(), dim=-1)
    a = torch.from_numpy(pairs[:, 0])
    b = torch.from_numpy(pairs[:, 1])
    sims = e[a] @ e.T
    sims[torch.arange(len(a)), a] = float("-inf")
    tb = sims[torch.arange(len(a)), b].unsqueeze(1)
    tie = sims == tb
    tie[torch.arange(len(a)), b] = False
    rank = (sims > tb).sum(1) + tie.sum(1)
    return float((rank < k).double().mean())


def mean_pairwise_cosine(embeds: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of ``embeds [C, D]``: ~1 means a collapsed embedding."""
    C = embeds.shape[0]
    if C < 2:
        return float("nan")
    e = F.normalize(embeds.float(), dim=-1)
    s = e.sum(0)
    return float(((s @ s) - C) / (C * (C - 1)))


# ---------------------------------------------------------------------------- training

def fit_cocons_cnn(images: torch.Tensor, train_sequences: Sequence[Sequence[int]], item_meta: Sequence[dict],
                   cfg: EvaluatorConfig, *, progress: bool = False, desc: str = "cnn") -> tuple[SmallCNN, dict]:
    """Fit a :class:`SmallCNN` contrastively on train-split co-consumption (+ metadata).

    Shared by the evaluator and by the reward-side co-consumption embedder
    (:mod:`pgen_engine.rewards.cocons`), which are distinct artifacts (own kind, own seed).
    Returns ``(net in eval mode, info)``; ``info`` holds the sanity numbers, the pair counts
    and the training time.
    """
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_users = len(train_sequences)
    held = set(rng.choice(n_users, size=max(1, int(round(cfg.holdout_users * n_users))), replace=False).tolist()) \
        if n_users > 1 else set()
    fit_seqs = [s for u, s in enumerate(train_sequences) if u not in held]
    held_seqs = [s for u, s in enumerate(train_sequences) if u in held]
    pairs = co_consumption_pairs(fit_seqs, cfg.window)
    if len(pairs) == 0:
        raise ValueError(f"{desc}: no co-consumption pairs in the train split of {len(fit_seqs)} user(s) (a pair is two "
                         f"different items within {cfg.window} steps in one user's train sequence; repeats of one item "
                         "do not count)")
    held_pairs = co_consumption_pairs(held_seqs, 1)
    train_items = {int(i) for s in fit_seqs for i in s}
    groups = metadata_groups(item_meta, cfg.metadata_field, train_items) if cfg.metadata_frac > 0 else []
    x_all = _to_input(images, cfg.image_size)  # [C,3,S,S]
    torch.manual_seed(cfg.seed)
    net = SmallCNN(cfg.dim, cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    B = cfg.batch_size
    n_meta = int(B * cfg.metadata_frac) if groups else 0
    n_inst = int(B * cfg.instance_frac)
    items = np.asarray(sorted(train_items), dtype=np.int64)
    net.train()
    it = range(cfg.steps)
    if progress:
        it = tqdm(it, desc=desc, unit="step")
    for _ in it:
        sel = pairs[rng.integers(0, len(pairs), size=B - n_meta - n_inst)]
        if n_meta:
            gs = [groups[g] for g in rng.integers(0, len(groups), size=n_meta)]
            meta_pairs = np.array([rng.choice(g, size=2, replace=False) for g in gs], dtype=np.int64)
            sel = np.concatenate([sel, meta_pairs])
        if n_inst:
            own = items[rng.integers(0, len(items), size=n_inst)]
            sel = np.concatenate([sel, np.stack([own, own], 1)])
        a, b = torch.from_numpy(sel[:, 0]), torch.from_numpy(sel[:, 1])
        xa, xb = x_all[a], x_all[b]
        # light augmentation (flip, small shift) so the net does not memorise exact pixels
        flip = torch.rand(len(a), generator=gen) < 0.5
        xa = torch.where(flip.view(-1, 1, 1, 1), xa.flip(-1), xa)
        shift = int(torch.randint(-2, 3, (1,), generator=gen))
        xb = torch.roll(xb, shifts=shift, dims=-1)
        z = F.normalize(net(torch.cat([xa, xb])), dim=-1)
        za, zb = z[:len(a)], z[len(a):]
        logits = za @ zb.T / cfg.tau
        # in-batch "negatives" that are the same item as the positive are not negatives
        same = (b.unsqueeze(0) == b.unsqueeze(1)) | (a.unsqueeze(1) == b.unsqueeze(0))
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        tgt = torch.arange(len(a))
        loss = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    cat = EvalEmbedder(net, cfg, {}).embed(images)  # eval-mode forward, batched, L2-normalised

    C = images.shape[0]
    sanity = {"heldout_users": len(held_seqs), "heldout_pairs": int(len(held_pairs)),
              "mean_cosine": mean_pairwise_cosine(cat),
              "recall@10": recall_at_k(cat, held_pairs, 10),
              "recall@10_pixel_stats": recall_at_k(PixelStatsEmbedder().embed(images), held_pairs, 10),
              "recall@10_chance": min(1.0, 10.0 / max(C - 1, 1)), "final_loss": float(loss.detach())}
    info = {"items": C, "train_users": len(fit_seqs), "train_pairs": int(len(pairs)), "metadata_groups": len(groups),
            "sanity": sanity, "train_seconds": round(time.time() - t0, 1)}
    return net, info


def train_evaluator(images: torch.Tensor, train_sequences: Sequence[Sequence[int]], item_meta: Sequence[dict],
                    out_dir: str | Path, config: EvaluatorConfig = EvaluatorConfig(), *,
                    progress: bool = False) -> EvalEmbedder:
    """Train (or reuse, when ``out_dir`` holds one with the same data hash) the evaluator.

    Args:
        images: uint8 ``[C, H, W, 3]`` catalogue images (item index = row).
        train_sequences: per user, item indices of the **train split** in time order.
        item_meta: per item, its extra metadata dict (``metadata_field`` read from it).
        out_dir: artifact folder.
    """
    return EvalEmbedder.train_or_reuse(images, train_sequences, item_meta, out_dir, config, progress=progress)
