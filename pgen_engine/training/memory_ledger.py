"""Memory ledger: bytes held per RL phase, logged every step.

An RL step has four phases — ``rollout`` (gathered weights + KV cache), ``reward``,
``logprobs`` (old / reference log-probs, no grad) and ``update`` (activations, gradients,
optimizer states). The ledger records, per phase, the bytes of what that phase holds
(computed from the tensors themselves, so it works on CPU) and, on CUDA, the peak
allocated bytes seen inside the phase (``torch.cuda.max_memory_allocated`` after a reset
at phase entry).

Metric keys: ``mem/<phase>_<what>_bytes`` (e.g. ``mem/rollout_kv_bytes``,
``mem/rollout_gathered_weights_bytes``, ``mem/update_activations_bytes``,
``mem/update_optimizer_states_bytes``), ``mem/<phase>_peak_bytes`` on CUDA, and
``mem/total_bytes`` (the sum of the largest phase's entries — what the step needed at
once, by the ledger's own accounting). ``mem/live_tensor_bytes`` (optional, every
``scan_every`` steps) is the bytes of all tensors reachable from Python after the step:
it must not grow step over step, which is how tests check for leaks on CPU.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterable, Iterator

import torch

from .engine import zero3_shards, zero_master_tensors

PHASES = ("rollout", "reward", "logprobs", "update")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensor storages (views of one storage count once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):  # meta / sparse / fake tensors hold no plain storage
            continue
        if key[0] == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def module_param_bytes(module: torch.nn.Module) -> int:
    """Bytes currently materialised by ``module``'s parameters on this rank.

    Under ZeRO-3 a partitioned parameter's ``.data`` is empty, so this is the gathered
    size only while the parameters are gathered; otherwise it is ~0 (the shards live in
    ``ds_tensor``, counted by :func:`zero3_shard_bytes`).
    """
    return tensor_bytes(p.data for p in module.parameters())


def zero3_shard_bytes(module: torch.nn.Module) -> int:
    """Bytes of this rank's ZeRO-3 parameter shards (0 for non-ZeRO-3 parameters)."""
    return tensor_bytes(zero3_shards(module))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of an optimizer's state tensors (Adam moments, fp32 master copies when the
    wrapper exposes them as ``fp32_partitioned_groups_flat`` / ``single_partition_of_fp32_groups``).

    Accepts a ``torch.optim.Optimizer``, a DeepSpeed ZeRO optimizer, or None (0 bytes).
    """
    if optimizer is None:
        return 0
    tensors: list[torch.Tensor] = []
    inner = getattr(optimizer, "optimizer", None)
    for opt in (optimizer, inner):
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            for s in state.values():
                if isinstance(s, dict):
                    tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    tensors += zero_master_tensors(optimizer)
    return tensor_bytes(tensors)


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector (slow; tests)."""
    gc.collect()
    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                tensors.append(obj)
        except ReferenceError:  # weakref proxies of dead objects
            continue
    return tensor_bytes(tensors)


class SavedTensorMeter:
    """Context manager counting bytes autograd saves for backward (the activations).

    Uses ``torch.autograd.graph.saved_tensors_hooks``; parameters saved by linear layers
    are storages that already exist and are excluded via ``exclude`` storages.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        self._seen: set[int] = set()
        self.bytes = 0
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in self._exclude and ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._seen.clear()


class MemoryLedger:
    """Per-step, per-phase byte accounting.

    Usage::

        ledger.begin_step()
        with ledger.phase("rollout"):
            ...
            ledger.record("rollout", "kv", cache_bytes)
        metrics.update(ledger.metrics())
    """

    def __init__(self, device: torch.device | str = "cpu", *, scan_every: int = 0):
        self.device = torch.device(device)
        self.scan_every = int(scan_every)
        self._step = 0
        self._bytes: dict[str, dict[str, int]] = {}
        self._peaks: dict[str, int] = {}

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def begin_step(self) -> None:
        """Forget the previous step's entries."""
        self._step += 1
        self._bytes = {}
        self._peaks = {}

    def record(self, phase: str, what: str, nbytes: int) -> None:
        """Set bytes held by ``what`` during ``phase`` (the max if recorded twice)."""
        if phase not in PHASES:
            raise ValueError(f"MemoryLedger.record: phase must be one of {PHASES}, got {phase!r}")
        if nbytes < 0:
            raise ValueError(f"MemoryLedger.record: negative bytes {nbytes} for {phase}/{what}")
        d = self._bytes.setdefault(phase, {})
        d[what] = max(int(nbytes), d.get(what, 0))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Scope of one phase; on CUDA measures the phase's peak allocated bytes."""
        if name not in PHASES:
            raise ValueError(f"MemoryLedger.phase: phase must be one of {PHASES}, got {name!r}")
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            if self.on_cuda:
                torch.cuda.synchronize(self.device)
                self._peaks[name] = max(self._peaks.get(name, 0), int(torch.cuda.max_memory_allocated(self.device)))

    def phase_total(self, phase: str) -> int:
        """Sum of the bytes recorded for ``phase`` this step."""
        return sum(self._bytes.get(phase, {}).values())

    def metrics(self) -> dict[str, float]:
        """Flat ``mem/...`` metrics of the current step (see the module docstring)."""
        out: dict[str, float] = {}
        for phase in PHASES:
            for what, b in self._bytes.get(phase, {}).items():
                out[f"mem/{phase}_{what}_bytes"] = float(b)
            if phase in self._peaks:
                out[f"mem/{phase}_peak_bytes"] = float(self._peaks[phase])
        out["mem/total_bytes"] = float(max((self.phase_total(p) for p in PHASES), default=0))
        if self.scan_every and self._step % self.scan_every == 0:
            out["mem/live_tensor_bytes"] = float(live_tensor_bytes())
        return out
