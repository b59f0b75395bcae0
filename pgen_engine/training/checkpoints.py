"""Atomic, resumable training checkpoints and the Hugging Face export.

Layout under ``<output_dir>/checkpoints/``::

    step00000020/          one resumable checkpoint (DeepSpeed's own files: partitioned
      zero_pp_rank_*...     model + optimizer + scheduler states, our client state with
      rng_rank{r}.pt        the step and data position; per-rank RNG states)
      pgen_checkpoint.json  written last: step, world size, ZeRO stage, the run's config, data hash
    latest                 text file naming the newest complete checkpoint
    abandoned/stepN/       newer checkpoints set aside when an older one was resumed (training/resume.py)

Atomicity: DeepSpeed writes into a hidden temporary tag ``.tmp-step...``; only when every rank has finished
does rank 0 add ``pgen_checkpoint.json``, rename the folder into place and then rewrite ``latest`` atomically.
A crash at any point leaves the previous checkpoint and ``latest`` untouched; a folder without
``pgen_checkpoint.json`` is never resumed from. Whether a run may resume one is the question of
:mod:`pgen_engine.training.resume`. The HF export gathers ZeRO-3 partitions module by module on every rank and rank 0 writes ``final/`` (atomically).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgen_engine.errors import PgenUserError, one_line
from pgen_engine.io_utils import atomic_write_json, atomic_write_text, replace_dir
from pgen_engine.models.checkpoint import save_checkpoint
from pgen_engine.models.checkpoint_writer import TRAINING_RECORD
from pgen_engine.models.janus import JanusModel

from .distributed import DistInfo, RankFailedError, all_ranks_true, on_main
from .engine import gathered_parameters

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "pgen_checkpoint.json"
CONFIG_KEY = "config"  # the resolved config (config_to_dict) in META
DATA_HASH_KEY = "data_hash"  # sft_data.training_data_hash of the run, in META


class ResumeError(PgenUserError, RuntimeError):
    """A checkpoint cannot be resumed from; the message names the folder and the reason."""


class CheckpointWriteError(PgenUserError, OSError):
    """A checkpoint or the export could not be written (a full disk, a read-only folder); the
    message names the folder and the cause. Earlier checkpoints, ``latest`` and an earlier
    export are kept, and the half-written folder is removed."""


# torch.save reports a failed write inside its zip writer as a RuntimeError ("[enforce fail at
# inline_container.cc:...] . unexpected pos ...", "basic_ios::clear: iostream error", "PytorchStreamWriter failed
# writing file ...")
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos|iostream error|"
                                  r"Parent directory .* does not exist")


def _write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and bool(_TORCH_WRITE_FAILURE.search(str(e))))


def _write_error(what: Path, e: BaseException, kept: str) -> CheckpointWriteError:
    try:
        free = f"; {shutil.disk_usage(what.parent).free / 2 ** 20:.0f} MiB free on its file system"
    except OSError:
        free = ""
    return CheckpointWriteError(f"{what}: could not write it ({one_line(e)}{free}); {kept}")


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"  # the folder of the checkpoint after `step` optimizer steps


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and this rank's CUDA device) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # only the device this rank uses: each rank writes its own file, and a resume may see
        # another number of devices (one GPU per rank under a scheduler, or a smaller node)
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also the per-device list older checkpoints hold)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # written before: every visible device's state; this rank's device is its index
        idx = torch.cuda.current_device()
        if idx >= len(state["cuda"]):
            raise ResumeError(f"the RNG state was saved with {len(state['cuda'])} visible CUDA device(s), but this "
                              f"rank uses device {idx}; resume with the devices the run was saved with")
        torch.cuda.set_rng_state(state["cuda"][idx])


def read_meta(ckpt: str | os.PathLike) -> dict[str, Any]:
    """``ckpt``'s :data:`META` as a dict; a corrupt file is a ResumeError naming it."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ResumeError(f"{path}: unreadable checkpoint metadata ({e}); resume from another checkpoint "
                          "(--resume PATH) or start fresh") from None
    if isinstance(meta, dict):
        return meta
    raise ResumeError(f"{path}: checkpoint metadata is not a JSON object")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``root/latest`` (or the newest complete one), or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, ValueError):  # garbled (a UnicodeDecodeError traceback from --resume auto) or unreadable
            name = ""  # the newest complete checkpoint instead, as without a pointer
        cand = root / name
        if name and (cand / META).is_file():
            return cand
    done = complete_checkpoints(root)
    return done[-1] if done else None


