"""Generators measured against baselines that bracket the truth, per user, with the same code.

Every system produces, for each evaluated user, ``n`` images: generated ones, or the images of
``n`` catalogue items. Metrics are computed **per user** (averaged over that user's images) so
that systems can be compared user by user with paired bootstrap intervals (:mod:`.stats`).
Similarities use the *evaluation* embedder (for real data the independent CNN of
:mod:`.evaluator`); baselines that need an embedding to choose items (``retrieve``) use the
*reference* embedder (the one rewards may use), never the evaluator.

Systems (names as in ``report.json``):

* ``random``: n uniformly drawn catalogue items (the floor);
* ``centroid``: the n items nearest the catalogue mean in the evaluation embedding, the
  same for every user (what "closeness to the mean" alone scores);
* ``popularity``: the n most consumed train-split items;
* ``copy_last``: the user's last history items (the window the generator sees), cycled;
* ``repeat_last``: the most recent history item, n copies -- the sharper "nothing changes"
  baseline on attribute metrics (cycling the window also shows older, already-drifted items);
* ``retrieve``: catalogue items ranked by cosine to the mean of the same history window
  (reference embedder), no answer-aware filtering, history items allowed;
* ``true_next``: the held-out item through the image tokenizer (encode + decode), a ceiling;
* ``generate_nonpersonal``: the model on the unconditional prompt it was trained with
  (condition dropout's "pad" prompt), ``generate_sft`` and ``generate_sft_rl``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from pgen_engine.config import DataConfig, load_config
from pgen_engine.data.dataset import ITEMS_FILE, DataError, Dataset, filter_by_rating, load_dataset, load_image
from pgen_engine.data.history import CatalogueImages, run_tokenizer_file
from pgen_engine.data.history_mode import trained_history_mode
from pgen_engine.data.prompts import PromptBuilder, normalize_pixels
from pgen_engine.data.splits import DEFAULT_MIN_INTERACTIONS, Example, Splits, build_splits
from pgen_engine.data.synth import attributes_to_codes, load_ground_truth, read_attributes
from pgen_engine.data.text_tokenizer import load_text_tokenizer
from pgen_engine.data.token_cache import TokenCache, build_token_cache
from pgen_engine.eval import metrics as M
from pgen_engine.eval.stats import LOWER_IS_BETTER
from pgen_engine.models.image_tokenizer import ImageTokenizer, VQImageTokenizer
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

BASELINES = ("random", "centroid", "popularity", "copy_last", "repeat_last", "retrieve", "true_next")
GENERATED = ("generate_nonpersonal", "generate_sft", "generate_sft_rl")


@dataclasses.dataclass
class EvalData:
    """Dataset, splits, codes and catalogue embeddings shared by every evaluated system.

    Attributes:
        item_ids: catalogue order (index = item index in every ``[.., C]`` tensor).
        catalogue_images: uint8 ``[C,H,W,3]`` at the tokenizer's image size.
        catalogue_embeds: float ``[C,D]`` L2-normalised, evaluation embedder.
        reference_embeds: float ``[C,D']`` of the reference (reward-side) embedder, used by
            ``retrieve``; equals ``catalogue_embeds`` when none was given.
        popularity: float ``[C]`` train-split interaction counts.
        ground_truth: synthetic datasets only: user -> per-step dicts (``preferred``).
        dropped_ties: valid/test targets dropped because their timestamp ties the previous
            interaction (their order relative to it is arbitrary), per split.
    """

    root: Path
    dataset: Dataset
    splits: Splits
    tokenizer: ImageTokenizer
    cache: TokenCache
    item_ids: list[str]
    item_index: dict[str, int]
    catalogue_images: torch.Tensor
    catalogue_embeds: torch.Tensor
    popularity: torch.Tensor
    ground_truth: dict | None
    reference_embeds: torch.Tensor | None = None
    dropped_ties: dict = dataclasses.field(default_factory=dict)

    def examples(self, split: str, max_users: int | None = None, *, seed: int = 0) -> list[Example]:
        """The ``split`` examples (one per user for valid/test); with ``max_users``, a
        random sample of that many users (fixed by ``seed``), in user order."""
        ex = {"train": self.splits.train, "valid": self.splits.valid, "test": self.splits.test}.get(split)
        if ex is None:
            raise ValueError(f"split must be train, valid or test, got {split!r}")
        tied = set(self.dropped_ties.get(split, ()))
        ex = [e for e in ex if e.user_id not in tied]
        if max_users and max_users < len(ex):
            g = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(len(ex), generator=g)[:max_users].tolist())
            ex = [ex[i] for i in keep]
        return list(ex)

    def sequence_before(self, ex: Example) -> list[str]:
        """The user's items strictly before ``ex``'s target (train [+ valid for test])."""
        seq = self.dataset.item_sequence(ex.user_id)
        return list(seq[: ex.position])


def tied_targets(dataset: Dataset, splits: Splits) -> dict[str, list[str]]:
    """Per split (valid, test), users whose target's timestamp equals the previous interaction's.

    Such a target's order relative to the item before it is an accident of file order, so
    "predict the next item" is ill-posed for it.
    """
    out: dict[str, list[str]] = {"valid": [], "test": []}
    for split in ("valid", "test"):
        for ex in getattr(splits, split):
            ev = sorted(dataset.interactions[ex.user_id], key=lambda x: (x.timestamp, x.line))
            if ex.position >= 1 and ev[ex.position].timestamp == ev[ex.position - 1].timestamp:
                out[split].append(ex.user_id)
    return out


def load_eval_splits(root: str | Path, *, k: int = 4, min_interactions: int = DEFAULT_MIN_INTERACTIONS,
                     drop_tied_targets: bool = True, min_rating: float | None = None, require: str | None = None):
    """``(dataset, splits, tied targets)`` of a native dataset (no image decoded); with ``require``
    ("valid"/"test"), a DataError when no example of that split is left once ties are dropped."""
    root = Path(root)
    ds = load_dataset(root)
    no_image = [i for i, it in ds.items.items() if it.image_path is None]
    if no_image:  # every item is a catalogue image (baselines, retrieval) and may be a history image
        raise DataError(f"{root / ITEMS_FILE}: {len(no_image)} item(s) have no image (first: {no_image[0]!r}); "
                        "evaluation needs an image for every item")
    if min_rating is not None:
        ds = filter_by_rating(ds, min_rating)
    splits = build_splits(ds, k=k, min_interactions=min_interactions)
    ties = tied_targets(ds, splits) if drop_tied_targets else {}
    if require is not None:
        n, tied = len(getattr(splits, require)), len(ties.get(require, []))
        if n - tied < 1:
            raise DataError(f"{root}: no {require} examples to evaluate ({len(ds.interactions)} users, {n} with >= "
                            f"{min_interactions} interactions, {tied} of them dropped because their {require} "
                            "target's timestamp ties the previous interaction)")
    return ds, splits, ties


def prepare_eval_data(root: str | Path, tokenizer: ImageTokenizer, cache_dir: str | Path, embedder, *,
                      k: int = 4, min_interactions: int = DEFAULT_MIN_INTERACTIONS, progress: bool = False,
                      reference_embedder=None, drop_tied_targets: bool = True,
                      min_rating: float | None = None, require: str | None = None) -> EvalData:
    """Load a native dataset, split it, (re)use its token cache and embed the catalogue.

    Args:
        embedder: the evaluation embedder (metrics).
        reference_embedder: the embedder ``retrieve`` ranks with (default: ``embedder``).
        drop_tied_targets: leave out valid/test users whose target ties the previous
            interaction's timestamp (:func:`tied_targets`); they are counted in ``dropped_ties``.
        min_rating: keep only interactions whose ``rating`` column is >= this (positives).
        require: fail before the token cache when this split has no example (:func:`load_eval_splits`).
    """
    root = Path(root)
    ds, splits, ties = load_eval_splits(root, k=k, min_interactions=min_interactions,
                                        drop_tied_targets=drop_tied_targets, min_rating=min_rating, require=require)
    cache = build_token_cache(ds, tokenizer, cache_dir, progress=progress)
    item_ids = sorted(ds.items)
    index = {iid: i for i, iid in enumerate(item_ids)}
    imgs = torch.stack([torch.from_numpy(load_image(ds.items[i].image_path, tokenizer.image_size)) for i in item_ids])
    embeds = embedder.embed(imgs).cpu()
    ref = reference_embedder.embed(imgs).cpu() if reference_embedder is not None else embeds
    pop = torch.zeros(len(item_ids))
    for seq in splits.train_sequences.values():
        for iid in seq:
            pop[index[iid]] += 1
    gt = None
    if (root / "ground_truth.jsonl").is_file():
        gt = load_ground_truth(root)
    return EvalData(root, ds, splits, tokenizer, cache, item_ids, index, imgs, embeds, pop, gt, ref, ties)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How a checkpoint was trained to read prompts (must match at evaluation).

    Attributes:
        instruction, with_titles, history_k, min_interactions: the run's ``data`` settings (its split).
        tokenizer_path: the PatchKMeans file whose codes the model speaks, or None when the
            checkpoint's own VQ model is the tokenizer.
        history_mode: ``data.history_mode`` the model was trained with ("pixels": history
            images through the vision tower; "codes": VQ codes), see :mod:`pgen_engine.data.history`.
    """

    instruction: str
    with_titles: bool
    history_k: int
    tokenizer_path: Path | None
    history_mode: str = "codes"
    min_interactions: int = DEFAULT_MIN_INTERACTIONS

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path, run_config: str | Path | None = None) -> "PromptSettings":
        """Read the training run's resolved config (default: ``CHECKPOINT/../config.resolved.yaml``,
        which ``train.py`` writes next to ``final/``); defaults when there is none."""
        ckpt = Path(checkpoint)
        path = Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml"
        if run_config and not path.is_file():
            raise FileNotFoundError(f"--run-config {path}: file not found")
        run = load_config(path) if path.is_file() else None
        d = run.data if run is not None else DataConfig()
        # the same file training fitted (an unset data.work_dir is <output_dir>/data_work): never
        # the model's VQ for a PatchKMeans run, whose codes it would not speak
        tok = run_tokenizer_file(run)
        if tok is not None and not tok.is_file():
            raise FileNotFoundError(f"{path}: the run's image tokenizer {tok} is missing")

        return cls(d.instruction, d.with_titles, d.history_k, tok, trained_history_mode(ckpt, run_config)[0],
                   d.min_interactions)

    def tokenizer(self, model) -> ImageTokenizer:
        """The image tokenizer matching ``model``'s image vocabulary."""
        tok = PatchKMeansTokenizer.load(self.tokenizer_path) if self.tokenizer_path else VQImageTokenizer(model)
        if (tok.num_tokens, tok.codebook_size) != (model.num_image_tokens, model.codebook_size):
            raise ValueError(f"image tokenizer {self.tokenizer_path or 'vq'} gives {tok.num_tokens} codes/image from "
                             f"{tok.codebook_size} entries; the checkpoint expects {model.num_image_tokens} and "
                             f"{model.codebook_size}")
        return tok

    def prompt_builder(self, model, checkpoint: str | Path, num_tokens: int):
        special = model.special_tokens
        return PromptBuilder(load_text_tokenizer(checkpoint, special), special, num_tokens, mode=self.history_mode,
                             with_titles=self.with_titles, instruction=self.instruction)


