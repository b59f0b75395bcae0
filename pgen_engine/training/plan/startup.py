"""``train.py``'s start-up check: plan the launch on its GPUs and refuse one that does not fit."""
from __future__ import annotations

import os

import torch

from pgen_engine import envs
from pgen_engine.config import RunConfig
from pgen_engine.training.plan.planner import plan_run
from pgen_engine.training.plan.report import GIB, MemoryPlan, PlanOverflowError


def startup_check(cfg: RunConfig, *, world_size: int, gpu_bytes: int, config_name: str) -> MemoryPlan:
    """``train.py``'s start-up check: the plan for this launch, or PlanOverflowError (one line)."""
    plan = plan_run(cfg, gpus=world_size, gpu_mem_gib=gpu_bytes / GIB, config_name=config_name)
    line = plan.overflow_line()
    if line is not None:
        raise PlanOverflowError(line)
    return plan


def launch_gpu_bytes() -> int | None:
    """Memory of this process's GPU (``LOCAL_RANK``), or None on a machine without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory)


def preflight(cfg: RunConfig, config_name: str, *, gpu_bytes: int | None = None) -> MemoryPlan | None:
    """``train.py``'s start-up check of a launch: the plan, or PlanOverflowError (one line).

    Plans for ``WORLD_SIZE`` ranks (1 without a launcher) on GPUs of ``gpu_bytes`` (default:
    this process's GPU). Skipped (None) without CUDA — CPU runs are fp32 demos the plan
    does not describe — and when ``PGEN_PLAN=0`` (to run a config the plan rejects anyway).
    """
    if not envs.get("PGEN_PLAN"):
        return None
    if gpu_bytes is None:
        gpu_bytes = launch_gpu_bytes()
        if gpu_bytes is None:
            return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return startup_check(cfg, world_size=world, gpu_bytes=gpu_bytes, config_name=config_name)
