"""Reports: ``report.md`` + ``report.html`` with the metric table, per-user image grids
(history row -> generated rows -> true next item) and training curves, all PNG."""
from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pgen_engine.io_utils import atomic_write_bytes, atomic_write_text

from .stats import bootstrap_indices, mean_ci, paired_ci, verdict


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(rows: Sequence[tuple[str, torch.Tensor]], *, scale: int = 3, pad: int = 4,
               label_width: int = 150) -> np.ndarray:
    """Stack labelled rows of uint8 images ``[n_i, H, W, 3]`` into one RGB array.

    Each row starts with its label; small images are upscaled ``scale``x (nearest) so a
    32-px render stays readable.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    H, W = rows[0][1].shape[1:3]
    h, w = H * scale, W * scale
    ncol = max(r[1].shape[0] for r in rows)
    canvas = Image.new("RGB", (label_width + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, imgs) in enumerate(rows):
        y = pad + i * (h + pad)
        draw.text((pad, y + h // 2 - 6), label, fill=(0, 0, 0))
        for j in range(imgs.shape[0]):
            tile = Image.fromarray(imgs[j].cpu().numpy()).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + j * (w + pad), y))
    return np.asarray(canvas)


def save_png(path: str | Path, arr: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG, atomically."""
    atomic_write_bytes(path, _png_bytes(arr))


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (missing file -> [])."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: malformed metrics line ({e})") from None
    return rows


def plot_curves(path: str | Path, series: dict[str, list[dict]], keys: Sequence[str], title: str) -> bool:
    """Plot ``keys`` vs ``step`` for each run in ``series`` into one PNG; False if nothing to plot."""
    import matplotlib  # late import: matplotlib is optional (not an install requirement), only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: after matplotlib.use("Agg") picks the file-only backend

    present = [k for k in keys if any(k in r for rows in series.values() for r in rows)]
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        for run, rows in series.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=run, lw=1.5)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_report(out_dir: str | Path, *, title: str, table_md: str, notes: Sequence[str],
                 figures: Sequence[tuple[str, str]], meta: dict) -> Path:
    """Write ``report.md`` and ``report.html`` into ``out_dir``.

    Args:
        table_md: the metric table in Markdown.
        notes: paragraphs printed under the table (what the numbers mean, honest caveats).
        figures: (caption, PNG path relative to ``out_dir``).
        meta: run facts (device, wall time, sizes) listed at the end.
    """
    out = Path(out_dir)
    md = [f"# {title}", "", table_md, ""]
    md += [n + "\n" for n in notes]
    for cap, rel in figures:
        md += [f"## {cap}", "", f"![{cap}]({rel})", ""]
    md += ["## Run", ""] + [f"- **{k}**: {v}" for k, v in meta.items()] + [""]
    atomic_write_text(out / "report.md", "\n".join(md))
    rows = [r for r in table_md.splitlines() if r.startswith("|") and not r.startswith("|---")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    tab = "<table>" + "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
        + "</tr>" for i, row in enumerate(cells)) + "</table>"
    body = [f"<h1>{html.escape(title)}</h1>", tab] + [f"<p>{html.escape(n)}</p>" for n in notes]
    body += [f"<h2>{html.escape(c)}</h2><img src='{html.escape(r)}'>" for c, r in figures]
    body += ["<h2>Run</h2><ul>"] + [f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                                     for k, v in meta.items()] + ["</ul>"]
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    atomic_write_text(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
                      f"{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>")
    return out / "report.md"


# ---------------------------------------------------------------------------- report.json

# Every system is compared user by user with each of these baselines (where present).
PAIRED_BASELINES = ("generate_nonpersonal", "copy_last", "retrieve")
# Further pairs the report makes claims about: does RL improve on the SFT model it starts from,
# does personalised generation beat random catalogue items (the floor), and does it beat
# repeating the most recent item (does the model anticipate a change)?
PAIRED_CLAIMS = (("generate_sft_rl", "generate_sft"), ("generate_sft", "random"), ("generate_sft_rl", "random"),
                 ("generate_sft", "repeat_last"), ("generate_sft_rl", "repeat_last"))


