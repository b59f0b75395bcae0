"""``pgen demo``: data -> tokenizer -> SFT -> RL -> eval -> report, on CPU.

The stages are the same code users run: ``train.py``'s SFT and RL stages (in-process,
one rank) with the shipped configs, then :mod:`pgen_engine.eval.evaluate`. The synthetic
known-answer dataset is the default; ``--data DIR`` runs the same pipeline on a native
dataset (e.g. the MovieLens posters), where attribute metrics are absent.

Image tokenizers: the synthetic demo keeps PatchKMeans (``configs/demo_*.yaml``: its flat
renders round-trip exactly through 4 codes of a 512-entry codebook, so it measures the
models, not the tokenizer); ``--data`` uses ``configs/movielens_*.yaml``, whose tokenizer is
a small Janus VQ-VAE trained on the dataset's train-split images (``data.tokenizer: vq``,
64 px, 8 x 8 codes, 1024 entries), installed as the tiny model's own ``vqmodel.*``.
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path

import torch

from pgen_engine.config import load_config
from pgen_engine.generation.generator import Generator
from pgen_engine.io_utils import atomic_write_json
from pgen_engine.models import load_model
from pgen_engine.rewards.embedders import make_embedder
from pgen_engine.training.rl_env import reward_embedder_spec
from pgen_engine.training.sft_data import work_dir
from pgen_engine.training.stages import run_stage

from . import evaluate as E
from .evaluator import EvalEmbedder, EvaluatorConfig, data_hash, train_evaluator
from .report import (build_report_json, ci_table, image_grid, paired_sentences, plot_curves, plot_paired, read_metrics,
                     json_safe, save_png, write_report, write_report_json)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# Reduced sizes for the CI smoke run (`pgen demo --quick`): same path, minutes less.
QUICK_SFT = ["train.max_steps=30", "data.synth.users=60", "data.synth.items=60", "train.save_every=0"]
QUICK_RL = ["train.max_steps=2", "rl.prompts_per_step=4", "rl.group_size=4", "train.global_batch_size=16",
            "train.micro_batch_size=16", "rl.eval_prompts=8"]
# Data settings both stages must share (the VQ tokenizer's cache key includes its budget: an
# SFT-only override would make the RL stage re-train and overwrite it).
QUICK_VQ = ["data.vq_time_budget_s=60"]


def _quick_overrides(config: Path, quick: list[str]) -> list[str]:
    """``quick`` plus ``train.warmup_steps`` capped at the quick ``train.max_steps`` (a config's
    warm-up longer than the shortened run is refused by the config check)."""
    steps = int(next(o.split("=", 1)[1] for o in quick if o.startswith("train.max_steps=")))
    return quick + [f"train.warmup_steps={min(load_config(config).train.warmup_steps, steps)}"]


def _stage(config: Path, overrides: list[str]) -> dict:
    return run_stage(load_config(config, overrides), resume="auto")


def _grid_rows(data, ex, systems: dict, u: int, n_show: int) -> list:
    rows = [("history", data.catalogue_images[[data.item_index[i] for i in ex.history]])]
    for name, out in systems.items():
        sel = (out.gen_user == u).nonzero().flatten()[:n_show]
        rows.append((name, out.images[sel]))
    rows.append(("true next item", data.catalogue_images[[data.item_index[ex.target]]]))
    return rows


# Sampling grids searched on the validation split (per system, then frozen for test).
SAMPLING_GRID = [{"guidance_scale": g, "temperature": t} for g in (1.0, 2.0, 3.0) for t in (0.7, 1.0)]
NONPERSONAL_GRID = [{"guidance_scale": 1.0, "temperature": t} for t in (0.7, 1.0)]
QUICK_GRID = [{"guidance_scale": g, "temperature": 1.0} for g in (1.0, 2.0)]
# Validation users the sampling is chosen on (x 2 images each). Settings differ by ~0.01 in
# attr_acc_future; with 64 users the choice was noise (standard error ~0.03), with 600 ~0.01.
SELECT_USERS = 600
REPORT_METRICS = ("user_id_acc", "user_id_mean_rank", "hist_max", "hist_top5", "future_sim", "hr@10", "ndcg@10",
                  "diversity", "novelty", "attr_acc_current", "attr_acc_future")
KEY_METRICS = ("attr_acc_future", "user_id_acc", "future_sim", "hr@10", "diversity")


def _evaluator_inputs(ev) -> tuple[list[list[int]], list[dict]]:
    """``ev``'s train-split sequences (item indices) and per-item metadata, as the evaluator hashes them."""
    seqs = [[ev.item_index[i] for i in s] for s in ev.splits.train_sequences.values()]
    return seqs, [ev.dataset.items[i].extra for i in ev.item_ids]


