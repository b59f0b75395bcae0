"""Train a small Janus VQ-VAE on a dataset's images (CPU scale).

The model is ``transformers``' ``JanusVQVAE`` at reduced width (:func:`vq_config`); the
training step reuses its encoder, ``quant_conv``, ``post_quant_conv`` and decoder and
replaces only the quantiser step:

* codes are the codebook rows with the highest cosine to the L2-normalised encoder output
  (what ``JanusVQVAE.encode`` computes once the rows are unit-norm; see
  :mod:`pgen_engine.models.vq_tokenizer`);
* the first ``ae_warmup_steps`` steps train a plain autoencoder through the normalised
  latent (no quantisation); the codebook is then set by spherical k-means over encoder
  outputs (far fewer dead codes than seeding from an untrained encoder);
* after that the codebook is an exponential moving average of the normalised encoder
  outputs assigned to each code (spherical online k-means), re-normalised every update;
* gradients pass the quantiser straight through; the loss is pixel MSE (PSNR is what is
  measured), optionally + ``l1_weight`` x L1, + ``beta`` x commitment;
* dead codes (not assigned in the last ``revive_after`` steps) are re-seeded from random
  encoder outputs of the current batch, checked every ``revive_every`` steps, so the
  codebook stays in use;
* convolutions start from PyTorch's fan-in scaled init (``torch_init``), not transformers'
  N(0, 0.02); batches are small (4 images: more updates per second of budget). Measured on
  the MovieLens posters (64 px, 8 x 8 codes, 1,024 entries, 128 held-out posters, one
  thread): 300 steps x 32 images 15.29 dB -> 15.45 dB with ``torch_init``; at the same images
  seen, 1,200 steps x 8 images 16.73 dB (15.73 dB with seed 1) and 2,400 x 4 17.63 dB; wider low-resolution levels
  (``latent_channels`` 128, +15 % per step) and lr 2e-3 did not pay at batch 8 (15.92 and
  16.35 dB);
* most of the budget trains on crops (``crop_size``, auto 5/8 of the code grid, e.g. 40 px of
  a 64-px poster; random offsets on the code grid), the last ``1 - crop_frac`` on whole
  images: a crop step is ~2.5x cheaper, so the same budget gets ~2x the updates, and the
  whole-image end adapts the decoder to full-image context and GroupNorm statistics
  (crops to the end measured 0.6-1.6 dB worse than with it);
* encoder and decoder run under bf16 autocast on CPU (``bf16``; about 2x per step where
  the CPU has bf16 units), the quantiser and losses in fp32; activations are kept
  contiguous NCHW (a permuted NHWC view makes every convolution run channels-last, which
  measured 2-4x slower per step on CPU).

Tried on 2026-12-06 (same 2,815 fit / 128 held-out posters, one thread each, the shared
2-core VM at load 5-7) and not kept:

* a narrower full-resolution level: not expressible -- the Janus blocks use
  ``GroupNorm(32, C)``, so 32 channels is the minimum and the 64-px level already has 32;
* ``embed_dim`` 32 instead of 8 (cosine codebook): higher reconstruction loss at equal steps
  (train rec_mse 0.216 vs 0.159 at step 350 of a 2,000-step horizon, run side by side; the
  runs were stopped there for CPU, so this is an early-training indication only);
* a decoder-only phase (encoder, quant_conv and codebook frozen for the last part of the
  budget; removed again): continuing the demo's 600-s VQ (16.70 dB) for 400 s, decoder-only
  ran 29 % more steps (310 vs 241) but gained the same as training everything (16.93 vs
  16.94 dB, lr 4e-4, ``init=``).

At this scale the VQ is compute-bound: whole images in the demo's 600-s budget under that load
gave 1,799 steps and 16.70 dB, below PatchKMeans' 17.81 dB on the same posters; 2,400 batch-32
steps (~28 min) 18.26 dB. With crops (2026-12-07, 780 s): one thread beside another job, 6,648
steps 18.30 dB against 3,409 whole-image steps 17.91 dB; idle, 2 threads, 9,768 steps 18.25 dB
against 5,614 whole-image steps 18.15 dB -- crops pay most when compute is short. The +3 dB target over PatchKMeans is not
reachable in a CPU budget of minutes with these models.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .vq_tokenizer import JanusVQTokenizer, build_vqvae, vq_config


@dataclasses.dataclass
class VQTrainConfig:
    """Settings of :func:`train_vq` (all part of the tokenizer cache key)."""

    image_size: int = 64
    codes_per_side: int = 8
    codebook_size: int = 1024
    embed_dim: int = 8
    base_channels: int = 32
    latent_channels: int = 64
    num_res_blocks: int = 1
    # 4, not 32: a step costs ~linearly in images (one thread: 0.19 s at 8 vs 0.78 s at 32; 4 costs
    # ~10 % more per image than 8), and at equal images seen held-out PSNR measured 15.45 dB
    # (300 x 32), 16.73 / 15.73 dB (1,200 x 8, seeds 0 / 1), 17.63 dB (2,400 x 4)
    batch_size: int = 4
    lr: float = 4e-3
    beta: float = 0.25
    ema_decay: float = 0.99
    revive_every: int = 10
    revive_after: int = 50
    max_steps: int = 100_000
    time_budget_s: float = 780.0
    warmup_steps: int = 30
    min_lr_frac: float = 0.1
    l1_weight: float = 0.0
    # steps trained as a plain autoencoder (no quantisation) before the codebook is set by
    # spherical k-means over encoder outputs; 0 = quantise from step 0 (random-output init).
    # Measured: far fewer dead codes and a lower loss at equal steps than the random init.
    ae_warmup_steps: int = 50
    kmeans_batches: int = 64  # x batch_size images of encoder outputs for the k-means init
    kmeans_iters: int = 10
    bf16: bool = True
    # re-initialise every conv with PyTorch's default (fan-in scaled) instead of transformers'
    # N(0, 0.02), which shrinks each stride/conv-in layer's output ~3-10x and makes lr 4e-3 a
    # ~20 % relative step per update
    torch_init: bool = True
    # the first crop_frac of the budget trains on random crop_size x crop_size crops at code-grid
    # offsets, the rest on whole images; 0 = whole images only, -1 = auto (crop_px). Measured on
    # the MovieLens posters (64 px, 8 x 8 codes, 390-s budget, one thread, side by side): whole
    # images 16.70 dB; 40-px crops 17.92, 32-px 17.84 (crop_frac 0.9; 0.4 / 0.6 / 0.8 / 0.95 at
    # 32 px: 17.08 / 17.51 / 17.74 / 17.78; crops to the end: 16.27 at 32 px, 17.34 at 48 px)
    crop_size: int = -1
    crop_frac: float = 0.9
    seed: int = 0

    def model_config(self) -> dict:
        return vq_config(image_size=self.image_size, codes_per_side=self.codes_per_side,
                         codebook_size=self.codebook_size, embed_dim=self.embed_dim,
                         base_channels=self.base_channels, latent_channels=self.latent_channels,
                         num_res_blocks=self.num_res_blocks)

    def crop_px(self) -> int:
        """Side of the training crops in pixels (``image_size`` = whole images).

        Auto (-1): 5/8 of the code grid, at least 4 codes per side (2 x 2-code crops of 64-px
        posters measured a collapse to 9.8 dB), so grids of 4 x 4 codes and fewer train whole.
        """
        down = self.image_size // self.codes_per_side
        if self.crop_size == -1:
            return down * min(self.codes_per_side, max(4, math.ceil(0.625 * self.codes_per_side)))
        return self.crop_size or self.image_size

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1 or self.time_budget_s <= 0 or self.lr <= 0:
            raise ValueError("batch_size, max_steps, time_budget_s and lr must be positive")
        if not 0 < self.ema_decay < 1 or self.revive_every < 1 or self.revive_after < 1:
            raise ValueError("ema_decay must lie in (0,1), revive_every and revive_after >= 1")
        if not 0 <= self.crop_frac <= 1:
            raise ValueError(f"crop_frac must lie in [0,1], got {self.crop_frac}")
        self.model_config()  # geometry checks
        down = self.image_size // self.codes_per_side
        if self.crop_size not in (-1, 0) and (self.crop_size % down or not down <= self.crop_size <= self.image_size):
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of {down} in [{down}, {self.image_size}]"
                             " (0 = whole images, -1 = auto)")


@dataclasses.dataclass
class VQTrainReport:
    """What a training run did: steps, seconds, final losses and codes revived in total."""

    steps: int
    seconds: float
    rec_mse: float
    commit: float
    revived: int
    train_usage: float


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, S, S, 3]`` -> float32 ``[N, 3, S, S]`` in [-1, 1]."""
    # contiguous NCHW (a permuted view would make every conv run channels-last, 2-3x slower on CPU)
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _autocast(enabled: bool):
    """bf16 autocast on CPU: convolutions run on the bf16 units (about 2x per step on AVX-512/AMX)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _sample_rows(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct rows of ``x`` [n, d] (random unit rows fill up when n < k), jittered, unit-norm."""
    init = x[torch.randperm(x.shape[0], generator=g)[:k]]
    if init.shape[0] < k:
        init = torch.cat([init, torch.randn(k - init.shape[0], x.shape[1], generator=g)])
    return F.normalize(init + 1e-3 * torch.randn(init.shape, generator=g), dim=1)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """``k`` unit-norm centroids [k, d] of unit rows ``x`` [n, d] (cosine k-means, Lloyd steps).

    Empty clusters are re-seeded from the points worst served by their centroid.
    """
    c = _sample_rows(x, k, g)
    for _ in range(iters):
        sim = x @ c.T
        best, idx = sim.max(1)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        cnt = torch.bincount(idx, minlength=k)
        empty = (cnt == 0).nonzero().flatten()
        c = torch.where((cnt > 0)[:, None], F.normalize(sums, dim=1), c)
        if empty.numel():
            worst = best.argsort()[:empty.numel()]
            c[empty[:worst.numel()]] = x[worst]
    return c


