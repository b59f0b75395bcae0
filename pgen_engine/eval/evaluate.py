""""Generate" measured against "recommend": one table for generators and baselines.

Every system produces, for each evaluated user, ``n`` images (generated, or the images
of the ``n`` catalogue items it recommends) and — for ranking — catalogue scores
``[U, C]`` (recommenders score items directly; generators score them by the similarity of
their generated images, :func:`pgen_engine.eval.metrics.generated_item_scores`). The same
metric code then runs for every row of the table.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch

from pgen_engine.data.dataset import Dataset, load_dataset, load_image
from pgen_engine.data.splits import Example, Splits, build_splits
from pgen_engine.data.token_cache import TokenCache, build_token_cache
from pgen_engine.eval import metrics as M
from pgen_engine.models.image_tokenizer import ImageTokenizer


@dataclasses.dataclass
class EvalData:
    """Dataset, splits, codes and catalogue embeddings shared by every evaluated system.

    Attributes:
        item_ids: catalogue order (index = item index in every ``[.., C]`` tensor).
        catalogue_images: uint8 ``[C,H,W,3]`` at the tokenizer's image size.
        catalogue_embeds: float ``[C,D]`` L2-normalised.
        popularity: float ``[C]`` train-split interaction counts.
        ground_truth: synthetic datasets only: user -> per-step dicts (``preferred``).
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

    def examples(self, split: str, max_users: int | None = None) -> list[Example]:
        """The ``split`` examples (one per user for valid/test), first ``max_users``."""
        ex = {"train": self.splits.train, "valid": self.splits.valid, "test": self.splits.test}.get(split)
        if ex is None:
            raise ValueError(f"split must be train, valid or test, got {split!r}")
        return list(ex[:max_users] if max_users else ex)

    def sequence_before(self, ex: Example) -> list[str]:
        """The user's items strictly before ``ex``'s target (train [+ valid for test])."""
        seq = self.dataset.item_sequence(ex.user_id)
        return list(seq[: ex.position])


def prepare_eval_data(root: str | Path, tokenizer: ImageTokenizer, cache_dir: str | Path, embedder, *,
                      k: int = 4, min_interactions: int = 5, progress: bool = False) -> EvalData:
    """Load a native dataset, split it, (re)use its token cache and embed the catalogue."""
    root = Path(root)
    ds = load_dataset(root)
    splits = build_splits(ds, k=k, min_interactions=min_interactions)
    cache = build_token_cache(ds, tokenizer, cache_dir, progress=progress)
    item_ids = sorted(ds.items)
    index = {iid: i for i, iid in enumerate(item_ids)}
    imgs = torch.stack([torch.from_numpy(load_image(ds.items[i].image_path, tokenizer.image_size)) for i in item_ids])
    embeds = embedder.embed(imgs).cpu()
    pop = torch.zeros(len(item_ids))
    for seq in splits.train_sequences.values():
        for iid in seq:
            pop[index[iid]] += 1
    gt = None
    if (root / "ground_truth.jsonl").is_file():
        from pgen_engine.data.synth import load_ground_truth

        gt = load_ground_truth(root)
    return EvalData(root, ds, splits, tokenizer, cache, item_ids, index, imgs, embeds, pop, gt)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How a checkpoint was trained to read prompts (must match at evaluation).

    Attributes:
        instruction, with_titles, history_k: the run's ``data`` settings.
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

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path, run_config: str | Path | None = None) -> "PromptSettings":
        """Read the training run's resolved config (default: ``CHECKPOINT/../config.resolved.yaml``,
        which ``train.py`` writes next to ``final/``); defaults when there is none."""
        from pgen_engine.config import DataConfig, load_config

        ckpt = Path(checkpoint)
        path = Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml"
        if run_config and not path.is_file():
            raise FileNotFoundError(f"--run-config {path}: file not found")
        d = load_config(path).data if path.is_file() else DataConfig()
        tok = None
        if d.tokenizer == "patch_kmeans" and d.work_dir:
            tok = Path(d.work_dir) / "tokenizer.safetensors"
            if not tok.is_file():
                raise FileNotFoundError(f"{path}: the run's image tokenizer {tok} is missing")
        from pgen_engine.data.history import trained_history_mode

        return cls(d.instruction, d.with_titles, d.history_k, tok, trained_history_mode(ckpt, run_config)[0])

    def tokenizer(self, model) -> ImageTokenizer:
        """The image tokenizer matching ``model``'s image vocabulary."""
        from pgen_engine.models.image_tokenizer import VQImageTokenizer
        from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

        tok = PatchKMeansTokenizer.load(self.tokenizer_path) if self.tokenizer_path else VQImageTokenizer(model)
        if (tok.num_tokens, tok.codebook_size) != (model.num_image_tokens, model.codebook_size):
            raise ValueError(f"image tokenizer {self.tokenizer_path or 'vq'} gives {tok.num_tokens} codes/image from "
                             f"{tok.codebook_size} entries; the checkpoint expects {model.num_image_tokens} and "
                             f"{model.codebook_size}")
        return tok

    def prompt_builder(self, model, checkpoint: str | Path, num_tokens: int):
        from pgen_engine.data.prompts import PromptBuilder
        from pgen_engine.data.text_tokenizer import load_text_tokenizer

        special = model.special_tokens
        return PromptBuilder(load_text_tokenizer(checkpoint, special), special, num_tokens, mode=self.history_mode,
                             with_titles=self.with_titles, instruction=self.instruction)


