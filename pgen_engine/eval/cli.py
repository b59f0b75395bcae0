"""``pgen eval`` and ``pgen demo``."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import time
from pathlib import Path

import torch

from pgen_engine import envs
from pgen_engine.config import DataConfig, load_config
from pgen_engine.errors import PgenUserError, one_line
from pgen_engine.data.history_mode import check_history_mode
from pgen_engine.generation.generator import Generator
from pgen_engine.generation.sampling_params import SamplingParams, SamplingParamsError
from pgen_engine.io_utils import folder_problem
from pgen_engine.models import load_model
from pgen_engine.models.checkpoint import read_training_record
from pgen_engine.rewards.embedders import make_embedder
from pgen_engine.training.rl_env import reward_embedder_spec
from pgen_engine.training.sft_data import work_dir
from pgen_engine.typed_config import check_seed, read_yaml_file

from . import evaluate as E
from .demo import KEY_METRICS, REPORT_METRICS, load_eval_embedder, run_demo, train_eval_embedder
from .evaluator import is_evaluator_artifact
from .report import build_report_json, ci_table, paired_sentences, plot_paired, write_report, write_report_json


def _embedder(spec: str):
    if spec == "pixel_stats":
        return make_embedder({"type": "pixel_stats"})
    kind, _, path = spec.partition(":")
    if not path:
        raise ValueError(f"--embedder {spec!r}: expected auto, pixel_stats or TYPE:PATH (e.g. clip:/models/clip)")
    if kind == "eval_cnn" or is_evaluator_artifact(path):  # make_embedder's refusal speaks of rewards
        raise ValueError(f"--embedder {spec}: an evaluator artifact is passed as --evaluator {path} "
                         "(with --embedder auto), where its training data is checked against this dataset")
    return make_embedder({"type": kind, "path": path})


def _run_config_tree(path: Path) -> dict | None:
    """The run config at ``path`` as a plain mapping, or None when there is no such file."""
    if not path.is_file():
        return None
    tree = read_yaml_file(path) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return tree


def _reward_embedder_spec(ckpt: Path, run_config: str | None = None) -> dict | None:
    """The training run's ``rl.embedder`` (``--run-config``, else CHECKPOINT/../config.resolved.yaml), or None."""
    cfg = _run_config_tree(Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml") or {}
    rl = cfg.get("rl") or {}
    return rl.get("embedder") if cfg.get("stage") == "rl" and isinstance(rl, dict) else None


def _run_data(ckpt: Path, run_config: str | None = None) -> DataConfig:
    """The training run's ``data`` section (``--run-config``, else CHECKPOINT/../config.resolved.yaml);
    the defaults for a checkpoint without one (e.g. a downloaded Janus-Pro)."""
    path = Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml"
    if run_config and not path.is_file():
        raise FileNotFoundError(f"--run-config {path}: file not found")
    return load_config(path).data if path.is_file() else DataConfig()


def _reference_embedder(ckpt: Path, run_config: str | None = None):
    """``(embedder, spec)`` the ``retrieve`` row ranks with: an RL run's reward embedder, as in
    ``pgen demo``; pixel statistics for other checkpoints, or (with a note) when the reward
    embedder cannot be loaded from here (e.g. its work_dir is relative to another folder)."""
    path = Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml"
    if path.is_file():
        run = load_config(path)
        if run.stage == "rl":
            spec = reward_embedder_spec(run.rl, work_dir(run))
            try:
                return make_embedder(spec), spec
            except (OSError, ValueError, PgenUserError) as e:
                print(f"note: retrieve ranks with pixel statistics: the run's reward embedder {spec} cannot be "
                      f"loaded ({one_line(e)})")
    spec = {"type": "pixel_stats"}
    return make_embedder(spec), spec


def default_system_name(ckpt: Path, run_config: str | None = None) -> str:
    """The table row of ``pgen eval``'s checkpoint when ``--name`` is not given, from the stage
    that trained it (the checkpoint's training record, else ``--run-config``, else
    CHECKPOINT/../config.resolved.yaml): ``generate_sft`` for SFT and ``generate_sft_rl`` for RL
    (the demo's names); ``generate`` for a checkpoint without either (e.g. a downloaded Janus-Pro)."""
    rec = read_training_record(ckpt)
    if rec is None:
        rec = _run_config_tree(Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml") or {}
    return {"sft": "generate_sft", "rl": "generate_sft_rl"}.get(rec.get("stage"), "generate")


def is_independent(reward_spec: dict | None, evaluator: dict) -> bool:
    """False when the evaluation embedder is the run's reward embedder (same type, or with paths the same
    model folder), or when the reward spec names the evaluator itself."""
    if reward_spec is None:
        return True
    rtype, rpath = reward_spec.get("type"), reward_spec.get("path")
    if rtype == "eval_cnn" or (rpath is not None and is_evaluator_artifact(rpath)):
        return False  # a reward spec naming the evaluator (make_embedder refuses it; a hand-made config may not)
    if evaluator.get("type") == "eval_cnn":
        return True  # rewards cannot load the evaluator
    etype, _, epath = str(evaluator["type"]).partition(":")
    if rpath is None or not epath:  # e.g. pixel_stats, or a cocons_cnn trained into the run's work dir: types
        return etype != rtype
    # one model folder, however spelt (trailing slash, relative, symlink) or typed (clip / pretrained)
    return os.path.realpath(os.path.expanduser(str(rpath))) != os.path.realpath(os.path.expanduser(epath))


def _check_eval_args(a: argparse.Namespace) -> None:
    """Flag values that would otherwise fail late with an unrelated message (or not at all)."""
    for flag, v in (("--num-images", a.num_images), ("--batch-prompts", a.batch_prompts),
                    ("--max-users", a.max_users), ("--evaluator-steps", a.evaluator_steps)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    try:  # else refused by the Generator only after the token cache and the evaluator were built
        SamplingParams(guidance_scale=a.guidance_scale, temperature=a.temperature, top_k=a.top_k, seed=a.seed)
    except SamplingParamsError as e:
        raise ValueError(f"--{e.field.replace('_', '-')} {e.detail}") from None
    if a.name is not None and (not a.name.strip() or " - " in a.name or any(c in a.name for c in "|\n\r")):
        # the paired keys are "<system> - <baseline>" and the tables are markdown: either would be misread
        raise ValueError(f"--name {a.name!r}: expected a non-empty row name without ' - ', '|' or line breaks")
    if a.name is not None and a.name in (*E.BASELINES, "generate_nonpersonal"):
        raise ValueError(f"--name {a.name}: that is a baseline row's name; choose another (e.g. generate_sft)")
    if a.evaluator and Path(a.evaluator).exists() and not Path(a.evaluator).is_dir():
        raise ValueError(f"--evaluator {a.evaluator}: exists and is not a directory (expected the evaluator folder)")
    if a.out and Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out}: exists and is not a directory (expected the report folder)")
    if a.out and folder_problem(a.out):  # e.g. under a file: else found only when the token cache is made
        raise ValueError(f"--out {a.out}: {folder_problem(a.out)} (expected the report folder)")


def default_token_cache_dir(data: str | os.PathLike, fingerprint: str, out: Path | None) -> Path:
    """Where ``pgen eval`` keeps the dataset's token cache when ``--cache-dir`` is not given:
    ``OUT/token_cache_<fingerprint>`` with ``--out``, else under the user's cache folder
    (``$PGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pgen_engine``, else ``~/.cache/pgen_engine``),
    named by tokenizer fingerprint and dataset path. Never inside the checkpoint: a checkpoint
    folder may be read-only or shared, and must hold only the model."""
    name = f"token_cache_{fingerprint[:16]}"
    if out is not None:
        return out / name
    root = envs.get("PGEN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgen_engine"
    where = hashlib.sha1(str(Path(data).resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return Path(root) / f"{name}_{where}"


def cmd_eval(a: argparse.Namespace) -> int:
    _check_eval_args(a)
    t0 = time.time()
    ckpt = Path(a.checkpoint)
    if not ckpt.is_dir():  # named before the dataset is read
        raise FileNotFoundError(f"--checkpoint {ckpt}: not a directory (expected a Janus checkpoint folder, "
                                "e.g. a run's final/)")
    # the run's split (history window, interaction floor), as its training made it
    d = _run_data(ckpt, a.run_config)
    split_kw = dict(k=d.history_k, min_interactions=d.min_interactions, min_rating=a.min_rating)
    # the dataset and its split before the model, the token cache and the evaluator: no test user
    # (e.g. every target ties the interaction before it) used to fail only after all three
    E.load_eval_splits(a.data, require=a.split, **split_kw)
    # a bad --embedder (unknown type, missing model folder) used to fail after the token cache
    embedder = None if a.embedder == "auto" else _embedder(a.embedder)
    model = load_model(ckpt, device=a.device, dtype=getattr(torch, a.dtype))
    settings = E.PromptSettings.for_checkpoint(ckpt, a.run_config)
    a.name = a.name or default_system_name(ckpt, a.run_config)
    if a.history_mode is not None:
        check_history_mode(settings.history_mode, a.history_mode, where=str(a.run_config or ckpt.parent / "config.resolved.yaml"))
    if a.tokenizer:
        settings = dataclasses.replace(settings, tokenizer_path=Path(a.tokenizer))
    tok = settings.tokenizer(model)
    builder = settings.prompt_builder(model, ckpt, tok.num_tokens)  # the checkpoint's text tokenizer, before the data
    out = Path(a.out) if a.out else None
    cache_dir = Path(a.cache_dir) if a.cache_dir else default_token_cache_dir(a.data, tok.fingerprint(), out)
    reward_spec = _reward_embedder_spec(ckpt, a.run_config)
    reference, reference_spec = _reference_embedder(ckpt, a.run_config)
    data = E.prepare_eval_data(a.data, tok, cache_dir, reference, progress=not a.quiet, require=a.split, **split_kw)
    if a.embedder == "auto":
        if a.evaluator and Path(a.evaluator, "evaluator.json").is_file():
            embedder = load_eval_embedder(data, a.evaluator)
        else:
            ev_dir = Path(a.evaluator) if a.evaluator else (out or ckpt.parent) / "evaluator"
            embedder = train_eval_embedder(data, ev_dir, steps=a.evaluator_steps, progress=not a.quiet)
        info = embedder.describe()
    else:
        info = {"type": a.embedder}
    info.update({"reward_embedder": reward_spec, "reference_embedder": reference_spec,
                 "independent": is_independent(reward_spec, info)})
    data.catalogue_embeds = embedder.embed(data.catalogue_images).cpu()
    examples = data.examples(a.split, a.max_users, seed=a.seed)
    if not examples:
        raise ValueError(f"{a.data}: no {a.split} examples (too few interactions per user?)")
    # sized by the longest prompt, as the demo does: titles or pixels-mode history images pass the
    # Generator's default (image tokens + 512) and failed mid-evaluation, after the baselines
    seq = E.longest_prompt(data, builder, examples) + model.num_image_tokens
    gen = Generator(model, max_batch_size=max(a.num_images, min(64, a.batch_prompts * a.num_images)),
                    max_seq_len=max(seq, model.num_image_tokens + 512))
    kw = dict(guidance_scale=a.guidance_scale, temperature=a.temperature, top_k=a.top_k, seed=a.seed,
              batch_prompts=a.batch_prompts, progress=not a.quiet)
    systems = {}
    if a.baselines:
        systems.update(E.baseline_systems(data, examples, a.num_images, seed=a.seed))
        systems["generate_nonpersonal"] = E.generate_system("generate_nonpersonal", gen, data, builder, examples,
                                                            a.num_images, personalized=False, **kw)
    systems[a.name] = E.generate_system(a.name, gen, data, builder, examples, a.num_images, **kw)
    per_user = {name: E.per_user_metrics(s, data, examples, embedder) for name, s in systems.items()}
    report = build_report_json(str(a.data), [a.seed], a.num_images, info, per_user)
    metrics = [m for m in REPORT_METRICS if any(m in r for r in report["systems"].values())]
    table = ci_table(report, metrics)
    print(table)
    print(f"history mode: {settings.history_mode} (history images "
          f"{'through the vision tower' if settings.history_mode == 'pixels' else 'as VQ codes'})")
    if not info["independent"]:
        print("WARNING: the evaluation embedder is the run's reward embedder: this evaluation is NOT independent")
    if out:
        key = [m for m in KEY_METRICS if m in metrics]
        write_report_json(out / "report.json", report)
        notes = ([] if info["independent"] else ["**NOT independent**: the evaluation embedder is the embedder the "
                                                 "run's RL reward used, so embedding metrics measure the reward."])
        notes += paired_sentences(report, [a.name, "retrieve"], key)
        figs = [("Paired differences", "paired.png")] if plot_paired(out / "paired.png", report, key) else []
        write_report(out, title=f"pgen eval — {a.name} on {Path(a.data).name} ({a.split})", table_md=table,
                     notes=notes, figures=figs, meta={"checkpoint": str(ckpt), "split": a.split,
                                                      "history_mode": settings.history_mode,
                                                      "users": len(examples), "images per user": a.num_images,
                                                      "users dropped (target ties the previous interaction's "
                                                      "timestamp)": len(data.dropped_ties.get(a.split, [])),
                                                      "seconds": round(time.time() - t0, 1)})
        print(f"wrote {out / 'report.json'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    seeds = None
    if a.seeds:
        try:
            seeds = [int(x) for x in a.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds {a.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds {a.seeds!r}: a seed is repeated (each seed is one training run)")
    if a.max_users is not None and a.max_users < 1:
        raise ValueError(f"--max-users must be >= 1, got {a.max_users}")
    # every seed before the first run: a bad one used to stop the demo only when its turn came,
    # after the earlier seeds had trained, with a message naming the config file, not the flag
    for flag, value in [("--seed", a.seed)] if seeds is None else [("--seeds", s) for s in seeds]:
        check_seed(flag, value, sep=" ")
    out = Path(a.out)
    if out.exists() and not out.is_dir():  # mkdir would say only "[Errno 17] File exists"
        raise ValueError(f"--out {out}: exists and is not a folder (expected the demo's run folder)")
    report = run_demo(Path(a.out), data=a.data, quick=a.quick, progress=not a.quiet, seed=a.seed, seeds=seeds,
                      max_users=a.max_users)
    print(f"report: {report}")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` and ``demo`` to the ``pgen`` command."""
    p = subparsers.add_parser("eval", help="generate for users and compare with recommend / popularity baselines")
    p.add_argument("--checkpoint", required=True, help="Janus checkpoint directory (e.g. a run's final/)")
    p.add_argument("--data", required=True, help="dataset in the native layout")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--num-images", type=int, default=10, help="images generated per user")
    p.add_argument("--max-users", type=int, default=None, help="evaluate a random sample of N users (fixed by --seed)")
    p.add_argument("--tokenizer", default=None, help="PatchKMeans tokenizer file (default: the run's, else the "
                   "checkpoint's VQ model)")
    p.add_argument("--cache-dir", default=None,
                   help="token cache folder (built when missing; default OUT/token_cache_<tokenizer>, or without "
                        "--out under $PGEN_CACHE_DIR, else $XDG_CACHE_HOME/pgen_engine, else ~/.cache/pgen_engine)")
    p.add_argument("--embedder", default="auto", help="auto (the independent evaluator CNN, trained on the "
                   "dataset's train split or loaded from --evaluator), pixel_stats, or clip:PATH / siglip:PATH")
    p.add_argument("--history-mode", choices=("pixels", "codes"), default=None,
                   help="refuse to run unless the model was trained with this history mode (default: its run's)")
    p.add_argument("--evaluator", default=None, help="evaluator artifact folder (reused when it holds one trained on "
                   "this dataset -- one of other data is refused -- else trained there; default OUT/evaluator)")
    p.add_argument("--evaluator-steps", type=int, default=300)
    p.add_argument("--min-rating", type=float, default=None, help="only interactions with rating >= this are "
                   "positives (needs a rating column)")
    p.add_argument("--run-config", default=None, help="the training run's config.resolved.yaml (default: "
                   "CHECKPOINT/../config.resolved.yaml) — gives the prompt format and the image tokenizer")
    p.add_argument("--baselines", action="store_true", help="add random, centroid, popularity, copy_last, "
                   "repeat_last, retrieve, true_next and generate_nonpersonal rows")
    p.add_argument("--name", default=None, help="row name of the checkpoint in the table (default: generate_sft or "
                   "generate_sft_rl from the run's stage, generate without a run config)")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="write report.json / report.md / report.html here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    d = subparsers.add_parser("demo", help="synthetic data -> tokenizer -> SFT -> RL -> eval -> report (CPU)")
    d.add_argument("--out", default="runs/demo", help="run folder; the report is OUT/report.md")
    d.add_argument("--data", default=None, help="a native-layout dataset instead of the synthetic one "
                   "(e.g. ../shared/data/movielens-posters)")
    d.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--seeds", default=None, help="comma-separated training seeds (e.g. 0,1,2); per-user metrics "
                   "are averaged over seeds before the bootstrap")
    d.add_argument("--max-users", type=int, default=None, help="evaluate a random sample of N test users")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