@dataclasses.dataclass
class SystemOutput:
    """One system's output for ``U`` users.

    Attributes:
        images: uint8 ``[U*n, H, W, 3]``; row ``u*n + j`` belongs to user ``u``.
        gen_user: int64 ``[U*n]`` user index of each image.
        settings: the sampling settings used (generated systems), else {}.
    """

    name: str
    images: torch.Tensor
    gen_user: torch.Tensor
    settings: dict = dataclasses.field(default_factory=dict)


def build_prompts(data: EvalData, builder, examples: Sequence[Example], *, personalized: bool = True,
                  image_size: int | None = None):
    """Prompts for ``examples``.

    ``personalized=False`` gives the unconditional prompt the model was trained with:
    the "pad" counterpart condition dropout used in SFT (same length, history erased,
    no history images).

    Returns (ids, code masks, pixels): B id lists, B bool lists, and B float32
    ``[n_i, 3, image_size, image_size]`` history images (None where a prompt has none) in
    pixels mode (``builder.mode``; ``image_size`` = the vision tower's), else B Nones.
    """
    ids, masks, pixels = [], [], []
    images = CatalogueImages(data.dataset, image_size) if builder.mode == "pixels" else None
    if images is not None and not image_size:
        raise ValueError("pixels history mode needs the model's image_size")
    for ex in examples:
        hist = list(ex.history)
        p = _prompt(data, builder, ex)
        px = normalize_pixels(images.batch(hist)) if images is not None and hist else None
        if not personalized:
            p, px = builder.unconditional(p, "pad"), None
        ids.append(p.input_ids.tolist())
        masks.append(p.gen_code_mask.tolist())
        pixels.append(px)
    return ids, masks, pixels