def train_eval_embedder(ev, out_dir: Path, *, steps: int = 300, progress: bool = False):
    """Train (or reuse) the independent evaluator on ``ev``'s train split (catalogue images
    at the evaluation resolution)."""
    seqs, meta = _evaluator_inputs(ev)
    # The evaluator sees images at the resolution they are compared at (the catalogue's, i.e.
    # the tokenizer's), capped at 64 px: upsampling 32-px images buys nothing but CPU time; at
    # least the CNN's 16 px (its four stride-2 blocks), so a tokenizer of smaller images still works.
    size = max(16, min(64, int(ev.catalogue_images.shape[1])))
    return train_evaluator(ev.catalogue_images, seqs, meta, out_dir, EvaluatorConfig(steps=steps, image_size=size),
                           progress=progress)


def load_eval_embedder(ev, directory: str | Path) -> EvalEmbedder:
    """The evaluator artifact in ``directory``, refused (ValueError) when its training-data hash is
    not that of ``ev``'s catalogue and train split (computed with the artifact's own config): an
    evaluator trained on other data would score this dataset with a space it never learned."""
    emb = EvalEmbedder.load(directory)
    digest = data_hash(ev.catalogue_images, *_evaluator_inputs(ev), emb.config)
    if emb.meta.get("data_hash") != digest:
        raise ValueError(f"--evaluator {directory}: trained on other data (data hash "
                         f"{str(emb.meta.get('data_hash'))[:12]}, this dataset's train split {digest[:12]}); "
                         "point --evaluator at an empty folder to train one for this dataset")
    return emb


def _train_seed(kind: str, common: list[str], out: Path, seed: int, quick: bool, progress: bool) -> tuple[dict, dict, dict]:
    timings = {}
    if quick and load_config(CONFIGS / f"{kind}_sft.yaml").data.tokenizer == "vq":
        common = common + QUICK_VQ  # a learned VQ at its full budget would dominate the smoke run
    t = time.time()
    print(f"[demo] seed {seed}: SFT ({CONFIGS / f'{kind}_sft.yaml'})", flush=True)
    sft = _stage(CONFIGS / f"{kind}_sft.yaml", common + [f"seed={seed}", f"output_dir={out / 'sft'}",
                                                         f"logging.progress={str(progress).lower()}"]
                 + (_quick_overrides(CONFIGS / f"{kind}_sft.yaml", QUICK_SFT) if quick else []))
    timings["sft_s"] = time.time() - t
    t = time.time()
    print(f"[demo] seed {seed}: RL ({CONFIGS / f'{kind}_rl.yaml'})", flush=True)
    quick_rl = QUICK_RL
    if quick and load_config(CONFIGS / f"{kind}_rl.yaml").rl.embedder.get("type") == "cocons_cnn":
        quick_rl = QUICK_RL + ["rl.embedder.steps=40"]  # the learned reward CNN, shortened like the rest
    rl = _stage(CONFIGS / f"{kind}_rl.yaml", [c for c in common if not c.startswith("data.synth")]
                + [f"seed={seed}", f"output_dir={out / 'rl'}", f"model.checkpoint={sft['final']}",
                   f"logging.progress={str(progress).lower()}"]
                + (_quick_overrides(CONFIGS / f"{kind}_rl.yaml", quick_rl) if quick else []))
    timings["rl_s"] = time.time() - t
    return sft, rl, timings


