#!/usr/bin/env python
"""Training entry point.

    python train.py --config configs/demo_sft.yaml [key=value ...] [--resume auto|PATH]
    deepspeed --num_gpus 8 train.py --config configs/janus_pro_1b_sft.yaml output_dir=runs/x

The stage (``sft``, ``rl``) comes from the config's ``stage`` key. Overrides are dotted
``section.key=value`` pairs, parsed as YAML. Any configuration or input problem prints
one line (``error: ...``) to stderr and exits with status 2 (config) or 1 (run). On a GPU
machine the run's memory plan (``pgen plan``, :mod:`pgen_engine.training.plan`) is checked
first: a launch that cannot fit its GPUs exits with status 3 and one line naming the phase
(``PGEN_PLAN=0`` skips the check). Ctrl-C is one ``error: interrupted`` line and status 130.
SIGTERM (a scheduler's preemption, the DeepSpeed launcher's stop) during the step loop
finishes the step, writes a resumable checkpoint on every rank and exits with status 143
and one ``error:`` line; elsewhere it stops at once with the same status.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgen_engine trainer (DeepSpeed)")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest checkpoint in output_dir, if any), a checkpoint folder, or a run's "
                   "output_dir / checkpoints folder (its latest checkpoint)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 output_dir=/tmp/run")
    # intermixed: overrides may come before and after --resume (plain parse_args stops the
    # positional list at the first option and refuses every override after it)
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # late imports: `train.py --help` answers without loading torch / DeepSpeed
    from pgen_engine.config import ConfigError, load_config
    from pgen_engine.errors import PgenUserError, one_line
    from pgen_engine.termination import EXIT_STATUS, Terminated, raise_on_sigterm, restore_sigterm
    from pgen_engine.training.distributed import leave_after_failure, shutdown
    from pgen_engine.training.plan import PlanOverflowError, preflight
    from pgen_engine.training.stages import run_stage

    previous_sigterm = raise_on_sigterm()
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, args.config)  # on a GPU machine: refuse a launch whose memory plan does not fit
        run_stage(cfg, resume=args.resume)
        shutdown()  # every rank leaves the group together (see distributed.shutdown)
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except PlanOverflowError as e:  # on a GPU machine: the launch's memory plan does not fit
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 3
    except PgenUserError as e:  # one readable line for input/run errors; a traceback for bugs
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not DeepSpeed's / autograd's whole stack
        print("error: interrupted; complete checkpoints in output_dir/checkpoints are kept (continue with "
              "--resume auto)", file=sys.stderr)
        return 130
    except Terminated as e:  # SIGTERM; inside the step loop after a resumable checkpoint (Trainer.run)
        hint = " (continue with --resume auto)" if e.checkpoint else (
            "; complete checkpoints in output_dir/checkpoints are kept (continue with --resume auto)")
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        return EXIT_STATUS
    finally:
        restore_sigterm(previous_sigterm)
        leave_after_failure()  # a no-op after shutdown(); on a failure, no abort in teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())