def _prompt(data: EvalData, builder, ex: Example):
    """``ex``'s personalised prompt (pixels mode: image placeholders only, no pixels loaded)."""
    hist = list(ex.history)
    titles = [data.dataset.items[i].title for i in hist] if builder.with_titles else None
    if builder.mode == "pixels":
        return builder.build(titles=titles, num_history=len(hist))
    return builder.build(history_codes=data.cache.codes(hist), titles=titles)


def longest_prompt(data: EvalData, builder, examples: Sequence[Example]) -> int:
    """Token length of the longest prompt :func:`build_prompts` gives for ``examples`` (the
    unconditional "pad" prompt has the same length), to size a Generator's ``max_seq_len``."""
    return max((len(_prompt(data, builder, ex).input_ids) for ex in examples), default=0)


@torch.no_grad()
def generate_system(name: str, generator, data: EvalData, builder, examples: Sequence[Example], n: int, *,
                    personalized: bool = True, guidance_scale: float = 1.0, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_prompts: int = 16,
                    progress: bool = False) -> SystemOutput:
    """Generate ``n`` images per example with ``generator`` (a :class:`pgen_engine.Generator`).

    The non-personal prompt is already unconditional, so CFG cannot change it: it is
    sampled at guidance 1 whatever ``guidance_scale`` says.
    """
    ids, masks, pixels = build_prompts(data, builder, examples, personalized=personalized,
                                       image_size=generator.model.image_size)
    if not personalized:
        guidance_scale = 1.0
    codes = []
    it = range(0, len(ids), batch_prompts)
    if progress:
        it = tqdm(it, desc=f"eval {name}", unit="batch")
    for i in it:
        seeds = [(seed * 1_000_003 + j) % 2 ** 64 for j in range(i, min(i + batch_prompts, len(ids)))]
        px = [p for p in pixels[i:i + batch_prompts] if p is not None]
        px = torch.cat(px).to(generator.model.device) if px else None
        codes.append(generator.generate(ids[i:i + batch_prompts], None, px, gen_code_mask=masks[i:i + batch_prompts],
                                        num_samples=n, guidance_scale=guidance_scale, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seeds).cpu())
    codes = torch.cat(codes)
    images = data.tokenizer.decode(codes)
    gen_user = torch.arange(len(examples)).repeat_interleave(n)
    return SystemOutput(name, images, gen_user, {"guidance_scale": guidance_scale, "temperature": temperature,
                                                 "top_k": top_k, "top_p": top_p})


