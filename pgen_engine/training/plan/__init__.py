"""Memory plan of a run: device bytes per GPU in each phase, from the code that will run.

``pgen plan --config CONFIG [--gpus N] [--gpu-mem GIB] [key=value ...]`` and the start-up
check of ``train.py`` both call :func:`plan_run`. Nothing here is a parallel formula of
the model: every number comes from the real objects, built on the ``meta`` device (shapes
and dtypes, no storage):

* **model** — :class:`pgen_engine.models.JanusModel` from the checkpoint's ``config.json``
  (or a reference geometry, see :func:`resolve_model_config`), cast to the run's precision,
  with the trainable groups set by :func:`pgen_engine.training.engine.set_trainable`.
* **ZeRO states** — per parameter, from the DeepSpeed config the run builds
  (:func:`pgen_engine.training.engine.build_deepspeed_config`): stage, ``offload_optimizer`` /
  ``offload_param``, bucket sizes and the persistence threshold; see :func:`zero_states`.
* **rollout** — all weights gathered (:func:`pgen_engine.training.engine.gathered_module`
  materialises every parameter), plus the KV cache the rollout's
  :class:`pgen_engine.generation.Generator` allocates for the rows this rank generates
  (:func:`pgen_engine.training.rollout.generator_rows`), constructed on ``meta``
  (:func:`rollout_kv_bytes`), plus the measured prefill / decode-logits working set.
* **activations** — the training objective's forward and backward run on ``meta``
  tensors at the real micro-batch and sequence length, through the fused GPU ops' fake
  (shape) kernels, under a dispatch mode that tracks live storage bytes
  (:func:`measure_peak_bytes`); with and without activation checkpointing.

Sequence lengths come from the real :class:`pgen_engine.data.prompts.PromptBuilder`: the
checkpoint's text tokenizer when the checkpoint is on disk, else byte-level tokens (an
upper bound: a BPE token covers at least one byte); titles are the dataset's longest when
the dataset is readable, else :data:`~pgen_engine.training.plan.sequence.TITLE_BUDGET_BYTES` bytes each.

Not measured (a fixed :data:`~pgen_engine.training.plan.planner.RUNTIME_RESERVE_BYTES` covers
them): the CUDA context, NCCL buffers, CUDA-graph pools and allocator fragmentation.

Modules: :mod:`.model` (the model on meta), :mod:`.zero` (ZeRO states), :mod:`.activations`
(measuring on meta), :mod:`.rollout_kv` (the rollout's KV cache), :mod:`.sequence` (prompt
lengths), :mod:`.planner` (:func:`plan_run`: the phases), :mod:`.report` (result types, the
table), :mod:`.startup` (``train.py``'s check), :mod:`.cli` (``pgen plan``).
"""
from __future__ import annotations

from pgen_engine.training.plan.activations import measure_peak_bytes, objective_peak_bytes, rollout_work_bytes
from pgen_engine.training.plan.cli import register
from pgen_engine.training.plan.model import meta_model, reference_geometry, resolve_model_config, unique_params
from pgen_engine.training.plan.planner import plan_run
from pgen_engine.training.plan.report import GIB, MemoryPlan, PhasePlan, PlanError, PlanOverflowError, format_plan
from pgen_engine.training.plan.rollout_kv import rollout_kv_bytes
from pgen_engine.training.plan.sequence import history_mode, prompt_tokens
from pgen_engine.training.plan.startup import launch_gpu_bytes, preflight, startup_check
from pgen_engine.training.plan.zero import ZeroStates, zero_states

__all__ = [
    "GIB", "MemoryPlan", "PhasePlan", "PlanError", "PlanOverflowError", "ZeroStates", "format_plan",
    "history_mode", "launch_gpu_bytes", "measure_peak_bytes", "meta_model", "objective_peak_bytes", "plan_run",
    "preflight", "prompt_tokens", "reference_geometry", "register", "resolve_model_config", "rollout_kv_bytes",
    "rollout_work_bytes", "startup_check", "unique_params", "zero_states",
]