def ema_codebook_step(ema_count: torch.Tensor, ema_sum: torch.Tensor, idx: torch.Tensor, z: torch.Tensor,
                      decay: float) -> torch.Tensor:
    """One EMA codebook step (spherical online k-means), in place.

    ``ema_count [k]`` and ``ema_sum [k, d]`` decay by ``decay`` and take ``1 - decay`` of this
    batch's per-code counts and sums of the unit vectors ``z [n, d]`` assigned by ``idx [n]``;
    the codebook is ``normalize(ema_sum)``, so a used code moves toward the mean direction of
    its outputs and an unused one keeps its direction. Returns the batch's counts ``[k]``.
    """
    k, d = ema_sum.shape
    cnt = torch.bincount(idx, minlength=k).to(ema_count.dtype)
    ssum = torch.zeros(k, d, dtype=ema_sum.dtype).index_add_(0, idx, z.to(ema_sum.dtype))
    ema_count.mul_(decay).add_(cnt, alpha=1 - decay)
    ema_sum.mul_(decay).add_(ssum, alpha=1 - decay)
    return cnt


def fresh_vqvae(cfg: VQTrainConfig):
    """An untrained ``JanusVQVAE`` for ``cfg`` (float32, train mode), convs re-initialised if ``cfg.torch_init``."""
    vq = build_vqvae(cfg.model_config()).float().train()
    if cfg.torch_init:
        for m in vq.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()  # fan-in scaled (kaiming-uniform), biases too
    return vq