def _from_items(name: str, data: EvalData, items: torch.Tensor) -> SystemOutput:
    """``items [U, n]`` catalogue indices -> their images."""
    U, n = items.shape
    return SystemOutput(name, data.catalogue_images[items.flatten()], torch.arange(U).repeat_interleave(n))


def random_system(data: EvalData, examples: Sequence[Example], n: int, *, seed: int = 0) -> SystemOutput:
    """n uniformly random catalogue items per user (with replacement across users; cycled when C < n)."""
    g = torch.Generator().manual_seed(seed)
    C = len(data.item_ids)
    cyc = torch.arange(n) % C
    return _from_items("random", data, torch.stack([torch.randperm(C, generator=g)[cyc] for _ in examples]))


def centroid_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """The n items nearest the catalogue mean (evaluation embedding), same for every user."""
    e = data.catalogue_embeds
    top = M.cosine_matrix(e.mean(0, keepdim=True), e)[0].topk(min(n, e.shape[0])).indices
    top = top[torch.arange(n) % top.shape[0]]
    return _from_items("centroid", data, top.expand(len(examples), n))


def popularity_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """The n most consumed train items (ties broken by catalogue order), same for every user."""
    C = len(data.item_ids)
    base = data.popularity - torch.arange(C) * 1e-6  # deterministic ties, same order of counts
    top = base.topk(min(n, C)).indices
    top = top[torch.arange(n) % top.shape[0]]
    return _from_items("popularity", data, top.expand(len(examples), n))