def run_demo(out: str | Path = "runs/demo", *, data: str | None = None, quick: bool = False,
             progress: bool = True, seed: int = 0, seeds: list[int] | None = None, num_images: int | None = None,
             max_users: int | None = None) -> Path:
    """Run the whole pipeline (per seed: SFT -> RL; then evaluation) into ``out``.

    Returns the path of ``report.md``; ``report.json`` and ``report.html`` lie next to it.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    seeds = list(seeds) if seeds else [seed]
    out = Path(out).resolve()
    synthetic = data is None
    kind = "demo" if synthetic else "movielens"
    data_dir = out / "data" if synthetic else Path(data).resolve()
    if not synthetic and not (data_dir / "interactions.csv").is_file():  # before mkdir: no empty run folder left
        raise FileNotFoundError(f"--data {data_dir}: no interactions.csv (expected the native dataset layout)")
    if not synthetic:  # a dataset without test users fails now, not after every seed has trained
        d = load_config(CONFIGS / f"{kind}_sft.yaml").data
        E.load_eval_splits(data_dir, require="test", k=d.history_k, min_interactions=d.min_interactions)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "data_work"
    common = [f"data.dataset_dir={data_dir}", f"data.work_dir={work}"]
    print("[demo] image tokenizer: " + ("PatchKMeans (exact on the synthetic renders)" if synthetic else
                                        "Janus VQ-VAE trained on the dataset's train-split images (data.tokenizer=vq; "
                                        "reused from data_work/ when present)"), flush=True)
    timings: dict[str, float] = {}
    runs = {}
    for s in seeds:
        sft, rl, tm = _train_seed(kind, common, out / f"seed{s}", s, quick, progress)
        runs[s] = (sft, rl)
        for k, v in tm.items():
            timings[k] = timings.get(k, 0.0) + v

    t = time.time()
    print("[demo] evaluation", flush=True)
    first_sft = runs[seeds[0]][0]["final"]
    sft_model0 = load_model(first_sft)
    settings = E.PromptSettings.for_checkpoint(first_sft)
    tok = settings.tokenizer(sft_model0)
    mode_text = (f"{settings.history_mode} (history images "
                 f"{'through the vision tower + aligner' if settings.history_mode == 'pixels' else 'as their VQ codes, through the generation embedding'})")
    print(f"[demo] history mode: {mode_text}", flush=True)
    rl_cfg = load_config(out / f"seed{seeds[0]}" / "rl" / "config.resolved.yaml")
    reward_spec = reward_embedder_spec(rl_cfg.rl, work_dir(rl_cfg))  # a learned reward CNN: its artifact folder
    reference = make_embedder(reward_spec)
    # First pass with the reference embedder only to get splits and catalogue images; the
    # evaluator is then trained on those images and the train split.
    cache_dir = work / f"eval_cache_{tok.fingerprint()[:16]}"
    ev = E.prepare_eval_data(data_dir, tok, cache_dir, reference, k=settings.history_k,
                             min_interactions=settings.min_interactions, progress=progress,
                             require="test")
    t_ev = time.time()
    evaluator = train_eval_embedder(ev, out / "evaluator", steps=60 if quick else 300, progress=progress)
    timings["evaluator_s"] = time.time() - t_ev
    ev.catalogue_embeds = evaluator.embed(ev.catalogue_images).cpu()
    ev.reference_embeds = reference.embed(ev.catalogue_images).cpu()
    n = num_images or (2 if quick else 10)
    users = max_users or (8 if quick else None)  # all test users by default
    examples = ev.examples("test", users, seed=0)
    valid = ev.examples("valid", 8 if quick else SELECT_USERS, seed=1)
    select_metric = "attr_acc_future" if ev.ground_truth is not None else "future_sim"
    n_val = 2
    batch = max(1, 64 // n)

    per_seed: dict[int, dict[str, dict]] = {}
    outputs0: dict[str, object] = {}
    chosen: dict[str, dict] = {}
    for s in seeds:
        sft_model = load_model(runs[s][0]["final"])
        rl_model = load_model(runs[s][1]["final"])
        # sized by the longest prompt (long titles: MovieLens prompts pass the Generator's 512-token default)
        seq = E.longest_prompt(ev, builder_for(sft_model, runs[s][0]["final"]), list(examples) + list(valid)) \
            + sft_model.num_image_tokens
        gens = {"generate_nonpersonal": (Generator(sft_model, max_batch_size=batch * n, max_seq_len=seq), False),
                "generate_sft": (Generator(sft_model, max_batch_size=batch * n, max_seq_len=seq), True),
                "generate_sft_rl": (Generator(rl_model, max_batch_size=batch * n, max_seq_len=seq), True)}
        systems = E.baseline_systems(ev, examples, n, seed=s)
        for name, (gen, personal) in gens.items():
            grid = NONPERSONAL_GRID if not personal else (QUICK_GRID if quick else SAMPLING_GRID)

            def make(st, gen=gen, personal=personal, name=name, nn=n_val, exs=valid):
                return E.generate_system(name, gen, ev, builder_for(sft_model, runs[s][0]["final"]), exs, nn,
                                         personalized=personal, seed=10_000 + s, batch_prompts=batch, **st)

            best, scores = E.select_sampling(make, ev, valid, evaluator, grid, select_metric)
            chosen[f"{name} (seed {s})"] = {"chosen": best, "validation " + select_metric: scores}
            systems[name] = E.generate_system(name, gen, ev, builder_for(sft_model, runs[s][0]["final"]), examples,
                                              n, personalized=personal, seed=s, batch_prompts=batch,
                                              progress=progress, **best)
        per_seed[s] = {name: E.per_user_metrics(o, ev, examples, evaluator) for name, o in systems.items()}
        if s == seeds[0]:
            outputs0 = systems
    # average each user's value over seeds, then bootstrap over users
    per_user = {name: {m: torch.stack([per_seed[s][name][m] for s in seeds]).nanmean(0)
                       for m in per_seed[seeds[0]][name]} for name in per_seed[seeds[0]]}
    timings["eval_s"] = time.time() - t
    eval_info = {**evaluator.describe(), "reference_embedder": reward_spec, "reward_embedder": reward_spec,
                 "independent": True,
                 "note": "rewards use the reward embedder; make_embedder refuses evaluator artifacts"}
    report = build_report_json(str(data_dir), seeds, n, eval_info, per_user)

    write_report_json(out / "report.json", report)

    metrics = [m for m in REPORT_METRICS if any(m in r for r in report["systems"].values())]
    table = ci_table(report, metrics)
    gen_names = list(E.GENERATED)
    key = [m for m in KEY_METRICS if m in metrics]
    notes = _notes(report, ev, evaluator, synthetic, examples, key)
    notes += paired_sentences(report, gen_names + ["retrieve"], key)
    figures = []
    if plot_paired(out / "paired.png", report, key):
        figures.append(("Paired per-user differences with 95 % CIs", "paired.png"))
    show = {k: outputs0[k] for k in ("copy_last", "retrieve", "generate_nonpersonal", "generate_sft",
                                     "generate_sft_rl")}
    for u in range(min(3, len(examples))):
        save_png(out / f"grid_user{u}.png", image_grid(_grid_rows(ev, examples[u], show, u, n)))
        figures.append((f"User {examples[u].user_id}: history, copy_last, retrieve, generated rows, true next item "
                        f"(seed {seeds[0]})", f"grid_user{u}.png"))
    s0 = out / f"seed{seeds[0]}"
    if plot_curves(out / "curves_sft.png", {"SFT": read_metrics(s0 / "sft" / "metrics.jsonl")},
                   ["loss", "lr", "grad_norm"], "SFT"):
        figures.append(("SFT training curves", "curves_sft.png"))
    rl_rows = read_metrics(s0 / "rl" / "metrics.jsonl")
    rkeys = ["reward"] + sorted({k for r in rl_rows for k in r if k.startswith("reward/") and k.count("/") == 1})
    if plot_curves(out / "curves_rl.png", {"RL": rl_rows}, rkeys + ["kl", "logprob_gap_max"], "RL"):
        figures.append(("RL curves (reward components, KL, rollout-vs-trainer log-prob gap)", "curves_rl.png"))
    meta = {"dataset": str(data_dir), "seeds": seeds, "users evaluated": len(examples), "images per user": n,
            "valid users for sampling selection": f"{len(valid)} x {n_val} images, metric {select_metric}",
            "device": _device_name(), "torch": torch.__version__,
            **{k: f"{v:.0f} s" for k, v in timings.items()}, "total": f"{sum(timings.values()):.0f} s",
            "sampling (chosen on valid)": json.dumps({k: v["chosen"] for k, v in chosen.items()}), "quick": quick,
            "history mode": mode_text}
    paired_tab = ci_table(report, key, section="paired")
    report_md = write_report(out, title=f"pgen_engine demo — {'synthetic v2 data' if synthetic else data_dir.name}",
                             table_md=table, notes=notes + ["Paired differences (system - baseline):", paired_tab],
                             figures=figures, meta=meta)
    atomic_write_json(out / "results.json", json_safe({"report": "report.json", "timings": timings, "meta": meta,
                                                       "sampling_selection": chosen}))
    print(table)
    return report_md


_BUILDERS: dict = {}


def builder_for(model, checkpoint):
    """The prompt builder of ``checkpoint`` (cached per checkpoint path)."""
    key = str(checkpoint)
    if key not in _BUILDERS:
        st = E.PromptSettings.for_checkpoint(checkpoint)
        _BUILDERS[key] = st.prompt_builder(model, checkpoint, st.tokenizer(model).num_tokens)
    return _BUILDERS[key]


def _notes(report: dict, ev, evaluator, synthetic: bool, examples, key) -> list[str]:
    """What the rows are, what the evaluator is and how well it retrieves, plus the dataset facts."""
    san = evaluator.meta.get("sanity", {})
    notes = [
        "Rows: random / centroid (items nearest the catalogue mean) / popularity / copy_last (the history window "
        "the generator sees, cycled) / repeat_last (its most recent item, every image) / retrieve (nearest items "
        "to that window's mean, reward-side embedder, no filtering) / "
        "true_next (held-out item through the image tokenizer, a ceiling) / generate_nonpersonal (the model on the "
        "unconditional 'pad' prompt it was trained with) / generate_sft / generate_sft_rl. Cells: mean over "
        f"{report['users']} test users (seeds {report['seeds']}), [95 % paired-bootstrap CI]. Guidance scale and "
        "temperature were chosen per system on validation users, then frozen for test.",
        f"Evaluator: a small CNN trained contrastively on co-consumption (+ genres where present) of the train split "
        f"only (data hash {evaluator.meta.get('data_hash', '?')[:12]}); rewards cannot load it. Sanity: recall@10 of "
        f"held-out users' next co-consumed item {san.get('recall@10', float('nan')):.3f} vs pixel statistics "
        f"{san.get('recall@10_pixel_stats', float('nan')):.3f} and chance {san.get('recall@10_chance', float('nan')):.3f}.",
    ]
    ties = {k: len(v) for k, v in ev.dropped_ties.items()}
    if any(ties.values()):
        notes.append(f"Data hygiene: held-out targets whose timestamp ties the previous interaction were dropped "
                     f"(valid {ties.get('valid', 0)}, test {ties.get('test', 0)} users).")
    if synthetic:
        notes.append(f"Synthetic v2: {_new_value_share(ev, examples):.0%} of the evaluated test targets have an "
                     "attribute value absent from every history item (the future differs from the present).")
    return notes


def _new_value_share(ev, examples) -> float:
    """Share of examples whose target has an attribute value no history item has (synthetic data)."""
    attrs = json.loads((ev.root / "attributes.json").read_text())
    hits = 0
    for ex in examples:
        t = attrs[ex.target]
        hits += any(all(attrs[h][a] != t[a] for h in ex.history) for a in t)
    return hits / max(1, len(examples))


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
