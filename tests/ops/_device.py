"""The device the op tests run the ops under test on.

``PGEN_TEST_DEVICE=cuda`` runs the compiled Triton kernels on the GPU (TRITON_INTERPRET left
unset); the default ``cpu`` runs them in Triton's CPU interpreter. Tests draw their random
inputs on the CPU (seeded generators stay reproducible), move what an op under test receives
to ``DEV``, and may keep float64 references on the CPU (results come back with ``.cpu()``).
"""
from __future__ import annotations

import os

import torch

CPU = torch.device("cpu")
DEV = torch.device("cuda" if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cuda" else "cpu")
