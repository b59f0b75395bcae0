"""One training lifecycle for every stage: the :class:`Trainer`.

``Trainer(cfg, stage).run(resume)`` does, once for all stages and in this order:

1. distributed init (:func:`.distributed.init_distributed`) and the stage's world checks; the
   ``--resume`` checkpoint's world size, stage and config (refused when they differ; warnings when
   the LR schedule or the precision changes), or a fresh start's empty ``output_dir``;
2. the ``output_dir/.run.lock`` (rank 0, held to the end: one run per folder),
   ``output_dir/config.resolved.yaml`` (rank 0) and the per-rank torch seed;
3. data preparation (dataset, image tokenizer, token cache, initial model) and its hash
   (``sft_data.training_data_hash``: a resume on other data is refused);
4. engine build (:mod:`.engine`; the stage may build things that must exist before it,
   e.g. the RL reference model, in :meth:`Stage.before_engine`);
5. resume from ``--resume`` (checkpoint + the stage's client state);
6. the step loop: ``stage.before_step`` (optional), ``stage.train_step`` -> a metrics row,
   the non-finite guard on the gradient norm, ``metrics.jsonl`` + progress, periodic
   resumable checkpoints;
7. the final checkpoint, the Hugging Face export ``final/`` and ``summary.json``.

A stage (:class:`pgen_engine.training.sft.SFTStage`, :class:`pgen_engine.training.rl.RLStage`)
supplies only what differs: its ``train_step`` and its setup. Losses are checked with
:meth:`Trainer.check_finite` before backward, a collective check so that every rank
stops together; the run then stops with :class:`NonFiniteError` naming the last good
checkpoint, which is left untouched.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch

from pgen_engine import file_lock
from pgen_engine.config import ConfigError, RunConfig, TrainConfig, config_defaults, config_to_dict, dump_config
from pgen_engine.io_utils import atomic_write_json, atomic_write_text, folder_problem
from pgen_engine.models.checkpoint_writer import export_target_problem
from pgen_engine.termination import DeferredTermination, Terminated

from .checkpoints import (CHECKPOINTS, CONFIG_KEY, DATA_HASH_KEY, CheckpointWriteError, ResumeError, export_hf,
                          load_resumable, read_meta, save_resumable)
from .distributed import DistInfo, all_ranks_true, broadcast_object, init_distributed, on_main
from .engine import TrainEngine, build_engine, lr_lambda, require_deepspeed, resolve_precision
from .errors import stop_if_not_finite
from .init import check_init_geometry
from .metrics import MetricsLogger
from .resume import check_fresh_start, check_resume_config, check_resume_data, resolve_resume, set_aside_newer
from .sft_data import SFTData, prepare_sft_data, training_data_hash


def schedule_change(ckpt: Path, train: TrainConfig) -> str | None:
    """What resuming ``ckpt`` with another ``train.max_steps`` does to the LR schedule (warmup +
    cosine to ``max_steps``), or None when the steps it trained ran at the new schedule's rates.

    ``max_steps`` is a resumable change (more steps), but the cosine stretches with it: the
    resumed run is then neither the saved run nor what the new config gives from scratch."""
    meta = read_meta(ckpt)
    saved, step = ((meta.get(CONFIG_KEY) or {}).get("train") or {}).get("max_steps"), meta.get("step")
    if not isinstance(saved, int) or not isinstance(step, int) or saved == train.max_steps or saved < train.warmup_steps:
        return None
    old, new = lr_lambda(dataclasses.replace(train, max_steps=saved)), lr_lambda(train)
    if all(math.isclose(old(s), new(s), rel_tol=1e-9) for s in range(step + 1)):
        return None
    return (f"{ckpt}: resumed at step {step} with train.max_steps {saved} -> {train.max_steps}, which reshapes the LR "
            f"schedule: steps 1-{step} ran at the old one's rates, so this run is not what {train.max_steps} steps "
            f"from scratch give (lr at step {step + 1}: {train.lr * old(step):.3g} before, {train.lr * new(step):.3g} now)")


RUN_LOCK = ".run.lock"  # in output_dir, held (flock) by rank 0 of the run training there


class Stage:
    """What a training stage supplies to the :class:`Trainer` (override the hooks it needs).

    Attributes:
        name: the config's ``stage`` value.
        checkpoint_meta: extra fields written into every checkpoint's ``pgen_checkpoint.json``.
    """

    name = "stage"
    checkpoint_meta: dict[str, Any] = {}

    def check_world(self, cfg: RunConfig, dist: DistInfo) -> None:
        """Refuse impossible batch arithmetic / device requirements for this world (ConfigError)."""
        cfg.train.grad_accum_steps(dist.world_size)

    def engine_train_config(self, cfg: RunConfig) -> TrainConfig:
        """The ``train`` section the engine (batch sizes, LR schedule) is built from."""
        return cfg.train

    def offloads_states(self, cfg: RunConfig) -> bool:
        """True when the stage moves optimizer states off the device between phases."""
        return False

    def before_engine(self, trainer: "Trainer") -> None:
        """Called after data preparation, before the policy engine is built."""

    def setup(self, trainer: "Trainer", client: dict[str, Any]) -> None:
        """Called once the engine exists (and was resumed: ``client`` is the saved client state)."""

    def before_run(self, trainer: "Trainer") -> None:
        """Called before the first step of this invocation (after the metrics logger exists)."""

    def before_step(self, step: int) -> None:
        """Called before ``train_step(step)`` (0-based ``step``)."""

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer (SFT) or RL step; returns the metrics row (reduced over ranks)."""
        raise NotImplementedError(f"stage {self.name!r} does not implement train_step")

    def client_state(self) -> dict[str, Any]:
        """JSON/pickle-able state saved with each checkpoint and handed back to :meth:`setup`."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Stage-specific fields of ``summary.json``."""
        return {}


