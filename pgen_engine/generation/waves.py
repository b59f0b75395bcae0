"""Wave planning: which (prompt, sample range) items decode together, and how a wave's KV is laid out.

Every image has exactly ``T`` tokens, so the rows of a wave start and finish together: a wave
is the admission unit (at most ``max_batch_size`` rows, :func:`plan_waves`). Within a wave the
KV cache holds each conditional prompt once and each distinct unconditional prompt once (the
shared-prefix pool) and each row only its own image tokens (:class:`WaveGeometry`);
:func:`plan_kv_bytes` sizes that storage without a model (memory planning).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch

from .coerce import as_positive_int

UNCOND_MODES = ("pad", "short")
#: what ``Generator.generate(return_logprobs=True)`` records: the conditional branch's
#: ``log_softmax(c / T)`` or the CFG mix's ``log_softmax((u + s (c - u)) / T)``
LOGPROB_DISTRIBUTIONS = ("conditional", "guided")


@dataclasses.dataclass(frozen=True)
class WaveItem:
    """Samples ``[first, first + count)`` of prompt ``prompt``."""

    prompt: int
    first: int
    count: int


@dataclasses.dataclass(frozen=True)
class WaveGeometry:
    """How one wave's KV is laid out (cascade layout, see :class:`~pgen_engine.models.decoder.KVCache`).

    The pool holds ``P = Pc + len(ukeys)`` prefixes of ``Lp`` positions: the wave's ``Pc``
    conditional prompts (one per wave item, shared by that prompt's samples), then each
    distinct unconditional prompt once. Each of the ``rows`` cache rows (``R`` conditional,
    their ``R`` partners with CFG) owns ``Lo = max(T - 1, 1)`` positions for the image tokens
    it feeds back (the last code is never fed back).
    """

    Pc: int
    ukeys: tuple[tuple[int, ...], ...]
    item_uncond: tuple[int, ...]  # per wave item: index into ukeys (empty without CFG)
    Lp: int
    R: int
    rows: int
    Lo: int

    @property
    def P(self) -> int:
        return self.Pc + len(self.ukeys)

    @property
    def tokens(self) -> int:
        """Positions per layer the wave holds: pool plus own rows."""
        return self.P * self.Lp + self.rows * self.Lo


def wave_geometry(cond_lens: Sequence[int], counts: Sequence[int], uncond_keys: Sequence[tuple[int, ...]] | None,
                  T: int) -> WaveGeometry:
    """Geometry of a wave of items (prompt length ``cond_lens[i]``, ``counts[i]`` samples), with
    ``uncond_keys[i]`` the unconditional prompt of item ``i`` (None: no CFG)."""
    uniq: dict[tuple[int, ...], int] = {}
    item_uncond = tuple(uniq.setdefault(tuple(k), len(uniq)) for k in uncond_keys) if uncond_keys is not None else ()
    R = int(sum(counts))
    lp = max([*cond_lens, *(len(k) for k in uniq)])
    return WaveGeometry(Pc=len(cond_lens), ukeys=tuple(uniq), item_uncond=item_uncond, Lp=lp, R=R,
                        rows=2 * R if uncond_keys is not None else R, Lo=max(T - 1, 1))


def plan_waves(num_prompts: int, num_samples: int, cap: int) -> Iterator[list[WaveItem]]:
    """Groups of (prompt, sample range) with at most ``cap`` rows each, in prompt order."""
    wave: list[WaveItem] = []
    used = 0
    for i in range(num_prompts):
        first = 0
        while first < num_samples:
            n = min(num_samples - first, cap - used)
            wave.append(WaveItem(i, first, n))
            used += n
            first += n
            if used == cap:
                yield wave
                wave, used = [], 0
    if wave:
        yield wave


def plan_kv_bytes(text_cfg, num_image_tokens: int, prompt_lens: Sequence[int], *, num_samples: int = 1,
                  guidance_scale: float = 5.0, uncond_mode: str = "pad", max_batch_size: int = 32,
                  dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
                  distinct_uncond: bool = False) -> int:
    """Peak KV bytes a wave-scheduled :meth:`Generator.generate` holds for prompts of these
    lengths: the Generator's own wave plan and :func:`wave_geometry` (the code that sizes its
    storage). ``"pad"`` unconditional prompts are shared per distinct length, which is exact
    for text prompts; history prompts keep their interior begin-of-image tokens in the
    unconditional prompt, so same-length ones may differ: ``distinct_uncond`` counts one per
    prompt (the upper bound). ``"short"`` is one ``[bos, boi]``. No model or device needed
    (memory planning). A prompt that ``generate``
    refuses for its length (past ``max_seq_len`` when given, or the model's
    ``max_position_embeddings``, with the image tokens) is refused here too, with its message."""
    if uncond_mode not in UNCOND_MODES:
        raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {uncond_mode!r}")
    lens = [int(n) for n in prompt_lens]
    if not lens or min(lens) < 1:
        raise ValueError(f"prompt_lens must be non-empty lengths >= 1, got {prompt_lens!r}")
    num_samples = as_positive_int(num_samples, "num_samples", 1)  # 0 gave 0 bytes; generate refuses it
    cfg = float(guidance_scale) != 1.0
    T = int(num_image_tokens)
    # else a byte count for a request generate refuses (a plan built on it fails only when run)
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    for b, n in enumerate(lens):
        if max_pos is not None and n + T > max_pos:
            raise ValueError(f"prompt {b}: {n} tokens + {T} image tokens exceed the model's "
                             f"max_position_embeddings={max_pos}")
    if max_seq_len is not None and max(lens) + T > max_seq_len:
        raise ValueError(f"a prompt of {max(lens)} tokens + {T} image tokens exceeds max_seq_len={max_seq_len}")

    def ukey(b: int) -> tuple[int, ...]:
        if uncond_mode == "short":
            return (-2, -3)
        # stands for the pad prompt of prompt b's length (distinct_uncond: of prompt b itself); the
        # key's length is the prompt's, which is what wave_geometry sizes
        return ((-4 - b) if distinct_uncond else -1,) + (-1,) * (lens[b] - 1)

    peak = 0
    for w in plan_waves(len(lens), num_samples, max_batch_size):
        g = wave_geometry([lens[it.prompt] for it in w], [it.count for it in w],
                          [ukey(it.prompt) for it in w] if cfg else None, T)
        peak = max(peak, g.tokens)
    per_token = 2 * text_cfg.num_layers * text_cfg.num_kv_heads * text_cfg.head_dim * \
        torch.empty((), dtype=dtype).element_size()
    return peak * per_token
