"""A synthetic known-answer dataset: procedural item images with 4 discrete attributes.

Every item image shows one shape (circle, square, triangle, cross) in one of 6 colours,
filled solid, with stripes or with dots (stripes/dots are a light tint of the shape
colour), on one of 4 light backgrounds. Images are lossless PNGs, so
:func:`read_attributes` recovers all four attributes exactly from the pixels: a
generated image can be scored against what the user "wants" without any learned model.

Users have latent preferences: per attribute a preferred value that drifts.

* Version 2 (default): drift follows **population-level rules** a model can learn from
  other users. Each attribute has one fixed successor map ``succ`` (a random cycle over
  its values, the same for every user; :func:`drift_rules`). A user keeps a preferred
  value for ``dwell`` steps, then moves to ``succ[value]`` with probability
  ``rule_prob`` (else to a uniform other value); each attribute has its own random
  phase per user. On top, with probability ``drift`` per step and attribute the
  preference jumps at random (unpredictable noise). The future is then predictable from
  data but differs from the present.
* Version 1: random jumps only (probability ``drift`` per step and attribute).

At each step the user picks attribute values (the preferred one with probability
``fidelity``, else a uniform other value) and interacts with a catalogue item that
matches as many of them as possible. ``ground_truth.jsonl`` records, per user and step,
the preferred values in force, so "future interest" is known exactly. Only evaluation
reads it: RL rewards must not (they use what real data has).

Layout written (native dataset layout plus): ``attributes.json`` (item id -> attribute
name -> value name) and ``ground_truth.jsonl`` (one object per user per step:
``user_id, step, timestamp, item_id, preferred``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import write_dataset

ATTRIBUTES = ("shape", "color", "pattern", "background")
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "orange", "purple", "charcoal")
PATTERNS = ("solid", "stripes", "dots")
BACKGROUNDS = ("grey", "cream", "sky", "mint")
VALUES: dict[str, tuple[str, ...]] = dict(zip(ATTRIBUTES, (SHAPES, COLORS, PATTERNS, BACKGROUNDS)))

_COLOR_RGB = np.array([[215, 35, 35], [30, 150, 50], [35, 70, 215], [240, 130, 10], [135, 45, 175], [45, 45, 45]],
                      dtype=np.float32)
_BG_RGB = np.array([[236, 236, 236], [250, 238, 210], [212, 232, 250], [222, 246, 222]], dtype=np.float32)
_TINT = 0.55  # tint = colour * (1 - _TINT) + 255 * _TINT
_TINT_RGB = _COLOR_RGB * (1 - _TINT) + 255 * _TINT


def attribute_names() -> tuple[str, ...]:
    """The attribute order of :func:`read_attributes` columns."""
    return ATTRIBUTES


def attribute_values() -> dict[str, tuple[str, ...]]:
    """attribute -> its value names; a code ``v`` in column ``a`` means ``VALUES[a][v]``."""
    return dict(VALUES)


# ---------------------------------------------------------------------------- rendering

def _shape_mask(shape: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == 0:
        return dx * dx + dy * dy <= r * r
    if shape == 1:
        return (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
    if shape == 2:  # apex up: half-width grows linearly from top to bottom
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    if shape == 3:
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"shape index must be in [0, {len(SHAPES)}), got {shape}")


def render_item(attrs: tuple[int, int, int, int], size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one item: attribute indices (shape, color, pattern, background) -> uint8 ``[size, size, 3]``.

    ``rng`` adds a small position/size jitter (None -> centred, fixed size).
    """
    if not 32 <= size <= 256:
        raise ValueError(f"image size must be in [32, 256], got {size}")
    for a, v in zip(ATTRIBUTES, attrs):
        if not 0 <= v < len(VALUES[a]):
            raise ValueError(f"{a} index must be in [0, {len(VALUES[a])}), got {v}")
    s, c, p, b = attrs
    r = size * 0.33
    cx = cy = size / 2
    if rng is not None:
        r *= rng.uniform(0.9, 1.05)
        cx += rng.uniform(-1.5, 1.5) * size / 32
        cy += rng.uniform(-1.5, 1.5) * size / 32
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = _BG_RGB[b]
    mask = _shape_mask(s, size, cx, cy, r)
    yy, xx = np.mgrid[0:size, 0:size]
    unit = max(1, size // 16)  # pattern period scales with the image
    if p == 0:
        tint = np.zeros_like(mask)
    elif p == 1:
        tint = (yy // unit) % 2 == 1
    else:
        tint = ((yy // unit) % 3 == 1) & ((xx // unit) % 3 == 1)
    img[mask] = _COLOR_RGB[c]
    img[mask & tint] = _TINT_RGB[c]
    return img.round().astype(np.uint8)


# ---------------------------------------------------------------------------- read-out

def _read_one(im: np.ndarray) -> tuple[int, int, int, int]:
    x = im.astype(np.float32)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg_pix = np.median(border, axis=0)
    b = int(np.argmin(((_BG_RGB - bg_pix) ** 2).sum(1)))
    fg = np.abs(x - _BG_RGB[b]).max(-1) > 28
    if fg.sum() < 4:
        return (0, 0, 0, b)
    pix = x[fg]
    cand = np.concatenate([_COLOR_RGB, _TINT_RGB])  # [12, 3]: pure colours then tints
    near = ((pix[:, None, :] - cand[None]) ** 2).sum(-1).argmin(1)
    c = int(np.bincount(near % len(COLORS), minlength=len(COLORS)).argmax())
    tint_frac = float((near >= len(COLORS)).mean())
    p = 0 if tint_frac < 0.03 else (1 if tint_frac > 0.3 else 2)
    # Shape from the foreground mask's silhouette (pattern pixels are foreground too).
    rows = np.nonzero(fg.any(1))[0]
    cols = np.nonzero(fg.any(0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = fg[y0:y1, x0:x1]
    h, w = box.shape
    fill = box.mean()
    band = max(1, round(h * 0.2))
    top = box[:band].sum(1).mean() / w
    bot = box[-band:].sum(1).mean() / w
    if bot - top > 0.35:
        s = 2
    elif fill > 0.9:
        s = 1
    elif fill > 0.67:  # disc fills pi/4 of its box, the cross 5/9
        s = 0
    else:
        s = 3
    return (s, c, p, b)


def read_attributes(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Recover attributes from pixels: uint8 ``[N, H, W, 3]`` -> int64 ``[N, 4]``.

    Columns follow :data:`ATTRIBUTES`; values index :func:`attribute_values`. Exact on
    clean renders; tolerant of mild noise (background by border median, colour by
    majority vote, pattern by tint fraction, shape by silhouette statistics).
    """
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] < 8 or arr.shape[2] < 8:
        raise ValueError(f"images must be uint8 [N,H,W,3] with H,W >= 8, got {arr.dtype} {arr.shape}")
    out = np.array([_read_one(im) for im in arr], dtype=np.int64).reshape(-1, 4)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------- dataset

@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Settings of :func:`generate_synthetic`; validated on construction."""

    num_users: int = 100
    num_items: int = 300
    seed: int = 0
    image_size: int = 32
    min_interactions: int = 8
    max_interactions: int = 24
    drift: float = 0.08
    fidelity: float = 0.85
    version: int = 2
    dwell: int = 4
    rule_prob: float = 0.9

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")
        if self.dwell < 1 or not 0 <= self.rule_prob <= 1:
            raise ValueError(f"dwell must be >= 1 and rule_prob in [0, 1], got {self.dwell}, {self.rule_prob}")
        if self.num_users < 1 or self.num_items < 1:
            raise ValueError(f"num_users and num_items must be >= 1, got {self.num_users}, {self.num_items}")
        if not 32 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [32, 256], got {self.image_size}")
        if not 3 <= self.min_interactions <= self.max_interactions:
            raise ValueError(f"need 3 <= min_interactions <= max_interactions, got "
                             f"{self.min_interactions}, {self.max_interactions}")
        if not 0 <= self.drift <= 1 or not 0 <= self.fidelity <= 1:
            raise ValueError(f"drift and fidelity must be in [0, 1], got {self.drift}, {self.fidelity}")
        if self.seed < 0:  # numpy refuses it with "expected non-negative integer", not naming the value
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def drift_rules(seed: int) -> list[np.ndarray]:
    """Per attribute, the successor map ``succ[v]`` of version-2 drift: one random cycle
    through all values (every value moves; same map for every user), from ``seed``."""
    rng = np.random.default_rng([seed, 0x5EED])
    out = []
    for a in ATTRIBUTES:
        n = len(VALUES[a])
        order = rng.permutation(n)
        succ = np.empty(n, dtype=np.int64)
        succ[order] = np.roll(order, -1)
        out.append(succ)
    return out


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def generate_synthetic(out: str | os.PathLike, config: SynthConfig = SynthConfig()) -> Path:
    """Write the synthetic dataset to ``out`` (atomically); deterministic given ``config.seed``."""
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    nvals = np.array([len(VALUES[a]) for a in ATTRIBUTES])
    # Items: cycle through all combinations in a random order first, so small catalogues
    # still cover every value of every attribute.
    combos = np.stack(np.meshgrid(*[np.arange(n) for n in nvals], indexing="ij"), -1).reshape(-1, 4)
    order = rng.permutation(len(combos))
    reps = -(-cfg.num_items // len(combos))
    item_attrs = np.concatenate([combos[order]] * reps)[: cfg.num_items]
    width = max(4, len(str(cfg.num_items - 1)))
    item_ids = [f"i{j:0{width}d}" for j in range(cfg.num_items)]
    items, images, attributes = [], {}, {}
    for iid, a in zip(item_ids, item_attrs):
        a = tuple(int(v) for v in a)
        names = {k: VALUES[k][v] for k, v in zip(ATTRIBUTES, a)}
        img = render_item(a, cfg.image_size, rng)
        rel = f"images/{iid}.png"
        images[rel] = ("bytes", _png(img))
        title = f"{names['color']} {names['pattern']} {names['shape']} on {names['background']}"
        items.append({"item_id": iid, "title": title, "image": rel, **{f"attr_{k}": v for k, v in names.items()}})
        attributes[iid] = names

    rows, gt_lines = [], []
    succ = drift_rules(cfg.seed)
    uw = max(4, len(str(cfg.num_users - 1)))
    t0 = 1_600_000_000
    for u in range(cfg.num_users):
        uid = f"u{u:0{uw}d}"
        pref = np.array([rng.integers(n) for n in nvals])
        n_steps = int(rng.integers(cfg.min_interactions, cfg.max_interactions + 1))
        ts = t0 + int(rng.integers(0, 86400 * 30))
        # steps each preferred value has been held (v2 only: v1's random stream is unchanged)
        age = rng.integers(0, cfg.dwell, size=4) if cfg.version == 2 else np.zeros(4, dtype=np.int64)
        for step in range(n_steps):
            if step:
                for a in range(4):
                    if cfg.version == 2:
                        age[a] += 1
                        if age[a] >= cfg.dwell:
                            age[a] = 0
                            pref[a] = succ[a][pref[a]] if rng.random() < cfg.rule_prob else \
                                (pref[a] + rng.integers(1, nvals[a])) % nvals[a]
                            continue
                    if rng.random() < cfg.drift:
                        pref[a] = (pref[a] + rng.integers(1, nvals[a])) % nvals[a]
                        age[a] = 0
            want = pref.copy()
            for a in range(4):
                if rng.random() >= cfg.fidelity:
                    want[a] = (pref[a] + rng.integers(1, nvals[a])) % nvals[a]
            match = (item_attrs == want).sum(1)
            cands = np.nonzero(match == match.max())[0]
            j = int(cands[rng.integers(len(cands))])
            ts += int(rng.integers(60, 86400 * 3))  # strictly increasing: no ties
            rows.append((uid, item_ids[j], ts))
            gt_lines.append(json.dumps({"user_id": uid, "step": step, "timestamp": ts, "item_id": item_ids[j],
                                        "preferred": {k: VALUES[k][int(v)] for k, v in zip(ATTRIBUTES, pref)}}))
    extra = {"attributes.json": json.dumps(attributes, indent=1) + "\n",
             "ground_truth.jsonl": "\n".join(gt_lines) + "\n",
             "synth_config.json": json.dumps(dataclasses.asdict(cfg)) + "\n"}
    return write_dataset(out, items, rows, image_files=images, extra_files=extra)


def load_ground_truth(root: str | os.PathLike) -> dict[str, list[dict]]:
    """user id -> list of ground-truth steps (dicts as in ground_truth.jsonl), in step order."""
    path = Path(root) / "ground_truth.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a synthetic dataset?)")
    out: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.setdefault(obj["user_id"], []).append(obj)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed ground-truth line ({e})") from None
    return out


def attributes_to_codes(names: dict[str, str]) -> tuple[int, int, int, int]:
    """{"shape": "circle", ...} -> attribute indices in :data:`ATTRIBUTES` order."""
    try:
        return tuple(VALUES[a].index(names[a]) for a in ATTRIBUTES)  # type: ignore[return-value]
    except (KeyError, ValueError) as e:
        raise ValueError(f"bad attribute dict {names!r}: {e}") from None