def paired_keys(systems: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(system, baseline)`` pairs ``report.json["paired"]`` holds for these systems.

    Every system against each present baseline of :data:`PAIRED_BASELINES` (in that order),
    then each pair of :data:`PAIRED_CLAIMS` whose two systems are present and not listed yet.
    """
    names = list(systems)
    pairs = [(s, base) for base in PAIRED_BASELINES if base in names for s in names if s != base]
    pairs += [p for p in PAIRED_CLAIMS if p[0] in names and p[1] in names and p not in pairs]
    return pairs


def build_report_json(dataset: str, seeds: Sequence[int], images_per_user: int, evaluator: dict,
                      per_user: dict[str, dict[str, torch.Tensor]], *, draws: int = 1000, seed: int = 0) -> dict:
    """The ``report.json`` object.

    Shape: ``{"dataset", "seeds", "users", "images_per_user", "evaluator",
    "systems": {system: {metric: {"mean", "ci95"}}},
    "paired": {"<system> - <baseline>": {metric: {"mean", "ci95"}}}}`` with the pairs of
    :func:`paired_keys` (every system against each of :data:`PAIRED_BASELINES`, plus
    :data:`PAIRED_CLAIMS`). ``per_user`` holds each system's per-user metric tensors
    ``[U]`` (already averaged over seeds); every system must cover the same users in the
    same order. One bootstrap draw set is shared by every system and pair.
    """
    sizes = {v.shape[0] for m in per_user.values() for v in m.values()}
    if len(sizes) != 1:
        raise ValueError(f"build_report_json: systems cover different numbers of users {sorted(sizes)}")
    U = sizes.pop()
    idx = bootstrap_indices(U, draws, seed)
    systems = {s: {m: mean_ci(v, idx) for m, v in ms.items()} for s, ms in per_user.items()}
    paired = {f"{s} - {base}": {m: paired_ci(v, per_user[base][m], idx) for m, v in per_user[s].items()
                                if m in per_user[base]}
              for s, base in paired_keys(per_user)}
    return {"dataset": str(dataset), "seeds": [int(x) for x in seeds], "users": int(U),
            "images_per_user": int(images_per_user), "evaluator": evaluator, "systems": systems, "paired": paired}


def json_safe(obj):
    """``obj`` with every NaN / inf float replaced by None: what strict JSON parsers accept
    (``json.dumps`` writes a bare ``NaN``, which JavaScript, jq and most tools refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_report_json(path: str | Path, report: dict) -> None:
    """Write ``report`` as strict JSON (undefined values as ``null``), atomically.

    An earlier run's ``report.md`` / ``report.html`` next to it are removed first: they are
    written last (:func:`write_report`, after the figures), so a run stopped in between leaves
    ``report.json`` alone, never a Markdown report of other numbers beside it.
    """
    body = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"  # a bad report fails before the unlink
    for name in ("report.md", "report.html"):
        (Path(path).parent / name).unlink(missing_ok=True)
    atomic_write_text(path, body)


def _cell(d: dict) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of a report cell, NaN for a value written as null."""
    nan = float("nan")
    m, (lo, hi) = d["mean"], d["ci95"]
    return tuple(nan if x is None else float(x) for x in (m, lo, hi))


def _num(x: float, digits: int = 3, sign: str = "") -> str:
    """``x`` to ``digits`` decimals, in scientific notation where those would print a nonzero
    value as 0 (a paired CI bound of +0.0003 printed "+0.000" next to the word "beats")."""
    s = f"{x:{sign}.{digits}f}"
    return f"{x:{sign}.1e}" if x != 0 and float(s) == 0 else s


def _fmt(d: dict, digits: int = 3, paired: bool = False) -> str:
    m, lo, hi = _cell(d)
    if m != m:  # NaN
        return "—"
    f = (lambda x: _num(x, digits)) if paired else (lambda x: f"{x:.{digits}f}")
    if lo != lo or hi != hi:  # a mean without a CI (a single user)
        return f"{f(m)} [—]"
    return f"{f(m)} [{f(lo)}, {f(hi)}]"


def ci_table(report: dict, metrics: Sequence[str], section: str = "systems") -> str:
    """Markdown table of ``report[section]``: rows systems (or pairs), cells ``mean [lo, hi]``."""
    rows = report[section]
    cols = [m for m in metrics if any(m in r for r in rows.values())]
    lines = ["| " + ("system" if section == "systems" else "difference") + " | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[c], paired=section == "paired") if c in r else "—"
                                               for c in cols) + " |")
    return "\n".join(lines)


def paired_sentences(report: dict, systems: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """One sentence per (system, baseline): which metrics it beats / loses / ties on.

    "beats" only where the 95 % CI of the paired difference excludes 0 in the good
    direction; "no difference" where it contains 0.
    """
    out = []
    for key, ms in report["paired"].items():
        sys_name, _, base = key.partition(" - ")
        if sys_name not in systems:
            continue
        groups: dict[str, list[str]] = {"better": [], "worse": [], "no difference": []}
        for m in metrics:
            mean, lo, hi = _cell(ms[m]) if m in ms else (float("nan"),) * 3
            if mean == mean:
                ci = "no CI" if lo != lo or hi != hi else f"[{_num(lo, sign='+')}, {_num(hi, sign='+')}]"
                groups[verdict(m, {"mean": mean, "ci95": [lo, hi]})].append(f"{m} ({_num(mean, sign='+')} {ci})")
        parts = []
        if groups["better"]:
            parts.append("beats it on " + ", ".join(groups["better"]))
        if groups["worse"]:
            parts.append("is worse on " + ", ".join(groups["worse"]))
        if groups["no difference"]:
            parts.append("shows no difference on " + ", ".join(groups["no difference"]))
        out.append(f"**{sys_name} vs {base}** (paired 95 % CI over {report['users']} users): " + "; ".join(parts) + ".")
    return out


def plot_paired(path: str | Path, report: dict, metrics: Sequence[str]) -> bool:
    """Dot-and-interval plot of every paired difference (one panel per metric); False if none."""
    import matplotlib  # late import: matplotlib is optional (not an install requirement), only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: after matplotlib.use("Agg") picks the file-only backend

    keys = list(report["paired"])
    present = [m for m in metrics if any(m in report["paired"][k] for k in keys)]
    if not keys or not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 0.35 * len(keys) + 1.2),
                             squeeze=False, sharey=True)
    for ax, m in zip(axes[0], present):
        for y, k in enumerate(keys):
            d = report["paired"][k].get(m)
            mean, lo, hi = _cell(d) if d is not None else (float("nan"),) * 3
            if mean != mean:
                continue
            ax.plot([lo, hi], [y, y], color="tab:blue", lw=2)
            ax.plot([mean], [y], "o", color="tab:red" if lo > 0 or hi < 0 else "grey", ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(m, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(range(len(keys)))
    axes[0][0].set_yticklabels(keys, fontsize=7)
    fig.suptitle("paired per-user differences, 95 % bootstrap CI (red: CI excludes 0)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def results_markdown(report: dict, metrics: Sequence[str], key_metrics: Sequence[str],
                     systems: Sequence[str] = ("generate_nonpersonal", "generate_sft", "generate_sft_rl")) -> str:
    """A README results block from ``report.json``: the CI table, the paired-difference
    table of ``key_metrics`` and the verdict sentences (claims only what the CIs support)."""
    ev = report.get("evaluator", {})
    san = {k: float("nan") if v is None else v for k, v in (ev.get("sanity") or {}).items()}  # null: undefined
    head = (f"{report['users']} test users x {report['images_per_user']} images, seeds {report['seeds']}; "
            f"cells: mean [95 % paired-bootstrap CI over users]. Evaluator: {ev.get('type', '?')}"
            + (f" (held-out co-consumption recall@10 {san['recall@10']:.3f} vs pixel statistics "
               f"{san['recall@10_pixel_stats']:.3f}, chance {san['recall@10_chance']:.3f}"
               + (f"; mean pairwise cosine {san['mean_cosine']:.2f}" if "mean_cosine" in san else "") + ")"
               if san else "")
            + (", independent of the reward embedder" if ev.get("independent") else ", NOT independent of the reward"))
    parts = [head, "", ci_table(report, metrics), "", "Paired differences (system - baseline):", "",
             ci_table(report, key_metrics, section="paired"), ""]
    parts += [s + "\n" for s in paired_sentences(report, systems, key_metrics)]
    return "\n".join(parts)


def replace_readme_block(readme: str | Path, name: str, block: str) -> None:
    """Replace the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` (atomically)."""
    p = Path(readme)
    text = p.read_text()
    a, b = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if a not in text or b not in text:
        raise ValueError(f"{p}: markers {a} ... {b} not found")
    i, j = text.index(a) + len(a), text.index(b)
    atomic_write_text(p, text[:i] + "\n" + block.rstrip() + "\n" + text[j:])
