"""The plan's result: per-phase device bytes (:class:`PhasePlan`, :class:`MemoryPlan`), the
table ``pgen plan`` prints, and the planner's two errors."""
from __future__ import annotations

import dataclasses

from pgen_engine.config import ConfigError


GIB = 1 << 30


class PlanError(ConfigError):
    """The run cannot be planned (unknown model geometry, impossible batch arithmetic...)."""


class PlanOverflowError(RuntimeError):
    """The planned run does not fit its GPUs; the message names the overflowing phase."""


@dataclasses.dataclass
class PhasePlan:
    """Device bytes one GPU holds at the peak of one phase, by item."""

    name: str
    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclasses.dataclass
class MemoryPlan:
    """The plan of one run on ``gpus`` GPUs of ``gpu_bytes`` each.

    Attributes:
        phases: the phases in execution order (SFT: one; RL: rollout, log-probs, update).
        notes: where inputs came from, and the activations with checkpointing flipped.
    """

    config: str
    gpus: int
    gpu_bytes: int
    precision: str
    zero_stage: int
    model: str
    phases: list[PhasePlan]
    notes: list[str]

    @property
    def peak(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_bytes

    def overflow_line(self) -> str | None:
        """One line naming the first phase that does not fit, or None when all fit."""
        for p in self.phases:
            if p.total > self.gpu_bytes:
                top = max(p.items, key=p.items.get)
                return (f"memory plan: the {p.name} phase needs {p.total / GIB:.1f} GiB per GPU but the GPU has "
                        f"{self.gpu_bytes / GIB:.1f} GiB (largest item: {top}, {p.items[top] / GIB:.1f} GiB); "
                        f"see `pgen plan --config {self.config} --gpus {self.gpus}`")
        return None


def format_plan(plan: MemoryPlan) -> str:
    """The table ``pgen plan`` prints; the last line is ``peak per GPU: X GiB of Y GiB``."""
    lines = [f"pgen plan: {plan.config} on {plan.gpus} GPU(s) x {plan.gpu_bytes / GIB:.1f} GiB "
             f"({plan.precision}, ZeRO stage {plan.zero_stage})", f"model: {plan.model}"]
    lines += [f"note: {n}" for n in plan.notes]
    width = max(len(k) for p in plan.phases for k in p.items) + 2
    lines.append(f"{'phase':<10}  {'item':<{width}}{'GiB':>8}")
    for p in plan.phases:
        for i, (k, v) in enumerate(p.items.items()):
            lines.append(f"{p.name if i == 0 else '':<10}  {k:<{width}}{v / GIB:>8.2f}")
        mark = "  <- peak" if p is plan.peak else ""
        lines.append(f"{'':<10}  {'total':<{width}}{p.total / GIB:>8.2f}{mark}")
    lines.append(f"peak per GPU: {plan.peak.total / GIB:.1f} GiB of {plan.gpu_bytes / GIB:.1f} GiB")
    return "\n".join(lines)