class Trainer:
    """Runs one stage of ``cfg`` to ``train.max_steps`` (see the module docstring).

    Attributes available to the stage after the corresponding lifecycle point:
        cfg, dist, out (``output_dir``), data (:class:`SFTData`), te (:class:`TrainEngine`),
        logger (:class:`MetricsLogger`), start_step, last_saved (last checkpoint folder or None).
    """

    def __init__(self, cfg: RunConfig, stage: Stage):
        self.cfg, self.stage = cfg, stage
        self.dist: DistInfo | None = None
        self.out = Path(cfg.output_dir)
        self.data: SFTData | None = None
        self.te: TrainEngine | None = None
        self.logger: MetricsLogger | None = None
        self.start_step = 0
        self.last_saved: Path | None = None
        self.data_hash = ""
        self._run_lock = None  # rank 0: the open output_dir/.run.lock while the run holds it

    # -- the guard, written once --------------------------------------------------
    def check_finite(self, value: float, what: str, step: int) -> None:
        """Raise NonFiniteError on every rank when ``value`` is not finite on any rank (collective)."""
        stop_if_not_finite(value, what, step,
                           f"stopping; last good checkpoint: {self.last_saved or 'none'} (left untouched)")

    def _save(self, step: int) -> None:
        self.last_saved = save_resumable(self.te.engine, self.out / CHECKPOINTS, step, self.stage.client_state(),
                                         self.dist, keep=self.cfg.train.keep_checkpoints,
                                         extra_meta={**self.stage.checkpoint_meta, CONFIG_KEY: config_to_dict(self.cfg),
                                                     DATA_HASH_KEY: self.data_hash, "precision": self.te.precision})

    def _stop_for_sigterm(self, done: int, saved: bool) -> None:
        """Write the step's resumable checkpoint (unless just written) and raise :class:`Terminated`."""
        if not saved:
            self._save(done)
        raise Terminated(f"stopped by SIGTERM after step {done} of {self.cfg.train.max_steps}: resumable "
                         f"checkpoint {self.last_saved} written",
                         checkpoint=str(self.last_saved))

    @staticmethod
    def _set_aside_newer(ckpt: Path) -> None:
        """Rank 0: move the checkpoints newer than the resumed ``ckpt`` aside (resume.set_aside_newer), with a warning."""
        try:
            moved = set_aside_newer(ckpt)
        except OSError as e:
            raise CheckpointWriteError(f"{ckpt.parent}: cannot move the checkpoints newer than the resumed {ckpt.name} "
                                       f"aside ({e.strerror or e}); resume the newest one (--resume auto) or free "
                                       "the folder") from e
        for p in moved:
            print(f"warning: resuming {ckpt.name}, older than {p.name}: that checkpoint belongs to the trajectory this "
                  f"run abandons and was moved to {p} (not resumed, not rotated; delete it when no longer needed)",
                  file=sys.stderr, flush=True)

    def _lock_output_dir(self) -> str | None:
        """Rank 0: hold ``output_dir/.run.lock`` (``flock``) until the run ends; the error line when
        another run holds it. Two runs in one folder (a job relaunched while the old one still runs)
        wrote the same ``.tmp-stepN`` folders, each deleting the other's half-written one."""
        fh = file_lock.hold(self.out / RUN_LOCK, "this training run")
        if fh is None:
            return (f"output_dir={self.out}: in use by another training run (it holds {self.out / RUN_LOCK}); "
                    "wait for that run to end (or stop it), or use another output_dir")
        self._run_lock = fh
        return None

    # -- lifecycle ------------------------------------------------------------------
    def run(self, resume: str | None = None) -> dict[str, Any]:
        """Train; returns the summary (rank 0's view), also written to ``output_dir/summary.json``.

        Raises:
            NonFiniteError: loss or gradient norm not finite (no checkpoint written for that step).
            DataPrepError, ConfigError, ResumeError: bad inputs, with one-line messages.
        """
        try:
            return self._run(resume)
        finally:
            if self._run_lock is not None:  # closing the file drops the flock
                self._run_lock.close()
                self._run_lock = None

    def _run(self, resume: str | None) -> dict[str, Any]:
        cfg, stage = self.cfg, self.stage
        require_deepspeed()  # before any work: a missing DeepSpeed is one line, not a late traceback
        # on every rank, so all of them stop; before data preparation, which writes under both
        folders = [("output_dir", self.out)]
        if cfg.data.work_dir:
            folders.append(("data.work_dir", Path(cfg.data.work_dir)))
        for key, folder in folders:
            problem = folder_problem(folder)
            if problem:
                raise ConfigError(f"{key}={folder}: {problem} (expected the run's "
                                  f"{'output' if key == 'output_dir' else 'data work'} folder)")
        problem = export_target_problem(self.out / "final")
        if problem:  # else every step trains and the export at the end refuses to replace it
            raise ConfigError(f"{self.out / 'final'}: {problem}, where this run exports its model; move or delete it")
        if cfg.model.checkpoint is None:  # a model built from model.init after data preparation
            check_init_geometry(cfg.model.init)
        self.dist = dist = init_distributed()
        stage.check_world(cfg, dist)
        if resolve_precision(cfg.deepspeed, dist.device.type) == "bf16" and dist.device.type != "cuda":
            # build_engine refused it too, but with a ValueError traceback after data preparation
            raise ConfigError(f"deepspeed.precision=bf16: needs a CUDA device, this run is on {dist.device.type}; "
                              "use fp32 (or auto)")
        ckpt = resolve_resume(resume, self.out)
        if ckpt is None:  # every rank: the check reads only the file system
            check_fresh_start(self.out, resume_auto=resume is not None)
            metrics = self.out / "metrics.jsonl"
            if resume is not None and dist.is_main and metrics.is_file() and metrics.stat().st_size:
                # a run stopped before its first complete checkpoint: its logged steps are trained again
                print(f"warning: --resume {resume}: no complete checkpoint under {self.out / CHECKPOINTS}, though "
                      f"{metrics} holds a run's steps; starting from step 0 (those rows are replaced)",
                      file=sys.stderr, flush=True)
        elif ckpt.resolve().parent != (self.out / CHECKPOINTS).resolve():  # another folder's checkpoint
            check_fresh_start(self.out, resumed_from=ckpt)
        if ckpt is not None:  # before config.resolved.yaml is rewritten: the folder keeps describing its weights
            meta = read_meta(ckpt)
            saved_world = meta.get("world_size", dist.world_size)
            if saved_world != dist.world_size:  # load_resumable says so too, but only after data and model loading
                raise ResumeError(f"{ckpt}: saved with world_size={saved_world}, this run has {dist.world_size}; "
                                  "resume with the same number of ranks")
            check_resume_config(ckpt, config_to_dict(cfg), config_defaults(cfg))
            notes = [schedule_change(ckpt, cfg.train)]
            precision = resolve_precision(cfg.deepspeed, dist.device.type)
            if meta.get("precision", precision) != precision:  # deepspeed.precision=auto on another device
                notes.append(f"{ckpt}: trained in {meta['precision']}, this run trains in {precision} "
                             f"(deepspeed.precision={cfg.deepspeed.precision} on {dist.device.type}): its weights and "
                             "optimizer states are converted, and the run's numerics are not the saved run's")
            for note in notes:
                if note and dist.is_main:
                    print(f"warning: {note}", file=sys.stderr, flush=True)
        failure = busy = None
        if dist.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                busy = self._lock_output_dir()
                if busy is None:
                    atomic_write_text(self.out / "config.resolved.yaml", dump_config(cfg))
            except OSError as e:  # what folder_problem cannot foresee (a read-only or virtual file system)
                failure = f"output_dir={self.out}: cannot be created or written ({e.strerror or e})"
        # every rank raises rank 0's failure: a rank left alone would wait in the next collective
        failure, busy = broadcast_object((failure, busy))
        if failure is not None:
            raise ConfigError(failure)
        if busy is not None:
            raise ResumeError(busy)
        torch.manual_seed(cfg.seed + dist.rank)
        self.data = prepare_sft_data(cfg, dist)
        # every rank: the same files give the same hash
        self.data_hash = training_data_hash(self.data, with_model=cfg.model.checkpoint is not None)
        if ckpt is not None:  # before the engine is built: a refusal costs no model load
            check_resume_data(ckpt, self.data_hash)
        stage.before_engine(self)
        self.te = build_engine(stage.engine_train_config(cfg), cfg.deepspeed, self.data.model_dir, dist,
                               offload_states=stage.offloads_states(cfg))
        client: dict[str, Any] = {}
        if ckpt is not None:
            client = load_resumable(self.te.engine, ckpt, dist)
            self.start_step = int(client["step"])
            if ckpt.resolve().parent == (self.out / CHECKPOINTS).resolve():  # once every check passed and it loaded
                on_main(lambda: self._set_aside_newer(ckpt.resolve()), dist.is_main)
        self.last_saved = ckpt
        stage.setup(self, client)
        t = cfg.train
        self.logger = MetricsLogger(self.out, is_main=dist.is_main, total_steps=t.max_steps,
                                    start_step=self.start_step, progress=cfg.logging.progress,
                                    tensorboard=cfg.logging.tensorboard)
        try:
            # SIGTERM (preemption, the launcher's stop) ends the run at the next step boundary
            # with a resumable checkpoint; during the final save / export it is let finish
            with DeferredTermination() as term:
                stage.before_run(self)
                for step in range(self.start_step, t.max_steps):
                    done = step + 1
                    stage.before_step(step)
                    row = stage.train_step(step)
                    grad_norm = self.te.engine.get_global_grad_norm()
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    self.check_finite(row.get("grad_norm", 0.0), "gradient norm", done)
                    if done % t.log_every == 0 or done == t.max_steps or any(k.startswith("eval/") for k in row):
                        self.logger.log(row)
                    self.logger.advance()
                    saved = bool(t.save_every and done % t.save_every == 0 and done < t.max_steps)
                    if saved:
                        self._save(done)
                    # collective: a rank that got the signal stops every rank at the same step
                    if done < t.max_steps and not all_ranks_true(not term.requested):
                        self._stop_for_sigterm(done, saved)
                # also a finished checkpoint of another folder resumed here: without one of its own,
                # this output_dir held only final/ and could be neither resumed nor resumed into
                if self.start_step < t.max_steps or self.last_saved is None or \
                        self.last_saved.resolve().parent != (self.out / CHECKPOINTS).resolve():
                    self._save(t.max_steps)
                export_hf(self.te.model, self.out / "final", dist,
                          record={"stage": cfg.stage, "history_mode": cfg.data.history_mode})
        finally:
            self.logger.close()
        summary = {"stage": stage.name, "steps": t.max_steps, "resumed_from": self.start_step,
                   "world_size": dist.world_size, "grad_accum": self.te.grad_accum, "precision": self.te.precision,
                   "trainable_params": self.te.trainable_params, **stage.summary(),
                   "checkpoint": str(self.last_saved), "final": str(self.out / "final")}
        # through on_main: a failed write on rank 0 stops every rank, not only rank 0 while the
        # others wait in train.py's shutdown barrier
        on_main(lambda: atomic_write_json(self.out / "summary.json", summary), dist.is_main)
        return summary