@dataclasses.dataclass
class SystemOutput:
    """One system's output for ``U`` users.

    Attributes:
        images: uint8 ``[U*n, H, W, 3]``; row ``u*n + j`` belongs to user ``u``.
        gen_user: int64 ``[U*n]`` user index of each image.
        scores: float ``[U, C]`` catalogue scores for ranking, or None (derive from images).
        kind: "generate" or "recommend".
    """

    name: str
    images: torch.Tensor
    gen_user: torch.Tensor
    scores: torch.Tensor | None
    kind: str


def build_prompts(data: EvalData, builder, examples: Sequence[Example], *, personalized: bool = True,
                  image_size: int | None = None):
    """Prompts for ``examples``; non-personalized = empty history.

    Returns (ids, code masks, pixels): B id lists, B bool lists, and B float32
    ``[n_i, 3, image_size, image_size]`` history images (None where a prompt has none) in
    pixels mode (``builder.mode``; ``image_size`` = the vision tower's), else B Nones.
    """
    from pgen_engine.data.history import CatalogueImages
    from pgen_engine.data.prompts import normalize_pixels

    ids, masks, pixels = [], [], []
    T = data.tokenizer.num_tokens
    images = CatalogueImages(data.dataset, image_size) if builder.mode == "pixels" else None
    if images is not None and not image_size:
        raise ValueError("pixels history mode needs the model's image_size")
    for ex in examples:
        hist = list(ex.history) if personalized else []
        titles = [data.dataset.items[i].title for i in hist]
        titles = titles if builder.with_titles else None
        if images is not None:
            p = builder.build(titles=titles, num_history=len(hist))
            pixels.append(normalize_pixels(images.batch(hist)) if hist else None)
        else:
            codes = data.cache.codes(hist) if hist else torch.zeros(0, T, dtype=torch.long)
            p = builder.build(history_codes=codes, titles=titles)
            pixels.append(None)
        ids.append(p.input_ids.tolist())
        masks.append(p.gen_code_mask.tolist())
    return ids, masks, pixels


@torch.no_grad()
def generate_system(name: str, generator, data: EvalData, builder, examples: Sequence[Example], n: int, *,
                    personalized: bool = True, guidance_scale: float = 5.0, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_prompts: int = 16,
                    progress: bool = False) -> SystemOutput:
    """Generate ``n`` images per example with ``generator`` (a :class:`pgen_engine.Generator`)."""
    ids, masks, pixels = build_prompts(data, builder, examples, personalized=personalized,
                                       image_size=generator.model.image_size)
    codes = []
    it = range(0, len(ids), batch_prompts)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"eval {name}", unit="batch")
    for i in it:
        seeds = [seed * 1_000_003 + j for j in range(i, min(i + batch_prompts, len(ids)))]
        px = [p for p in pixels[i:i + batch_prompts] if p is not None]
        px = torch.cat(px).to(generator.model.device) if px else None
        codes.append(generator.generate(ids[i:i + batch_prompts], None, px, gen_code_mask=masks[i:i + batch_prompts],
                                        num_samples=n, guidance_scale=guidance_scale, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seeds).cpu())
    codes = torch.cat(codes)
    images = data.tokenizer.decode(codes)
    gen_user = torch.arange(len(examples)).repeat_interleave(n)
    return SystemOutput(name, images, gen_user, None, "generate")


def _exclusions(data: EvalData, examples: Sequence[Example]) -> list[list[int]]:
    # History items are not recommended back, except the true item itself (repeat interactions).
    out = []
    for ex in examples:
        hist = {data.item_index[i] for i in data.sequence_before(ex)}
        hist.discard(data.item_index[ex.target])
        out.append(sorted(hist))
    return out


def _recommend_from_scores(name: str, data: EvalData, examples, scores: torch.Tensor, n: int) -> SystemOutput:
    excl = _exclusions(data, examples)
    s = scores.clone()
    for u, items in enumerate(excl):
        if items:
            s[u, items] = float("-inf")
    top = s.topk(n, dim=1).indices  # [U, n]
    images = data.catalogue_images[top.flatten()]
    return SystemOutput(name, images, torch.arange(len(examples)).repeat_interleave(n), scores, "recommend")


