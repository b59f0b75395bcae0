"""Everything a run needs from ``data:`` — made on rank 0, reused when present.

Order (rank 0; other ranks wait and then open the results read-only):

1. the dataset folder (``data.dataset_dir``); with ``data.synth`` set and the folder
   missing, the synthetic dataset is generated there;
2. the image tokenizer: ``patch_kmeans`` is fit on the dataset's images and saved under
   ``<work_dir>/tokenizer.safetensors`` (reused next time); ``vq`` trains a small Janus
   VQ-VAE on the train split's item images into ``<work_dir>/vq_tokenizer.safetensors``
   (reused while images and settings are unchanged; the init model gets it as its
   ``vqmodel.*``); ``checkpoint_vq`` uses the model checkpoint's VQ;
3. the model directory: ``model.checkpoint``, or a tiny random Janus created for the
   tokenizer under ``<output_dir>/init_model`` (:mod:`pgen_engine.training.init`);
4. the image-token cache under ``<work_dir>/token_cache_<fingerprint>``.

Any failure on rank 0 is broadcast, so every rank stops with the same one-line error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pgen_engine.config import RunConfig
from pgen_engine.data.dataset import DataError, load_dataset, load_image
from pgen_engine.data.fit_tokenizer import TokenizerFitSettings, fit_tokenizer
from pgen_engine.data.history import CatalogueImages
from pgen_engine.data.history_mode import HistoryModeError, run_history_mode
from pgen_engine.data.prompts import PromptBuilder, SFTDataset
from pgen_engine.models.image_quality import quality_line
from pgen_engine.models.vq_tokenizer import JanusVQTokenizer
from pgen_engine.data.splits import build_splits
from pgen_engine.data.synth import SynthConfig, generate_synthetic
from pgen_engine.data.text_tokenizer import load_text_tokenizer
from pgen_engine.data.token_cache import TokenCache, build_token_cache
from pgen_engine.data.vision_cache import VisionCache, build_vision_cache
from pgen_engine.errors import PgenUserError, one_line
from pgen_engine.file_lock import exclusive
from pgen_engine.models import load_model
from pgen_engine.models.janus_config import JanusModelConfig
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.models.special_tokens import SpecialTokens

from .distributed import DistInfo, on_main
from .engine import model_dtype
from .init import init_model_for_tokenizer


class DataPrepError(PgenUserError, RuntimeError):
    """Data preparation failed; the message is one line naming the path/key."""


@dataclasses.dataclass
class SFTData:
    """Prepared inputs of a run.

    Attributes:
        model_dir: the Hugging Face checkpoint directory the model is loaded from.
        dataset: the SFT torch dataset over training windows (``pgen_engine.data.prompts.SFTDataset``).
        special: special token ids (of the model).
        splits: the splits (RL reuses them for future-interest rewards).
        tokenizer: the image tokenizer.
    """

    model_dir: Path
    dataset: object
    special: object
    splits: object
    tokenizer: object


def work_dir(cfg: RunConfig) -> Path:
    """Where the tokenizer and token cache live (``data.work_dir`` or ``<output_dir>/data_work``)."""
    return Path(cfg.data.work_dir) if cfg.data.work_dir else Path(cfg.output_dir) / "data_work"


def ensure_dataset(cfg: RunConfig) -> Path:
    """The dataset folder, generating the synthetic dataset when configured and missing."""
    root = Path(cfg.data.dataset_dir)
    if (root / "interactions.csv").is_file():
        return root
    if cfg.data.synth is None:
        raise DataPrepError(f"data.dataset_dir={root}: dataset not found (no interactions.csv there); "
                            "point data.dataset_dir at a native-layout dataset or set data.synth to generate one")

    s = cfg.data.synth
    # runs side by side with their own work_dir may share the dataset folder: one generates it
    with exclusive(root.parent / f".{root.name}.lock", f"generating the synthetic dataset {root}"):
        if (root / "interactions.csv").is_file():  # another run generated it while this one waited
            return root
        if root.exists() and any(root.iterdir()):
            raise DataPrepError(f"data.dataset_dir={root}: folder exists but holds no interactions.csv; "
                                "refusing to generate the synthetic dataset over it")
        generate_synthetic(root, SynthConfig(num_users=s.users, num_items=s.items, image_size=s.image_size,
                                             seed=s.seed, drift=s.drift, fidelity=s.fidelity))
    return root


def work_dir_lock(wd: Path):
    """Context manager (also a decorator): the exclusive lock of the work dir ``wd``
    (``work_dir(cfg)``; see :mod:`pgen_engine.file_lock`).

    Held by rank 0 while it fits or checks the tokenizer, the token and vision caches and the
    reward embedder there, so runs sharing a work_dir make each file once and reuse it.
    """
    return exclusive(Path(wd) / ".prepare.lock", f"data preparation in {wd}")


def _item_images(dataset, size: int) -> torch.Tensor:
    imgs = [load_image(it.image_path, size) for it in dataset.items.values() if it.image_path is not None]
    if not imgs:
        raise DataPrepError(f"{dataset.root}: no item images to fit the image tokenizer on")
    return torch.from_numpy(np.stack(imgs))


def load_or_fit_tokenizer(cfg: RunConfig, dataset, *, fit: bool):
    """The PatchKMeans tokenizer at ``<work_dir>/tokenizer.safetensors`` (fit and saved when missing and ``fit``).

    A file of another geometry (``data.tokenizer_image_size`` / ``patch_size`` /
    ``codebook_size``) is refused (DataPrepError), never replaced: runs trained with it read
    it back from the same path."""
    d = cfg.data
    path = work_dir(cfg) / "tokenizer.safetensors"
    if path.is_file():
        try:
            tok = PatchKMeansTokenizer.load(path)
        except ValueError as e:  # truncated, garbage, or another kind of safetensors file
            raise DataPrepError(f"{one_line(e)}; delete it to fit a new tokenizer (runs trained with the old one "
                                "cannot use the new one: keep data.work_dir per tokenizer)") from None
        have = (tok.image_size, tok.patch_size, tok.codebook_size)
        if have == (d.tokenizer_image_size, d.patch_size, d.codebook_size):
            return tok
        if not fit:
            raise DataPrepError(f"{path}: tokenizer geometry changed while preparing data")
        # Refitting here used to replace the tokenizer that earlier runs sharing this work_dir
        # were trained with: their `pgen eval` / `pgen generate` / RL then read the new codes
        # (same token count and codebook size: no error, just wrong images).
        raise DataPrepError(f"{path}: holds a PatchKMeans tokenizer of image_size={have[0]}, patch_size={have[1]}, "
                            f"codebook_size={have[2]}, this run asks for data.tokenizer_image_size="
                            f"{d.tokenizer_image_size}, data.patch_size={d.patch_size}, data.codebook_size="
                            f"{d.codebook_size}; runs trained with it still need it: set another data.work_dir "
                            "(or delete the file if no run uses it)")
    if not fit:
        raise DataPrepError(f"{path}: tokenizer missing")
    tok = PatchKMeansTokenizer.fit(_item_images(dataset, d.tokenizer_image_size), patch_size=d.patch_size,
                                   codebook_size=d.codebook_size, iters=d.kmeans_iters, seed=cfg.seed)
    tok.save(path)
    return tok


# The VQ tokenizer is data preparation shared by every run seed (SFT and RL of all seeds
# must speak the same codes), so it is trained with this fixed seed, not ``cfg.seed``.
VQ_FIT_SEED = 0


def load_or_fit_vq(cfg: RunConfig, dataset, *, fit: bool):
    """The Janus VQ tokenizer at ``<work_dir>/vq_tokenizer.safetensors``.

    With ``fit``: trained on the train split's item images (:func:`pgen_engine.data.fit_tokenizer.fit_tokenizer`,
    ``data.vq_time_budget_s`` / ``data.vq_max_steps``), or reused when the file was fit on
    the same images and settings; its held-out reconstruction line is printed. Without
    ``fit`` (other ranks): the file rank 0 wrote.
    """
    d = cfg.data
    path = work_dir(cfg) / "vq_tokenizer.safetensors"
    if fit:
        s = TokenizerFitSettings(kind="vq", image_size=d.tokenizer_image_size,
                                 codes_per_side=d.tokenizer_image_size // d.patch_size, codebook=d.codebook_size,
                                 seed=VQ_FIT_SEED, time_budget_s=d.vq_time_budget_s, max_steps=d.vq_max_steps)
        tok, quality, reused = fit_tokenizer(dataset, path, s, progress=cfg.logging.progress)
        print(f"[data] {'reusing' if reused else 'trained'} VQ tokenizer {path}: {quality_line(quality)}", flush=True)
        return tok
    if not path.is_file():
        raise DataPrepError(f"{path}: VQ tokenizer missing")
    return JanusVQTokenizer.load(path)


def _tokenizer(cfg: RunConfig, dataset, *, fit: bool):
    if cfg.data.tokenizer == "patch_kmeans":
        return load_or_fit_tokenizer(cfg, dataset, fit=fit)
    if cfg.data.tokenizer == "vq":
        return load_or_fit_vq(cfg, dataset, fit=fit)
    if cfg.model.checkpoint is None:
        raise DataPrepError("data.tokenizer=checkpoint_vq needs model.checkpoint (a checkpoint with a VQ model)")

    # only vq_config + model.vqmodel.* are read (not the LM); same fingerprint as VQImageTokenizer
    tok = JanusVQTokenizer.from_checkpoint(cfg.model.checkpoint)
    if torch.cuda.is_available():  # encode data / decode reward images on this rank's GPU, not the host
        tok.vqvae.to(torch.device("cuda", torch.cuda.current_device()))
    return tok


def _model_dir(cfg: RunConfig, tokenizer) -> Path:
    if cfg.model.checkpoint is not None:
        p = Path(cfg.model.checkpoint)
        if not (p / "config.json").is_file():
            raise DataPrepError(f"model.checkpoint={p}: not a Hugging Face checkpoint directory (no config.json)")
        return p
    return init_model_for_tokenizer(Path(cfg.output_dir) / "init_model", tokenizer, cfg.model.init)


def _cache_dir(cfg: RunConfig, tokenizer) -> Path:
    return work_dir(cfg) / f"token_cache_{tokenizer.fingerprint()[:16]}"


def caches_vision_features(cfg: RunConfig, mode: str) -> bool:
    """Pixels history with a frozen vision tower: its outputs are computed once per item."""
    return mode == "pixels" and "vision_model" not in cfg.train.trainable


def _prepare_on_main(cfg: RunConfig, feature_dtype: torch.dtype = torch.float32) -> tuple[str | None, str | None]:
    """Rank-0 side effects; returns (error line or None, vision feature cache folder or None).
    ``feature_dtype``: the dtype the run trains in (the vision feature cache is stored in it)."""
    try:
        root = ensure_dataset(cfg)
        with work_dir_lock(work_dir(cfg)):
            dataset = load_dataset(root)
            tok = _tokenizer(cfg, dataset, fit=True)
            model_dir = _model_dir(cfg, tok)
            build_token_cache(dataset, tok, _cache_dir(cfg, tok), progress=False)
            vision = None
            if caches_vision_features(cfg, run_history_mode(cfg.data.history_mode, cfg.model.checkpoint)):
                vision = str(build_vision_cache(dataset, load_model(model_dir), work_dir(cfg) / "vision",
                                                dtype=feature_dtype).root)
    except (DataPrepError, DataError, HistoryModeError, ValueError, KeyError, OSError) as e:
        return (str(e).strip().splitlines()[0] if str(e).strip() else repr(e)), None
    return None, vision


def prepare_sft_data(cfg: RunConfig, dist_info: DistInfo) -> SFTData:
    """Prepare (rank 0) and open (every rank) the SFT inputs of ``cfg``.

    Raises:
        DataPrepError: missing dataset, unusable tokenizer/model geometry, bad data —
            on every rank, with rank 0's message.
    """
    feature_dtype = model_dtype(cfg.deepspeed, dist_info.device)  # a bf16 run stores bf16 features (half the bytes)
    # an unforeseen exception on rank 0 (a bug, a CUDA OOM) stops the other ranks too, not a hang
    err, vision_dir = on_main(lambda: _prepare_on_main(cfg, feature_dtype), dist_info.is_main)
    if err is not None:
        raise DataPrepError(err)
    d = cfg.data  # on_main returned on every rank after rank 0 finished: its files are ready
    dataset = load_dataset(d.dataset_dir, check_images=False)
    tok = _tokenizer(cfg, dataset, fit=False)
    model_dir = _model_dir(cfg, tok)
    mcfg = JanusModelConfig.from_dir(model_dir)
    if (mcfg.num_image_tokens, mcfg.codebook_size) != (tok.num_tokens, tok.codebook_size):
        raise DataPrepError(f"{model_dir}: model has {mcfg.num_image_tokens} image tokens x {mcfg.codebook_size} "
                            f"codes, the image tokenizer gives {tok.num_tokens} x {tok.codebook_size}")
    cache = TokenCache.open(_cache_dir(cfg, tok), tok.fingerprint())
    splits = build_splits(dataset, k=d.history_k, stride=d.stride, max_windows_per_user=d.max_windows_per_user,
                          min_interactions=d.min_interactions)
    if not splits.train:
        raise DataPrepError(f"data.dataset_dir={d.dataset_dir}: no training windows (users need >= "
                            f"data.min_interactions={d.min_interactions} interactions)")
    special = SpecialTokens.from_checkpoint(model_dir)
    text_tok = load_text_tokenizer(model_dir, special)
    try:
        mode = run_history_mode(d.history_mode, cfg.model.checkpoint)
    except (HistoryModeError, OSError, ValueError) as e:
        raise DataPrepError(str(e)) from None
    d.history_mode = mode  # what the run trains with (the init model has a vision tower)
    # T codes (codes mode) or T <image> placeholders (pixels mode): the model's image tokens,
    # checked above to equal the tokenizer's
    builder = PromptBuilder(text_tok, special, tok.num_tokens, mode=mode, with_titles=d.with_titles,
                            instruction=d.instruction)
    titles = {k: v.title for k, v in dataset.items.items()}
    loader = CatalogueImages(dataset, mcfg.image_size) if mode == "pixels" else None
    features = None
    if vision_dir is not None:
        vc = VisionCache.open(vision_dir, Path(vision_dir).name.removeprefix("vision_"))
        features = vc.features
    return SFTData(model_dir, SFTDataset(splits.train, cache, builder, titles=titles, image_loader=loader,
                                         vision_features=features), special, splits, tok)


_SAMPLE = 1 << 20  # bytes read at each of three places of a weight file


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a checkpoint folder's ``config.json`` and, per weight file (``*.safetensors``,
    ``*.bin``): its name, size and 1 MiB at its start, middle and end — cheap for a 7B model, and
    a retrained or other model of the same shapes differs there."""
    root = Path(model_dir)
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = f.stat().st_size
        h.update(json.dumps([f.name, size]).encode())
        with open(f, "rb") as fh:
            for at in (0, size // 2, max(size - _SAMPLE, 0)):
                fh.seek(at)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def training_data_hash(data: SFTData, with_model: bool = False) -> str:
    """sha256 over what the run trains on: the image tokenizer's fingerprint, every training window
    (user, history, target), the codes of the items they use and, ``with_model`` (a run from
    ``model.checkpoint``), :func:`model_fingerprint` of the model folder.

    Recorded in each checkpoint: a resume whose dataset, windows or tokenizer differ (another
    ``data.dataset_dir`` content or ``data.work_dir`` tokenizer under an unchanged config) would
    otherwise continue the weights on codes that mean other images; one whose ``model.checkpoint``
    was replaced (an SFT ``final/`` exported again) would take RL's KL reference and the cached
    history features of a frozen vision tower (pixels mode) from the other model.
    """
    h = hashlib.sha256(data.tokenizer.fingerprint().encode())
    if with_model:
        h.update(model_fingerprint(data.model_dir).encode())
    ds = data.dataset
    items: set[str] = set()
    for ex in ds.examples:
        h.update(json.dumps([ex.user_id, list(ex.history), ex.target]).encode())
        items.update(ex.history)
        items.add(ex.target)
    ids = sorted(i for i in items if i in ds.cache)
    for lo in range(0, len(ids), 4096):
        h.update(ds.cache.codes(ids[lo:lo + 4096]).numpy().tobytes())
    return h.hexdigest()
