"""The frozen reference policy of the RL KL term, and where it runs.

``rl.reference`` picks the placement: ``"auto"`` (the default) is the training device —
the GPU when there is one (a full fp32 forward on the host every step would dominate a
GPU run), the CPU otherwise; ``"cpu"``, ``"device"`` and ``"partitioned"`` (a ZeRO-3
inference engine, each rank holding a shard) force one.
"""
from __future__ import annotations

import copy

import torch

from pgen_engine.models import load_model

from .engine import build_inference_engine, zero3_shards
from .memory_ledger import module_param_bytes, tensor_bytes


def resolve_reference_mode(mode: str, device: torch.device) -> str:
    """``"auto"`` -> ``"device"`` on CUDA, ``"cpu"`` elsewhere; any other mode unchanged."""
    if mode == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    return mode


class ReferencePolicy:
    """Frozen reference model for the KL term.

    Modes:
        ``"cpu"``: a frozen copy kept on the CPU; its forward runs on the CPU (cheap for
            small models, never occupies device memory).
        ``"device"``: a frozen copy on the policy's device (small models, fastest).
        ``"partitioned"``: a ZeRO-3 inference engine (no optimizer) around an
            :class:`~pgen_engine.training.engine.ObjectiveModule`: each rank holds only a shard;
            DeepSpeed gathers layer by layer during :meth:`forward`.
    Build with :meth:`from_checkpoint` (or :meth:`from_policy`) *before* the policy is
    wrapped by DeepSpeed. Run objectives with :meth:`forward` (``fn(model, *args)``), which
    goes through the engine when partitioned.
    """

    MODES = ("cpu", "device", "partitioned")
    REQUESTS = ("auto", *MODES)

    def __init__(self, module: torch.nn.Module, mode: str, engine=None):
        if mode not in self.MODES:
            raise ValueError(f"ReferencePolicy: mode must be one of {self.MODES}, got {mode!r}")
        if mode == "partitioned" and engine is None:
            raise ValueError("ReferencePolicy: mode 'partitioned' needs its DeepSpeed engine")
        self.module, self.mode, self.engine = module, mode, engine
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)

    def forward(self, fn, *args):
        """``fn(reference_model, *args)`` — through the ZeRO-3 engine when partitioned."""
        if self.engine is not None:
            return self.engine(fn, *args)
        return fn(self.module, *args)

    @classmethod
    def from_checkpoint(cls, model_dir, mode: str, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", ds_config: dict | None = None) -> "ReferencePolicy":
        """Load a frozen reference from a Hugging Face Janus directory (e.g. the SFT run's ``final/``).

        ``mode`` may be ``"auto"`` (see :func:`resolve_reference_mode` with ``device``).
        """
        if mode not in cls.REQUESTS:
            raise ValueError(f"ReferencePolicy: mode must be one of {cls.REQUESTS}, got {mode!r}")
        mode = resolve_reference_mode(mode, torch.device(device))
        if mode == "cpu":
            # the CPU copy computes in fp32 (bf16 matmuls on CPU are slow and add error)
            return cls(load_model(model_dir, device="cpu", dtype=torch.float32), mode)
        model = load_model(model_dir, device="cpu", dtype=dtype)
        if mode == "device":
            return cls(model.to(device), mode)
        return cls._partitioned(model, ds_config)

    @classmethod
    def _partitioned(cls, model: torch.nn.Module, ds_config: dict | None) -> "ReferencePolicy":
        if ds_config is None:
            raise ValueError("ReferencePolicy: mode 'partitioned' needs the DeepSpeed config (ds_config)")
        engine = build_inference_engine(model, ds_config)
        return cls(engine.module.model, "partitioned", engine)

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, mode: str, *, device: torch.device | str | None = None,
                    ds_config: dict | None = None) -> "ReferencePolicy":
        """Copy ``policy`` (not yet DeepSpeed-wrapped) into a frozen reference (``mode`` may be "auto")."""
        if mode not in cls.REQUESTS:
            raise ValueError(f"ReferencePolicy: mode must be one of {cls.REQUESTS}, got {mode!r}")
        mode = resolve_reference_mode(mode, torch.device(device) if device is not None else policy.device)
        ref = copy.deepcopy(policy)
        if mode == "cpu":
            return cls(ref.to("cpu"), mode)
        if mode == "device":
            return cls(ref.to(device or policy.device), mode)
        return cls._partitioned(ref, ds_config)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.mode == "cpu" else self.module.device

    def nbytes(self) -> int:
        """Bytes this rank holds for the reference (shards only when partitioned)."""
        if self.mode == "partitioned":
            return tensor_bytes(zero3_shards(self.module))
        return module_param_bytes(self.module)