def popularity_system(data: EvalData, examples: Sequence[Example], n: int) -> SystemOutput:
    """Recommend the most popular train items (ties broken by catalogue order)."""
    C = len(data.item_ids)
    # tiny decreasing offset makes ties deterministic without changing the order of counts
    base = data.popularity - torch.arange(C) * 1e-6
    return _recommend_from_scores("popularity", data, examples, base.expand(len(examples), C).clone(), n)


def retrieve_system(data: EvalData, examples: Sequence[Example], n: int, *, recent: int | None = None
                    ) -> SystemOutput:
    """"Recommend": score catalogue items by cosine to the mean embedding of the user's history."""
    rows = []
    for ex in examples:
        hist = data.sequence_before(ex)
        if recent:
            hist = hist[-recent:]
        e = data.catalogue_embeds[[data.item_index[i] for i in hist]].mean(0, keepdim=True)
        rows.append(M.cosine_matrix(e, data.catalogue_embeds)[0])
    return _recommend_from_scores("recommend (retrieve-and-rank)", data, examples, torch.stack(rows), n)


def _attr_targets(data: EvalData, ex: Example) -> tuple[list[int], list[int]]:
    from pgen_engine.data.synth import attributes_to_codes

    steps = data.ground_truth[ex.user_id]
    cur = steps[max(ex.position - 1, 0)]["preferred"]
    fut = steps[ex.position]["preferred"]
    return list(attributes_to_codes(cur)), list(attributes_to_codes(fut))


def compute_metrics(out: SystemOutput, data: EvalData, examples: Sequence[Example], embedder,
                    ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """The table row of one system (means over images / users)."""
    U = len(examples)
    e = embedder.embed(out.images).cpu()
    hist = [data.catalogue_embeds[[data.item_index[i] for i in data.sequence_before(ex)]] for ex in examples]
    true = torch.tensor([data.item_index[ex.target] for ex in examples])
    fut = [data.catalogue_embeds[true[u]].unsqueeze(0) for u in range(U)]
    row: dict[str, float] = {}
    ha = M.history_alignment(e, out.gen_user, hist, k=5)
    row["hist_max"] = M.nanmean(ha["max"])
    row["hist_top5"] = M.nanmean(ha["top5_mean"])
    row["future_sim"] = M.nanmean(M.future_alignment(e, out.gen_user, fut)["max"])
    scores = out.scores if out.scores is not None else M.generated_item_scores(e, out.gen_user, data.catalogue_embeds, U)
    rk = M.rank_metrics(scores, true, ks=ks, exclude=_exclusions(data, examples))
    for k in ks:
        row[f"hr@{k}"] = rk[f"hr@{k}"]
        row[f"ndcg@{k}"] = rk[f"ndcg@{k}"]
    row["diversity"] = M.nanmean(M.user_diversity(e, out.gen_user, U))
    nov = M.novelty(e, data.catalogue_embeds)
    row["novelty"] = M.nanmean(nov)
    if data.ground_truth is not None:
        from pgen_engine.data.synth import read_attributes

        pred = read_attributes(out.images)
        cur, fut_t = zip(*(_attr_targets(data, ex) for ex in examples))
        cur_t = torch.tensor(cur)[out.gen_user]
        fut_t = torch.tensor(fut_t)[out.gen_user]
        row["attr_acc_current"] = float(M.attribute_accuracy(pred, cur_t)["mean"])
        row["attr_acc_future"] = float(M.attribute_accuracy(pred, fut_t)["mean"])
    return row


METRIC_HELP = {
    "hist_max": "max cosine of an image to the user's history items",
    "hist_top5": "mean of the 5 highest cosines to the history",
    "future_sim": "cosine to the user's held-out next item",
    "hr@1": "next item ranked first among the catalogue (image-similarity scores)",
    "hr@10": "next item in the top 10",
    "ndcg@10": "NDCG@10 of the next item",
    "diversity": "1 - mean pairwise cosine among a user's images",
    "novelty": "1 - cosine to the nearest catalogue item",
    "attr_acc_current": "synthetic: attributes matching the user's current preference (exact read-out)",
    "attr_acc_future": "synthetic: attributes matching the preference at the next item's time",
}


def format_table(rows: dict[str, dict[str, float]], digits: int = 3) -> str:
    """Markdown table: one row per system, one column per metric."""
    cols = [c for c in METRIC_HELP if any(c in r for r in rows.values())]
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        vals = ["—" if c not in r or (isinstance(r[c], float) and math.isnan(r[c])) else f"{r[c]:.{digits}f}"
                for c in cols]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
