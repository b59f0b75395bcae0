"""Training observability: ``metrics.jsonl``, the rank-0 progress bar, optional TensorBoard,
throughput and model-FLOPs utilisation (MFU).

``metrics.jsonl`` holds one JSON object per logged step; each line is written with one
``write`` + flush, so a crash leaves at most a truncated last line, which :func:`read_metrics`
skips. On resume, rows after the resumed step are dropped (atomic rewrite), so the file
always describes one consistent trajectory.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pgen_engine.errors import PgenUserError
from pgen_engine.io_utils import atomic_write_text

from .distributed import all_reduce, on_main, same_on_all_ranks

METRICS_NAME = "metrics.jsonl"

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; MFU is reported only
# for devices listed here.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl file: the JSON objects whose ``step`` (when present) is an int.

    An incomplete last line from a crash is ignored, and so are lines that are not such an
    object (undecodable bytes, a hand-edited ``[1, 2]`` or ``"step": "x"``), which used to stop
    a resume with a traceback when the trainer filtered the rows by step.
    """
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (isinstance(row.get("step", 0), int) and not isinstance(row.get("step"), bool)):
            rows.append(row)
    return rows


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, or None when unknown / not a GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def train_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Forward+backward FLOPs per token of a decoder: 6·N for the matmuls plus 12·L·H·S for attention."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


class MetricsLogger:
    """Writes metrics on rank 0; built and ``log``-ged on every rank (collectives, see ``log``).

    Args:
        output_dir: run folder; ``metrics.jsonl`` (and ``tensorboard/``) go there.
        is_main: this process is rank 0.
        total_steps: for the progress bar.
        start_step: steps already done (resume); later rows in metrics.jsonl are dropped.
        progress: show a tqdm bar.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
    """

    def __init__(self, output_dir: str | os.PathLike, *, is_main: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = False):
        self.is_main = is_main
        self.path = Path(output_dir) / METRICS_NAME
        self._bar = None
        self._tb = None
        self._file = None
        # collective (every rank builds its logger): a failure on rank 0 stops every rank at once,
        # instead of rank 0 exiting while the others wait in the next ZeRO-3 gather
        on_main(lambda: self._open(output_dir, total_steps, start_step, progress, tensorboard), is_main)

    def _open(self, output_dir, total_steps: int, start_step: int, progress: bool, tensorboard: bool) -> None:
        rows = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                # late import: tensorboard is optional, needed only when logging.tensorboard is on
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise PgenUserError(f"logging.tensorboard=true needs the 'tensorboard' package ({e}); "
                                    "install it or set logging.tensorboard=false") from None
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must contain ``step``) and update the bar/TensorBoard (collective: every
        rank calls it; rank 0 writes, and a failed write stops every rank)."""
        on_main(lambda: self._write(row), self.is_main)

    def _write(self, row: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, clean["step"])
        if self._bar is not None:
            self._bar.set_postfix({k: f"{clean[k]:.4g}" for k in ("loss", "lr") if k in clean}, refresh=False)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
            self._file = None


def reduce_row(row: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Metrics over ranks: the mean; max for ``*_max`` / ``*/max`` and memory peaks, min for ``*/min``;
    a population std (``reward_std``, ``<x>/std`` beside its mean ``<x>``) from the ranks' second
    moments. Every rank holds the same number of rows, so these are the all-rank statistics.
    Raises RuntimeError on every rank when the ranks' rows have different keys."""
    if world_size == 1:
        return row
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and k != "step")
    if not same_on_all_ranks("\n".join(keys)):  # unequal tensors below: a hang on NCCL
        raise RuntimeError(f"RL metrics differ in their keys between ranks; this rank's keys: {', '.join(keys)}")
    mean_of = {k: m for k in keys for m in [("reward" if k == "reward_std" else k[:-4])] if k.endswith(("_std", "/std")) and m in row}
    vals = torch.tensor([row[k] ** 2 + row[mean_of[k]] ** 2 if k in mean_of else float(row[k]) for k in keys],
                        dtype=torch.float64)
    total, mx, mn = all_reduce(vals, "sum"), all_reduce(vals, "max"), all_reduce(vals, "min")
    out = dict(row)
    for i, k in enumerate(keys):
        peak = k.endswith(("_max", "/max")) or k.startswith("mem/")
        out[k] = float(mx[i]) if peak else float(mn[i]) if k.endswith("/min") else float(total[i]) / world_size
    for k, m in mean_of.items():  # E[x^2] - E[x]^2 over all rows
        out[k] = max(out[k] - out[m] ** 2, 0.0) ** 0.5
    return out