def save_resumable(engine, root: str | os.PathLike, step: int, client_state: dict[str, Any], dist_info: DistInfo,
                   *, keep: int, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write a resumable checkpoint after ``step`` steps (collective: call on every rank).

    Args:
        engine: the DeepSpeed engine; root: the checkpoints folder; step: optimizer steps done.
        client_state: small picklable state (data position, ...) stored with DeepSpeed's.
        dist_info: this process.
        keep: complete checkpoints kept; older ones are deleted after the new one is in place.
        extra_meta: JSON-able fields added to ``pgen_checkpoint.json``.
    Returns:
        the checkpoint folder.
    """
    root = Path(root)
    tag = checkpoint_tag(step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag

    final = root / tag
    kept = "the earlier checkpoints and 'latest' are kept"

    def clear() -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            # made here: DeepSpeed logs a failed makedirs and goes on, so a read-only checkpoints
            # folder surfaced as torch's "RuntimeError: Parent directory .tmp-step... does not exist"
            tmp.mkdir()
        except OSError as e:
            raise _write_error(final, e, kept) from e

    # rank 0's file work goes through on_main: a failure there stops every rank, not a hang
    on_main(clear, dist_info.is_main)
    # a full disk used to end the run with torch's zip-writer traceback and leave the half-written
    # .tmp-step folder behind: it is now one line naming the checkpoint, and the folder is removed
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state={**client_state, "step": step}, save_latest=False)
    except Exception as e:
        if not _write_failure(e):
            raise
        if dist_info.world_size == 1:  # with several ranks the others may still be writing into it
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, e, kept) from e
    rng_error = None
    try:  # per rank (another node's disk may be full): every rank learns whether all wrote theirs
        torch.save(rng_state(), tmp / f"rng_rank{dist_info.rank}.pt")
    except Exception as e:
        if not _write_failure(e):
            raise
        rng_error = _write_error(final, e, kept)
    if not all_ranks_true(rng_error is None):
        if dist_info.is_main:  # every rank is done writing into it
            shutil.rmtree(tmp, ignore_errors=True)
        raise rng_error or RankFailedError(f"{tmp}: another rank could not write its RNG state")

    def publish() -> None:
        meta = {"step": step, "world_size": dist_info.world_size, "zero_stage": engine.zero_optimization_stage(),
                **(extra_meta or {})}
        try:
            atomic_write_json(tmp / META, meta)
            # the same step saved again (e.g. re-run after resume) replaces the old one only once in place
            replace_dir(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(final, e, kept) from e
        try:
            atomic_write_text(root / LATEST, tag + "\n")
        except OSError as e:  # a stale 'latest' would make --resume auto pick the older checkpoint
            (root / LATEST).unlink(missing_ok=True)  # without it: the newest complete one, this one
            raise _write_error(root / LATEST, e, f"{final} is complete and --resume auto finds it") from e
        for old in complete_checkpoints(root)[:-keep]:
            if old != final:
                # its META first: a deletion that stops part-way (an I/O error, a busy NFS file) must
                # not leave a folder that still looks complete with half its partition files gone
                (old / META).unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)

    on_main(publish, dist_info.is_main)
    return final


def _missing_state_file(ckpt: Path, rank: int, zero_stage: int) -> str | None:
    """``"<file>: missing"`` when ``rank``'s DeepSpeed model or optimizer state file is not in ``ckpt``
    (DeepSpeed itself stops on a missing model file with a bare AssertionError), else None."""
    model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    if not (ckpt / model).is_file():
        return f"{model}: missing"
    optim = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    if zero_stage > 0 and not any(ckpt.glob(f"*{optim}")):  # bf16 runs prefix it with "bf16_"
        return f"{optim}: missing"
    return None


def load_resumable(engine, ckpt: str | os.PathLike, dist_info: DistInfo) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from ``ckpt``; returns the client state.

    Raises:
        ResumeError: incomplete folder, or saved with another world size (ZeRO partitions
            are per rank).
    """
    ckpt = Path(ckpt)
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise ResumeError(f"{ckpt}: not a complete checkpoint (no {META})")
    meta = read_meta(ckpt)
    if "world_size" not in meta:
        raise ResumeError(f"{meta_path}: no world_size recorded; not a checkpoint written by pgen")
    if meta["world_size"] != dist_info.world_size:  # (not int(): a hand-edited "2" was a ValueError traceback)
        raise ResumeError(f"{ckpt}: saved with world_size={meta['world_size']}, this run has "
                          f"{dist_info.world_size}; resume with the same number of ranks")
    if meta.get("zero_stage") != engine.zero_optimization_stage():
        raise ResumeError(f"{ckpt}: saved with ZeRO stage {meta.get('zero_stage')}, this run uses "
                          f"{engine.zero_optimization_stage()}")
    # a truncated or corrupt state file surfaces from torch.load as RuntimeError / EOFError /
    # UnpicklingError (a ValueError... or not): one line naming the checkpoint instead
    unreadable = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError)
    # each rank's own ZeRO partition files first, together: one rank failing inside DeepSpeed's
    # load left the others in its collectives (a hang; gloo: 'Connection closed by peer')
    own = sorted(ckpt.glob(f"*zero_pp_rank_{dist_info.rank}_*.pt"))
    bad = next((f"{f.name}: truncated or not a torch file" for f in own if not zipfile.is_zipfile(f)), None) \
        or _missing_state_file(ckpt, dist_info.rank, engine.zero_optimization_stage())
    if not all_ranks_true(bad is None):
        why = bad or "another rank's partition is corrupt"  # (or missing: its own line says which)
        raise ResumeError(f"{ckpt}: cannot load the DeepSpeed state ({why}); the checkpoint is corrupt or truncated: "
                          "resume from another one (--resume PATH) or start fresh")
    try:
        path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except unreadable as e:
        raise ResumeError(f"{ckpt}: cannot load the DeepSpeed state ({one_line(e)}); the checkpoint is "
                          "corrupt or truncated: resume from another one (--resume PATH) or start fresh") from None
    if path is None:
        raise ResumeError(f"{ckpt}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt / f"rng_rank{dist_info.rank}.pt"
    problem = None  # per rank: every rank learns whether all restored theirs (else the others hang)
    try:
        if not rng_file.is_file():
            raise ResumeError(f"{rng_file}: missing RNG state for rank {dist_info.rank}")
        try:
            rng = torch.load(rng_file, weights_only=False)
        except unreadable as e:
            raise ResumeError(f"{rng_file}: unreadable RNG state ({one_line(e)}); the checkpoint is corrupt") from None
        # restored inside the agreement: a state this rank cannot apply stops every rank, not only this one
        set_rng_state(rng)
    except ResumeError as e:
        problem = e
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a state of another shape
        problem = ResumeError(f"{rng_file}: cannot restore the RNG state ({one_line(e)}); the checkpoint is corrupt")
    if not all_ranks_true(problem is None):
        raise problem or ResumeError(f"{ckpt}: another rank could not restore its RNG state (see its error line)")
    return dict(client or {})


def gather_state_dict(module: torch.nn.Module, dist_info: DistInfo) -> dict[str, torch.Tensor] | None:
    """Full (un-partitioned) parameters of ``module`` on CPU, on rank 0 (None elsewhere).

    Collective under ZeRO-3: parameters are gathered one top-level child at a time, so
    peak extra device memory is the largest child, not the whole model.
    """
    out: dict[str, torch.Tensor] = {}
    groups: list[tuple[str, torch.nn.Module]] = list(module.named_children())
    own = [(n, p) for n, p in module.named_parameters(recurse=False, remove_duplicate=False)]
    for prefix, child in groups:
        params = list(child.parameters())
        with gathered_parameters(params):
            if dist_info.is_main:
                for n, p in child.named_parameters(remove_duplicate=False):
                    out[f"{prefix}.{n}"] = p.detach().to("cpu", copy=True)
    if own:
        with gathered_parameters([p for _, p in own]):
            if dist_info.is_main:
                for n, p in own:
                    out[n] = p.detach().to("cpu", copy=True)
    return out if dist_info.is_main else None


def export_hf(module: torch.nn.Module, out_dir: str | os.PathLike, dist_info: DistInfo,
              record: dict | None = None) -> Path | None:
    """Write the model as a Hugging Face Janus checkpoint at ``out_dir`` (collective; rank 0 writes).

    ``module`` is the trained :class:`pgen_engine.models.JanusModel` (``engine.module``);
    under ZeRO-3 its parameters are gathered first. The folder appears atomically, with
    ``record`` (how the run trained: stage, history mode) as its ``pgen_training.json``.
    """
    state = gather_state_dict(module, dist_info)

    def write() -> None:
        with torch.device("meta"):
            clone = JanusModel(module.config, module.special_tokens)
        _assign_parameters(clone, state)
        if module.config.tie_word_embeddings:
            clone.lm_head.weight = clone.language_model.embed_tokens.weight
        clone.source_dir = getattr(module, "source_dir", None)
        try:
            save_checkpoint(clone, out_dir, extra_json={TRAINING_RECORD: record} if record else None)
        except OSError as e:  # a full disk: one line (not a traceback), the earlier export kept
            raise _write_error(Path(out_dir), e, f"an earlier {Path(out_dir).name}/ is kept; the run's checkpoints "
                               "are kept (free some space and rerun with --resume auto to export again)") from e

    on_main(write, dist_info.is_main)  # a failed write stops every rank together
    return Path(out_dir) if dist_info.is_main else None


def _assign_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    # Parameters only (buffers are recomputed by the loader); every name must match exactly.
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if names != set(state):
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise RuntimeError(f"export: parameter names differ from the model's (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        sub = model.get_submodule(owner) if owner else model
        setattr(sub, leaf, torch.nn.Parameter(t, requires_grad=False))