def train_vq(
    images: torch.Tensor,
    cfg: VQTrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    init: JanusVQTokenizer | None = None,
) -> tuple[JanusVQTokenizer, VQTrainReport]:
    """Train a Janus VQ-VAE on uint8 ``images [N, S, S, 3]`` (S = ``cfg.image_size``).

    Stops after ``cfg.max_steps`` steps or ``cfg.time_budget_s`` seconds, whichever comes
    first; the learning rate follows a warm-up then a cosine over that horizon. Seeded, so
    a step-limited run is reproducible. ``init``: continue training a copy of this tokenizer
    (same geometry as ``cfg``; quantised from step 0, its codebook seeds the EMA).

    Returns the tokenizer (eval mode, unit-norm codebook) and a :class:`VQTrainReport`.
    """
    cfg.validate()
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (cfg.image_size,
                                                                                     cfg.image_size, 3):
        raise ValueError(f"images must be uint8 [N,{cfg.image_size},{cfg.image_size},3], got "
                         f"{images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"train_vq needs at least 2 images, got {n}")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    mcfg = cfg.model_config()
    if init is not None:  # warm start: continue a trained tokenizer (a copy; no warm-up, no k-means)
        want = {k: v for k, v in mcfg.items() if k in init.config}
        if want != init.config:
            raise ValueError(f"init tokenizer geometry {init.config} differs from the config's {want}")
        vq = copy.deepcopy(init.vqvae).float().train()
    else:
        vq = fresh_vqvae(cfg)
    k, d = cfg.codebook_size, cfg.embed_dim
    down = cfg.image_size // cfg.codes_per_side
    crop = cfg.crop_px()
    grid = crop // down  # codes per side of one training crop
    emb = vq.quantize.embedding.weight
    emb.requires_grad_(False)  # the codebook is an EMA, not a gradient parameter
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99))
    bs = min(cfg.batch_size, n)

    def batch(full: bool = False) -> torch.Tensor:
        sel = images[torch.randint(n, (bs,), generator=g)]
        if crop < cfg.image_size and not full:
            oy, ox = (down * torch.randint((cfg.image_size - crop) // down + 1, (2,), generator=g)).tolist()
            sel = sel[:, oy:oy + crop, ox:ox + crop]
        x = _pixels(sel)
        flip = torch.rand(bs, generator=g) < 0.5  # posters are not mirror-symmetric, textures are
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def encode(x: torch.Tensor) -> torch.Tensor:
        with _autocast(cfg.bf16):
            h = vq.encoder(x)
        z = vq.quant_conv(h.float())  # [B, D, g, g]; fp32 from here, as code lookup runs at inference
        return F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)

    def set_codebook(vecs: torch.Tensor) -> None:
        """Codebook := ``vecs`` [k, d] (unit rows); EMA state restarted from it."""
        emb.copy_(vecs)
        ema_count.fill_(1.0)
        ema_sum.copy_(vecs)

    ema_count = torch.ones(k)
    ema_sum = torch.zeros(k, d)
    last_used = torch.zeros(k, dtype=torch.long)  # step at which each code was last assigned

    def outputs(nb: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([encode(batch()) for _ in range(nb)])

    # codebook init: random normalised encoder outputs of the untrained encoder (replaced by
    # k-means over trained encoder outputs after an autoencoder warm-up, when there is one)
    if init is not None:
        set_codebook(F.normalize(emb.detach().float(), dim=1))
    else:
        seeds = outputs(max(1, math.ceil(k / (bs * grid * grid))))
        set_codebook(_sample_rows(seeds, k, g))

    bar = None
    if progress:
        bar = tqdm(total=cfg.max_steps if cfg.max_steps < 100_000 else None, desc="training VQ", unit="step")
    t0 = time.perf_counter()
    step = revived = 0
    rec_v = com_v = float("nan")
    quantise = cfg.ae_warmup_steps == 0 or init is not None
    try:
        while step < cfg.max_steps:
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg.time_budget_s:
                break
            if not quantise and (step >= cfg.ae_warmup_steps or elapsed >= cfg.time_budget_s / 4):
                set_codebook(spherical_kmeans(outputs(cfg.kmeans_batches), k, cfg.kmeans_iters, g))
                last_used.fill_(step)
                quantise = True
            frac = max(step / cfg.max_steps, elapsed / cfg.time_budget_s)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (
                cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
            for pg in opt.param_groups:
                pg["lr"] = lr
            x = batch(full=frac >= cfg.crop_frac)
            zf = encode(x)
            with torch.no_grad():
                idx = (zf @ emb.T).argmax(1)
            q = emb[idx]
            commit = F.mse_loss(zf, q)
            q_st = zf + (q - zf).detach() if quantise else zf
            # contiguous NCHW: a permuted view would run the whole decoder channels-last (2-3x slower on CPU)
            side = x.shape[-1] // down
            h = vq.post_quant_conv(q_st.view(-1, side, side, d).permute(0, 3, 1, 2).contiguous())
            with _autocast(cfg.bf16):
                rec = vq.decoder(h).float()
            rec_mse = F.mse_loss(rec, x)
            loss = rec_mse + (cfg.beta * commit if quantise else 0.0)
            if cfg.l1_weight:
                loss = loss + cfg.l1_weight * F.l1_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if quantise:
                with torch.no_grad():
                    zd = zf.detach()
                    cnt = ema_codebook_step(ema_count, ema_sum, idx, zd, cfg.ema_decay)
                    last_used[cnt > 0] = step
                    if (step + 1) % cfg.revive_every == 0:
                        # revive_after counts whole-image steps: a crop step assigns fewer codes
                        after = math.ceil(cfg.revive_after * cfg.codes_per_side ** 2 / side ** 2)
                        dead = (step - last_used >= after).nonzero().flatten()
                        if dead.numel():
                            src = zd[torch.randint(zd.shape[0], (dead.numel(),), generator=g)]
                            ema_sum[dead] = F.normalize(src + 0.01 * torch.randn(src.shape, generator=g), dim=1) \
                                * ema_count.mean()
                            ema_count[dead] = ema_count.mean()
                            last_used[dead] = step
                            revived += int(dead.numel())
                    emb.copy_(F.normalize(ema_sum, dim=1))
            step += 1
            rec_v, com_v = float(rec_mse.detach()), float(commit.detach())
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(psnr=f"{10 * math.log10(4.0 / max(rec_v, 1e-12)):.1f}", revived=revived)
            if log is not None and step % 50 == 0:
                log(f"step {step} rec_mse {rec_v:.4f} commit {com_v:.4f} revived {revived} "
                    f"({time.perf_counter() - t0:.0f}s)")
    finally:
        if bar is not None:
            bar.close()
    if not quantise:  # budget ran out inside the warm-up: the codebook still has to fit the encoder
        set_codebook(spherical_kmeans(outputs(cfg.kmeans_batches), k, cfg.kmeans_iters, g))
        last_used.fill_(max(step - 1, 0))
    vq.eval()
    used = float((step - 1 - last_used < cfg.revive_after).float().mean())
    rep = VQTrainReport(steps=step, seconds=time.perf_counter() - t0, rec_mse=rec_v, commit=com_v,
                        revived=revived, train_usage=used)
    emb.requires_grad_(True)
    return JanusVQTokenizer(vq, mcfg), rep
