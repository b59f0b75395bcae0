"""One validated set of image-token sampling settings: :class:`SamplingParams`.

The Generator, ``pgen generate``, the RL config and the hybrid engine's rollout all build one
of these instead of each checking five loose arguments: the rules live here once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from .coerce import INT64_MAX, INT64_MIN, as_flag, as_float, as_int


class SamplingParamsError(ValueError):
    """A sampling setting is out of range; ``field`` names it (the CLI maps it to its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.detail = message


def _seed64(value, name: str) -> int:
    """A 64-bit seed in ``[-2**63, 2**64)`` as a signed int64 (values past int64 wrap, like uint64)."""
    v = as_int(value, name)
    if not INT64_MIN <= v < 2 ** 64:
        raise SamplingParamsError(name, f"must be a 64-bit integer in [-2**63, 2**64), got {v}")
    return v - 2 ** 64 if v > INT64_MAX else v


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How image tokens are picked (see :meth:`pgen_engine.generation.Generator.generate`).

    Attributes:
        guidance_scale: CFG scale ``s`` (logits ``u + s * (c - u)``); finite; 1 turns CFG off.
        temperature: finite, > 0 (use ``greedy`` for argmax decoding).
        top_k: int >= 0 (0 disables).
        top_p: in (0, 1] (1 disables).
        greedy: take the argmax of the CFG-mixed logits instead of sampling.
        seed: one 64-bit int (prompt ``i`` gets request seed ``mix_seed(seed, i)``) or a tuple
            of request seeds, one per prompt (stored as signed int64 values).

    Every field is checked once, at construction; TypeError for a wrong type, and
    :class:`SamplingParamsError` (a ValueError naming the field) for a value out of range.
    """

    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise once here)
        g = as_float(self.guidance_scale, "guidance_scale")
        if not math.isfinite(g):
            raise SamplingParamsError("guidance_scale", f"must be a finite number, got {g}")
        t = as_float(self.temperature, "temperature")
        if not math.isfinite(t):
            raise SamplingParamsError("temperature", f"must be a finite number > 0, got {t}")
        if t <= 0:
            raise SamplingParamsError("temperature", f"must be > 0, got {t} (use greedy for argmax decoding)")
        k = as_int(self.top_k, "top_k")
        if k < 0:
            raise SamplingParamsError("top_k", f"must be an int >= 0 (0 disables it), got {k}")
        p = as_float(self.top_p, "top_p")
        if not 0.0 < p <= 1.0:  # also refuses NaN
            raise SamplingParamsError("top_p", f"must be in (0, 1] (1 disables it), got {p}")
        put("guidance_scale", g)
        put("temperature", t)
        put("top_k", k)
        put("top_p", p)
        put("greedy", as_flag(self.greedy, "greedy"))
        put("seed", self._normalise_seed(self.seed))

    @staticmethod
    def _normalise_seed(seed) -> int | tuple[int, ...]:
        if getattr(seed, "ndim", None) == 0:  # 0-d tensor / array: one seed
            seed = seed.item()
        if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
            return _seed64(seed, "seed")
        seeds = seed.tolist() if hasattr(seed, "tolist") else list(seed)
        if not seeds:
            raise SamplingParamsError("seed", "must be one int or a non-empty sequence of ints (one per prompt)")
        return tuple(_seed64(s, f"seed[{i}]") for i, s in enumerate(seeds))

    @property
    def cfg(self) -> bool:
        """True when guidance mixes in unconditional rows (``guidance_scale != 1``)."""
        return self.guidance_scale != 1.0

    def replace(self, **changes) -> "SamplingParams":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def request_seeds(self, num_prompts: int) -> "Sequence[int] | int":
        """The seed as given, after checking a per-prompt tuple holds ``num_prompts`` entries."""
        if isinstance(self.seed, tuple) and len(self.seed) != num_prompts:
            raise SamplingParamsError("seed", f"expected one int or {num_prompts} ints (one per prompt), "
                                              f"got {len(self.seed)}")
        return self.seed