def _recent_first(data: EvalData, ex: Example, system: str) -> list[int]:
    """Catalogue indices of ``ex``'s history window, most recent first (ValueError naming
    ``system`` and the user when the window is empty)."""
    if not ex.history:
        raise ValueError(f"{system}: user {ex.user_id} has an empty history")
    return [data.item_index[i] for i in reversed(ex.history)]


def copy_last_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """The user's history window, most recent first, cycled to n images."""
    windows = [_recent_first(data, ex, "copy_last") for ex in examples]
    return _from_items("copy_last", data, torch.tensor([[h[j % len(h)] for j in range(n)] for h in windows]))


def repeat_last_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """The user's most recent history item, n copies."""
    last = [_recent_first(data, ex, "repeat_last")[0] for ex in examples]
    return _from_items("repeat_last", data, torch.tensor([[i] * n for i in last]))


def retrieve_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """Retrieve-and-rank on the generator's history window: the n catalogue items nearest
    the window's mean (reference embedder). No answer-aware filtering; history items allowed."""
    ref = data.reference_embeds if data.reference_embeds is not None else data.catalogue_embeds
    rows = []
    for ex in examples:
        e = ref[[data.item_index[i] for i in ex.history]].mean(0, keepdim=True)
        rows.append(M.cosine_matrix(e, ref)[0].topk(min(n, ref.shape[0])).indices)
    top = torch.stack(rows)
    return _from_items("retrieve", data, top[:, torch.arange(n) % top.shape[1]])


def true_next_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """The held-out item through the image tokenizer (encode + decode), n copies: a ceiling."""
    codes = data.cache.codes([ex.target for ex in examples])
    images = data.tokenizer.decode(codes)
    return SystemOutput("true_next", images.repeat_interleave(n, dim=0), torch.arange(len(examples)).repeat_interleave(n))


def baseline_systems(data: EvalData, examples: Sequence[Example], n: int, *, seed: int = 0) -> dict[str, SystemOutput]:
    """Every baseline, in :data:`BASELINES` order."""
    return {"random": random_system(data, examples, n, seed=seed), "centroid": centroid_system(data, examples, n),
            "popularity": popularity_system(data, examples, n), "copy_last": copy_last_system(data, examples, n),
            "repeat_last": repeat_last_system(data, examples, n),
            "retrieve": retrieve_system(data, examples, n), "true_next": true_next_system(data, examples, n)}


def _attr_targets(data: EvalData, ex: Example) -> tuple[list[int], list[int]]:
    steps = data.ground_truth.get(ex.user_id, [])
    try:  # a ground_truth.jsonl of another (version of the) dataset: a KeyError / IndexError / traceback
        cur, fut = steps[max(ex.position - 1, 0)]["preferred"], steps[ex.position]["preferred"]
        return list(attributes_to_codes(cur)), list(attributes_to_codes(fut))
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{data.root / 'ground_truth.jsonl'}: user {ex.user_id!r} has {len(steps)} steps, no usable "
                        f"'preferred' at step {ex.position} ({type(e).__name__}: {e}); does it match the dataset?") from None


def _per_user_mean(values: torch.Tensor, gen_user: torch.Tensor, U: int) -> torch.Tensor:
    """Mean of per-image ``values [N]`` per user -> ``[U]`` (NaN images skipped; NaN if none)."""
    v = values.double()
    ok = ~torch.isnan(v)
    s = torch.zeros(U, dtype=torch.float64).index_add_(0, gen_user, torch.where(ok, v, torch.zeros_like(v)))
    c = torch.zeros(U, dtype=torch.float64).index_add_(0, gen_user, ok.double())
    return torch.where(c > 0, s / c.clamp(min=1), torch.full_like(s, float("nan")))


