"""Decode backends: how a wave's prefill and decode loop run, chosen once per Generator.

A :class:`~pgen_engine.generation.Generator` picks one backend at construction, from the
model's device and dtype, the cache dtype and ``decode_mode`` (:func:`make_backend`):

* :class:`CppBackend` — a float32 CPU model over a float32 cache: the C++ layer stack
  (:mod:`.layers_cpu`) for the prefill, and a wave's whole decode loop in one C++ call
  (:mod:`.decode_cpu`);
* :class:`StaticBackend` — the graph-ready static step (:mod:`.decode_graph`), captured as a
  CUDA graph and replayed on CUDA (``decode_mode="graph"``, the CUDA default) or run eagerly
  (``"static"``, any device: what a graph captures, testable on CPU);
* :class:`EagerBackend` — eager torch: the model's own ``prefill`` / ``decode_step`` in a
  Python loop (every other case: bf16 / fp16 on CPU, ``PGEN_CPU_DECODE=0``, ...).

Every backend has the same two calls (and :meth:`DecodeBackend.reset`):

* ``prefill(inputs_embeds, attention_mask, cache, slot_mapping) -> hidden [B,S,H]``: the
  model's prefill contract (:meth:`pgen_engine.JanusModel.prefill`);
* ``decode_wave(cache, wave) -> (codes int64 [R,T], log-probs float32 [R,T] or None)``:
  codes ``1 .. T-1`` of a wave whose code 0 the Generator picked from the prefill, everything
  the loop reads prepared in a :class:`WaveDecode` before it starts (no host work inside).

The cache is the wave cache of :class:`~pgen_engine.models.decoder.KVCache` (head-major own
rows behind a shared-prefix pool). All backends give the same codes: they run the same ops
(the C++ stack's float32 sums may round in another order; the tests pin the codes).

A new backend (say, a Triton shared-prefix attention or an fp8 cache) subclasses
:class:`DecodeBackend`, overrides ``step`` (one decode step's layers; the loops call it) and,
where it has its own loop, ``decode_wave``; :func:`make_backend` is the one place that chooses.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import decode_cpu, layers_cpu
from . import decode_graph as dg

#: ``pick(hidden [rows, H], seeds int64 [R]) -> codes int64 [R]`` (or ``(codes, log-probs [R])``
#: when the wave records log-probs): CFG mix and sampling / argmax of one step.
PickFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass(frozen=True)
class WaveDecode:
    """One wave's decode inputs. ``R`` sampled rows; ``rows`` = ``2R`` cache rows with CFG
    (conditional rows first, then their unconditional partners), else ``R``; ``T`` codes."""

    first: torch.Tensor              # int64 [R]: code 0 (picked from the prefill's last hidden state)
    first_lp: torch.Tensor | None    # float32 [R]: its log-prob, iff the wave records log-probs
    base: torch.Tensor               # int64 [rows]: prompt length of each cache row
    slot0: torch.Tensor              # int64 [rows]: cache slot of each row's first image token
    step_seeds: torch.Tensor         # int64 [T, R]: sampling seed of row r at step t
    cfg: bool                        # whether the unconditional rows exist
    pick: PickFn
    sampling: tuple[float, float, int, float, bool]  # guidance_scale, temperature, top_k, top_p, greedy
    key: tuple                       # what a captured step bakes in besides the weights (shapes, storage, sampling)
    on_steps: Callable[[int], None] | None = None  # progress: called with the number of steps just done
    # which distribution the recorded log-probs are of: "conditional" (log_softmax(c / T)) or
    # "guided" (log_softmax((u + s (c - u)) / T)); see Generator.generate's logprob_distribution
    lp_distribution: str = "conditional"


class DecodeBackend:
    """The interface (and the eager torch layers every backend shares)."""

    name = "eager"

    def __init__(self, model):
        self.model = model

    # -- layer kernels: overridden by the C++ backend
    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                slot_mapping: torch.Tensor) -> torch.Tensor:
        """Prompts ``[B,S,H]`` (left-padded; ``attention_mask`` ``[B,S]`` or None) -> final hidden
        ``[B,S,H]``; K/V written at ``slot_mapping`` int64 ``[B,S]`` (-1: not stored)."""
        return self.model.prefill(inputs_embeds, attention_mask, cache, slot_mapping)

    def prefill_last(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
        """:meth:`prefill` but returning each prompt's last hidden state only, ``[B,H]`` (what
        the Generator needs; a backend may skip the other positions' last-layer work)."""
        return self.prefill(inputs_embeds, attention_mask, cache, slot_mapping)[:, -1]

    def step(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache, slot_mapping: torch.Tensor,
             cache_seqlens: torch.Tensor) -> torch.Tensor:
        """One token per cache row (:meth:`pgen_engine.JanusModel.decode_step`) -> hidden ``[rows, H]``."""
        return self.model.decode_step(inputs_embeds, positions, cache, slot_mapping, cache_seqlens)

    # -- the loop
    def decode_wave(self, cache, wave: WaveDecode) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes ``1 .. T-1`` of a wave -> (int64 ``[R, T]`` codes with column 0 = ``wave.first``,
        float32 ``[R, T]`` log-probs or None). A code of -1 marks a row whose logits were not
        finite (it is fed back as code 0; the Generator raises after the wave)."""
        m = self.model
        T, R = wave.step_seeds.shape
        out = torch.empty((R, T), dtype=torch.long, device=wave.first.device)
        out_lp = None if wave.first_lp is None else torch.empty((R, T), dtype=torch.float32, device=out.device)
        out[:, 0] = wave.first
        if out_lp is not None:
            out_lp[:, 0] = wave.first_lp
        tok = wave.first
        # a host-side t: on CPU the static step's device-side counter costs more in index ops
        for t in range(1, T):
            emb = m.embed_image_codes(tok.clamp(min=0))  # -1: non-finite logits (see Generator._pick)
            if wave.cfg:
                emb = torch.cat([emb, emb])
            pos = wave.base + (t - 1)
            h = self.step(emb, pos, cache, wave.slot0 + (t - 1), (pos + 1).to(torch.int32))
            picked = wave.pick(h, wave.step_seeds[t])
            if out_lp is not None:
                tok, out_lp[:, t] = picked[0], picked[1]
            else:
                tok = picked
            out[:, t] = tok
            if wave.on_steps is not None:
                wave.on_steps(1)
        return out, out_lp

    def reset(self) -> None:
        """Drop state that points into the KV storage or the weights (captured graphs)."""


class EagerBackend(DecodeBackend):
    """Eager torch: the model's layers in a Python loop over the steps."""

    name = "eager"


