"""The Generator's decode loop as one static step, replayed from a CUDA graph on GPUs.

A decode step of a wave (embed the last code, run every layer against the KV cache, CFG-mix
and sample) launches a few hundred small kernels; at batch 64 on a GPU the launches, not the
math, set the pace. :class:`StaticDecode` writes the step so that every tensor it touches
lives at a fixed address — the last token, the step counter ``t`` (a device tensor the step
itself increments), the per-row prompt lengths and slots, the ``[T, R]`` seed table and the
``[R, T]`` output — so the whole step can be captured once as a CUDA graph and replayed
``T - 1`` times with no host work but the replay call.

Modes (``Generator(decode_mode=...)``; the backend each picks: :mod:`.backends`):

* ``"eager"``: no static step (the C++ wave loop for a float32 CPU model, else the plain
  Python loop);
* ``"static"``: this module's static step run eagerly — exactly what a graph captures, on
  any device (tests compare it with ``"eager"`` on CPU);
* ``"graph"``: the static step captured as a ``torch.cuda.CUDAGraph`` (CUDA default). The
  first wave of a shape runs step 1 eagerly on a side stream (Triton compiles, cuBLAS
  warms up), captures step 2, replays the rest; later waves of the same shape replay at
  once. Graphs are kept per (rows, cache length, sampling settings), least recently used
  first out beyond :data:`MAX_GRAPHS`.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import torch

DECODE_MODES = ("auto", "eager", "static", "graph")
MAX_GRAPHS = 8


def resolve_decode_mode(mode: str, device: torch.device) -> str:
    """``"auto"`` -> ``"graph"`` on CUDA, ``"eager"`` elsewhere; validates explicit modes."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"decode_mode='graph' captures a CUDA graph and needs a CUDA model, got device {device} "
                         "(use 'static' to run the same static step eagerly)")
    return mode


@dataclasses.dataclass
class DecodeState:
    """Fixed-address tensors one decode step reads and writes.

    ``R`` sampled rows, ``rows`` = ``2R`` with CFG (else ``R``) cache rows, ``T`` tokens.
    """

    tok: torch.Tensor         # int64 [R]: the code produced last (input of the next step)
    t: torch.Tensor           # int64 [1]: index of the code this step produces (1..T-1)
    base: torch.Tensor        # int64 [rows]: prompt length of each cache row
    slot0: torch.Tensor       # int64 [rows]: cache slot of each row's first image token
    step_seeds: torch.Tensor  # int64 [T, R]: sampling seed of row r at step t
    out: torch.Tensor         # int64 [R, T]: the codes
    lp: torch.Tensor | None = None  # float32 [R, T]: their log-probs, when the wave records them

    @classmethod
    def empty(cls, R: int, rows: int, T: int, device: torch.device, with_lp: bool = False) -> "DecodeState":
        z = dict(dtype=torch.long, device=device)
        return cls(tok=torch.zeros(R, **z), t=torch.ones(1, **z), base=torch.zeros(rows, **z),
                   slot0=torch.zeros(rows, **z), step_seeds=torch.zeros(T, R, **z), out=torch.zeros(R, T, **z),
                   lp=torch.zeros(R, T, dtype=torch.float32, device=device) if with_lp else None)

    def load(self, first: torch.Tensor, base: torch.Tensor, slot0: torch.Tensor, step_seeds: torch.Tensor,
             first_lp: torch.Tensor | None = None) -> None:
        """Start a wave: ``first`` ``[R]`` is code 0 (from the prefill's last hidden state),
        ``first_lp`` its log-prob (required when the state records log-probs)."""
        self.tok.copy_(first)
        self.t.fill_(1)
        self.base.copy_(base)
        self.slot0.copy_(slot0)
        self.step_seeds.copy_(step_seeds)
        self.out[:, 0] = first
        if self.lp is not None:
            self.lp[:, 0] = first_lp