def per_user_metrics(out: SystemOutput, data: EvalData, examples: Sequence[Example], embedder,
                     k: int = 10) -> dict[str, torch.Tensor]:
    """Every metric of one system as a per-user float64 tensor ``[U]`` (NaN = undefined)."""
    U = len(examples)
    gu = out.gen_user.long()
    e = embedder.embed(out.images).cpu()
    hist = [data.catalogue_embeds[[data.item_index[i] for i in data.sequence_before(ex)]] for ex in examples]
    window = [data.catalogue_embeds[[data.item_index[i] for i in ex.history]] for ex in examples]
    true = torch.tensor([data.item_index[ex.target] for ex in examples])
    row: dict[str, torch.Tensor] = {}
    ranks_u = M.user_id_ranks(e, gu, window).double()
    row["user_id_acc"] = _per_user_mean((ranks_u == 1).double(), gu, U)
    row["user_id_mean_rank"] = _per_user_mean(ranks_u, gu, U)
    ha = M.history_alignment(e, gu, hist, k=5)
    row["hist_max"] = _per_user_mean(ha["max"], gu, U)
    row["hist_top5"] = _per_user_mean(ha["top5_mean"], gu, U)
    fut_sim = M.row_cosines(e, data.catalogue_embeds[true][gu])  # [N]: each image against its user's target
    row["future_sim"] = _per_user_mean(fut_sim, gu, U)
    scores = M.generated_item_scores(e, gu, data.catalogue_embeds, U)
    ranks = M.true_item_ranks(scores, true).double()
    row[f"hr@{k}"] = (ranks < k).double()
    row[f"ndcg@{k}"] = torch.where(ranks < k, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    row["diversity"] = M.user_diversity(e, gu, U).double()
    row["novelty"] = _per_user_mean(M.novelty(e, data.catalogue_embeds), gu, U)
    if data.ground_truth is not None:
        pred = read_attributes(out.images)
        cur, fut_t = zip(*(_attr_targets(data, ex) for ex in examples))
        row["attr_acc_current"] = _per_user_mean((pred == torch.tensor(cur)[gu]).double().mean(1), gu, U)
        row["attr_acc_future"] = _per_user_mean((pred == torch.tensor(fut_t)[gu]).double().mean(1), gu, U)
    return row


def compute_metrics(out: SystemOutput, data: EvalData, examples: Sequence[Example], embedder) -> dict[str, float]:
    """The table row of one system: per-user metrics averaged over users."""
    return {m: M.nanmean(v) for m, v in per_user_metrics(out, data, examples, embedder).items()}


METRIC_HELP = {
    "user_id_acc": "share of images whose closest user (mean cosine to the history window) is their own user",
    "user_id_mean_rank": "mean 1-based rank of the true user among all evaluated users (lower is better)",
    "hist_max": "max cosine of an image to the user's history items",
    "hist_top5": "mean of the 5 highest cosines to the history",
    "future_sim": "cosine to the user's held-out next item",
    "hr@10": "next item among the 10 catalogue items most similar to the user's images",
    "ndcg@10": "NDCG@10 of the next item (same ranking)",
    "diversity": "1 - mean pairwise cosine among a user's images",
    "novelty": "1 - cosine to the nearest catalogue item",
    "attr_acc_current": "synthetic: attributes matching the user's current preference (exact read-out)",
    "attr_acc_future": "synthetic: attributes matching the preference at the next item's time",
}


def select_sampling(make_output: Callable[[dict], SystemOutput], data: EvalData, examples: Sequence[Example],
                    embedder, grid: Sequence[dict], metric: str) -> tuple[dict, dict[str, float]]:
    """Pick the sampling settings with the best validation ``metric`` (first best wins; lowest for
    a lower-is-better metric). ``make_output``: settings dict -> that system's output on ``examples``
    (validation users); ``grid``: candidate settings, e.g. ``[{"guidance_scale": 1, "temperature": 1}]``.
    Returns (best settings, {label: validation score}); without examples, the first settings, no score.
    """
    if not grid:
        raise ValueError("select_sampling: empty grid")
    if not examples:
        return dict(grid[0]), {}
    scores, best, best_v, sign = {}, None, -math.inf, -1.0 if metric in LOWER_IS_BETTER else 1.0
    for st in grid:
        v = M.nanmean(per_user_metrics(make_output(st), data, examples, embedder)[metric])
        scores[", ".join(f"{k}={x:g}" for k, x in st.items())] = v
        if not math.isnan(v) and sign * v > best_v:
            best, best_v = dict(st), sign * v
    return (best if best is not None else dict(grid[0])), scores