class _CppLayers(DecodeBackend):
    """The C++ float32 layer stack for the prefill and for single steps, where it applies
    (left-padded prompts, no gradients); the model's torch layers otherwise."""

    def prefill(self, inputs_embeds, attention_mask, cache, slot_mapping):
        h = layers_cpu.prefill(self.model.language_model, inputs_embeds, attention_mask, cache, slot_mapping)
        return h if h is not None else super().prefill(inputs_embeds, attention_mask, cache, slot_mapping)

    def prefill_last(self, inputs_embeds, attention_mask, cache, slot_mapping):
        h = layers_cpu.prefill(self.model.language_model, inputs_embeds, attention_mask, cache, slot_mapping,
                               last_only=True)
        return h[:, -1] if h is not None else super().prefill_last(inputs_embeds, attention_mask, cache, slot_mapping)

    def step(self, inputs_embeds, positions, cache, slot_mapping, cache_seqlens):
        h = layers_cpu.decode_step(self.model.language_model, inputs_embeds, positions, cache, slot_mapping,
                                   cache_seqlens)
        return h if h is not None else super().step(inputs_embeds, positions, cache, slot_mapping, cache_seqlens)


class CppBackend(_CppLayers):
    """float32 CPU: C++ prefill, and a wave's whole decode loop in one C++ call.

    The loop needs an aligner / head activation it knows (checked per wave, as a model may be
    changed after construction: :func:`.decode_cpu.applies`); without one the wave runs the
    Python loop over the C++ step, with the same codes. The loop writes the log-probs of either
    distribution (``wave.lp_distribution``: conditional, or the CFG-guided mix RL samples).
    """

    name = "cpp"

    def decode_wave(self, cache, wave: WaveDecode) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not decode_cpu.applies(self.model, cache):
            return super().decode_wave(cache, wave)
        T, R = wave.step_seeds.shape
        out = torch.empty((R, T), dtype=torch.long)
        out[:, 0] = wave.first
        out_lp = None
        if wave.first_lp is not None:
            out_lp = torch.empty((R, T), dtype=torch.float32)
            out_lp[:, 0] = wave.first_lp
        s, temperature, top_k, top_p, greedy = wave.sampling
        decode_cpu.run_decode_loop(self.model, cache, wave.cfg, out, out_lp, wave.step_seeds, wave.base, wave.slot0,
                                   guidance_scale=s, temperature=temperature, top_k=top_k, top_p=top_p,
                                   greedy=greedy, lp_distribution=wave.lp_distribution, progress=wave.on_steps)
        return out, out_lp