def decode_step(model, cache, state: DecodeState, cfg: bool,
                pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], layers: Callable | None = None) -> None:
    """One static step: code ``t - 1`` in, code ``t`` out (``state.out[:, t]``), ``t += 1``.

    ``layers(embeds, positions, cache, slot_mapping, cache_seqlens) -> hidden`` runs the layer
    stack (default ``model.decode_step``; a decode backend passes its own).

    ``pick(hidden [rows, H], seeds [R]) -> int64 [R]`` turns the final hidden states into
    codes (CFG mix + sampling or argmax); when ``state.lp`` is set it returns
    ``(codes, float32 [R] log-probs)`` and the log-probs go to ``state.lp[:, t]``. No host
    synchronisation, no allocation that depends on ``t``: safe to capture in a CUDA graph.
    """
    emb = model.embed_image_codes(state.tok.clamp(min=0))  # -1: the previous step's logits were not finite
    if cfg:
        emb = torch.cat([emb, emb])
    prev = state.t - 1
    pos = state.base + prev
    h = (layers or model.decode_step)(emb, pos, cache, state.slot0 + prev, (pos + 1).to(torch.int32))
    picked = pick(h, state.step_seeds.index_select(0, state.t).view(-1))
    if state.lp is not None:
        tok, lp = picked
        state.lp.index_copy_(1, state.t, lp[:, None])
    else:
        tok = picked
    state.out.index_copy_(1, state.t, tok[:, None])
    state.tok.copy_(tok)
    state.t.add_(1)


class StaticDecode:
    """Runs waves' decode loops through :func:`decode_step`, eagerly or from cached CUDA graphs."""

    def __init__(self, graphs: bool):
        self.graphs = graphs
        self._cache: collections.OrderedDict[tuple, tuple[DecodeState, torch.cuda.CUDAGraph | None]] = \
            collections.OrderedDict()

    def clear(self) -> None:
        """Drop every captured graph and its buffers."""
        self._cache.clear()

    def run(self, key: tuple, model, cache, cfg: bool, pick, first: torch.Tensor, base: torch.Tensor,
            slot0: torch.Tensor, step_seeds: torch.Tensor, on_step: Callable[[], None] | None = None,
            first_lp: torch.Tensor | None = None, layers: Callable | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode codes ``1..T-1`` of one wave -> (int64 ``[R, T]`` codes, float32 ``[R, T]``
        log-probs or None), fresh tensors.

        ``key`` must change whenever anything the step bakes in changes (shapes, cache view,
        sampling settings, whether log-probs are recorded); ``first`` ``[R]`` is code 0 and
        ``first_lp`` its log-prob (given iff ``pick`` returns log-probs), ``step_seeds`` ``[T, R]``,
        ``layers`` the step's layer stack (see :func:`decode_step`).
        """
        R, T = step_seeds.shape[1], step_seeds.shape[0]
        entry = self._cache.get(key)
        if entry is None:
            state = DecodeState.empty(R, base.shape[0], T, first.device, with_lp=first_lp is not None)
            entry = (state, None)
        else:
            self._cache.move_to_end(key)
        state, graph = entry
        if (state.lp is None) != (first_lp is None):
            raise ValueError("StaticDecode.run: the graph key must say whether log-probs are recorded")
        state.load(first, base, slot0, step_seeds, first_lp)

        def step() -> None:
            decode_step(model, cache, state, cfg, pick, layers)

        done = 1
        if self.graphs and graph is None and T > 2:
            graph = self._capture(step)  # runs step 1 for real, captures (does not run) the next
            done = 2
            if on_step is not None:
                on_step()
        if self.graphs:
            self._cache[key] = (state, graph)
            while len(self._cache) > MAX_GRAPHS:
                self._cache.popitem(last=False)
        for _ in range(done, T):
            if graph is not None:
                graph.replay()
            else:
                step()
            if on_step is not None:
                on_step()
        return state.out.clone(), None if state.lp is None else state.lp.clone()

    @staticmethod
    def _capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream, as torch.cuda.graphs asks: Triton JIT compiles and cuBLAS
        # workspaces happen here, outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture right after a ZeRO-3 / NCCL collective on another thread's
        # stream must not invalidate it (global mode flags any concurrent CUDA call)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        return graph
