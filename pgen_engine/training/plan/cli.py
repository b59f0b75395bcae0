"""``pgen plan``: print the memory plan of a config; the exit status says whether it fits."""
from __future__ import annotations

import sys

from pgen_engine.config import ConfigError, load_config
from pgen_engine.models.janus_config import CheckpointError
from pgen_engine.training.plan.planner import plan_run
from pgen_engine.training.plan.report import format_plan


EXIT_FITS, EXIT_CONFIG_ERROR, EXIT_DOES_NOT_FIT = 0, 2, 3


def _cmd_plan(args) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_run(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, config_name=args.config)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pgen plan: error: {msg}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(format_plan(plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def register(subparsers) -> None:
    """Add ``pgen plan`` to the ``pgen`` command."""
    p = subparsers.add_parser(
        "plan", help="size a training run per GPU (exit 0: fits, 3: does not fit, 2: bad config)",
        description="Memory per GPU of each phase of a run (SFT step; RL rollout, log-probs, update), computed "
                    "from the model built on the meta device, the DeepSpeed config the run builds and the "
                    "Generator's KV cache. Exit status 0 when the peak fits, 3 when it does not, 2 on a bad "
                    "config or key.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (ranks); default 8")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB; default 80")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")
    p.set_defaults(func=_cmd_plan)
