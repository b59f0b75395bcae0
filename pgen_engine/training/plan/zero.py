"""DeepSpeed ZeRO model-state bytes per rank (parameter shards, gradients, optimizer states,
buckets) from the DeepSpeed config the run builds."""
from __future__ import annotations

import dataclasses
import math

import torch

from pgen_engine.training.plan.model import unique_params


# DeepSpeed ZeRO-3 optimizer sub-group (its default ``sub_group_size``): the step makes an
# fp32 copy of this many gradient elements of the rank's partition at a time.
ZERO3_SUB_GROUP_SIZE = 1_000_000_000
# fp32 master weights + AdamW exp_avg + exp_avg_sq, per trainable element.
OPTIMIZER_BYTES_PER_ELEMENT = 12


@dataclasses.dataclass(frozen=True)
class ZeroStates:
    """Per-rank device bytes of a DeepSpeed engine's model states (0 where offloaded).

    Attributes:
        param_shards: the rank's partition of every parameter (ZeRO-3; full params below 3).
        persistent_params: ZeRO-3 parameters at or below the persistence threshold, kept whole.
        grads: the rank's gradient partition (the trainable parameters' dtype).
        optimizer: fp32 master weights + AdamW moments of the rank's trainable partition.
        reduce_bucket: the gradient reduce bucket (``reduce_bucket_size`` elements).
        gather_working_set: parameters gathered during a forward/backward: the largest
            module's own parameters plus the prefetch bucket.
        step_fp32_grads: the fp32 gradient copy the optimizer step makes per sub-group.
        full_weights: every parameter materialised (the rollout's gathered copy).
    """

    param_shards: int
    persistent_params: int
    grads: int
    optimizer: int
    reduce_bucket: int
    gather_working_set: int
    step_fp32_grads: int
    full_weights: int


def zero_states(model: torch.nn.Module, ds_config: dict, world: int) -> ZeroStates:
    """Model-state bytes per rank under ``ds_config`` (what ``build_engine`` hands DeepSpeed).

    ZeRO-3 partitions every parameter tensor into ``world`` equal pieces (padded), each
    rank keeping one; stage 2 partitions gradients and optimizer states only; stage 0
    keeps everything whole (bf16 then accumulates fp32 gradients). Offloaded states are
    on the host and count 0 here.
    """
    z = ds_config["zero_optimization"]
    stage = int(z["stage"])
    off_opt = "offload_optimizer" in z
    off_par = "offload_param" in z
    params = unique_params(model)
    esize = params[0][1].element_size()

    def shard(n: int) -> int:
        return math.ceil(n / world)

    train = [p.numel() for _, p in params if p.requires_grad]
    everything = sum(p.numel() for _, p in params)
    part_train = sum(shard(n) for n in train) if stage >= 2 else sum(train)
    if stage == 3:
        thresh = int(z.get("stage3_param_persistence_threshold", 100_000))
        param_shards = 0 if off_par else sum(shard(p.numel()) for _, p in params) * esize
        persistent = sum(p.numel() for _, p in params if p.numel() <= thresh) * esize
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        working = (largest + int(z.get("stage3_prefetch_bucket_size", 50_000_000))) * esize
    else:
        param_shards, persistent, working = everything * esize, 0, 0
    grad_bytes = esize if stage >= 2 or esize == 4 else 4  # stage 0 bf16: fp32 accumulation
    grads = 0 if off_opt else part_train * grad_bytes
    optimizer = 0 if off_opt else part_train * OPTIMIZER_BYTES_PER_ELEMENT
    bucket = int(z.get("reduce_bucket_size", 0)) * esize if stage >= 2 else 0
    step = 0 if off_opt or esize == 4 else min(part_train, ZERO3_SUB_GROUP_SIZE) * 4
    return ZeroStates(param_shards, persistent, grads, optimizer, bucket, working, step, everything * esize)