class StaticBackend(DecodeBackend):
    """The static step of :mod:`.decode_graph`: CUDA graphs (``graphs=True``) or run eagerly.

    The step's layers are the C++ stack for a model :class:`CppBackend` would run (so
    ``decode_mode="static"`` gives its codes on CPU), else the model's torch layers.
    """

    name = "static"

    def __init__(self, model, graphs: bool, cpp_layers: bool = False):
        super().__init__(model)
        self.runner = dg.StaticDecode(graphs=graphs)
        self._layers = _CppLayers(model) if cpp_layers else None
        if graphs:
            self.name = "graph"

    def prefill(self, inputs_embeds, attention_mask, cache, slot_mapping):
        if self._layers is not None:
            return self._layers.prefill(inputs_embeds, attention_mask, cache, slot_mapping)
        return super().prefill(inputs_embeds, attention_mask, cache, slot_mapping)

    def prefill_last(self, inputs_embeds, attention_mask, cache, slot_mapping):
        if self._layers is not None:
            return self._layers.prefill_last(inputs_embeds, attention_mask, cache, slot_mapping)
        return super().prefill_last(inputs_embeds, attention_mask, cache, slot_mapping)

    def step(self, inputs_embeds, positions, cache, slot_mapping, cache_seqlens):
        if self._layers is not None:
            return self._layers.step(inputs_embeds, positions, cache, slot_mapping, cache_seqlens)
        return super().step(inputs_embeds, positions, cache, slot_mapping, cache_seqlens)

    def decode_wave(self, cache, wave: WaveDecode) -> tuple[torch.Tensor, torch.Tensor | None]:
        # a captured graph reads parameters and buffers (e.g. the rotary inv_freq, which a checkpoint
        # load re-assigns) at fixed addresses: re-capture if any moved
        weights = tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())) \
            if self.runner.graphs else None
        on_step = None if wave.on_steps is None else (lambda: wave.on_steps(1))
        return self.runner.run((*wave.key, weights), self.model, cache, wave.cfg, wave.pick, wave.first, wave.base,
                               wave.slot0, wave.step_seeds, on_step, first_lp=wave.first_lp, layers=self.step)

    def reset(self) -> None:
        self.runner.clear()


def make_backend(model, cache_dtype: torch.dtype, decode_mode: str = "auto") -> DecodeBackend:
    """The backend for ``model`` (its device and dtype) over a ``cache_dtype`` cache.

    ``decode_mode``: ``"auto"`` (CUDA: ``"graph"``; elsewhere ``"eager"``), ``"eager"`` (the C++
    backend for a float32 CPU model and cache the C++ stack supports, else eager torch),
    ``"static"`` or ``"graph"`` (CUDA only); see :func:`.decode_graph.resolve_decode_mode`.
    """
    mode = dg.resolve_decode_mode(decode_mode, model.device)
    cpp = layers_cpu.supports(model.language_model, model.dtype, model.device, cache_dtype)
    if mode in ("static", "graph"):
        return StaticBackend(model, graphs=mode == "graph", cpp_layers=cpp)
    return CppBackend(model) if cpp else EagerBackend(model)
