"""Batched image-token generation with a shared-prefix KV cache and classifier-free guidance.

:class:`Generator` turns prompts (left-padded token ids, optional history images as
``pixel_values``, aligned features or VQ codes under ``gen_code_mask``) into
``T = model.num_image_tokens`` VQ codes per sample:

* **waves** (:mod:`.waves`): every image has exactly ``T`` tokens, so requests are admitted in
  groups of at most ``max_batch_size`` rows that start and finish together (a prompt's samples
  may straddle two waves; seeds make that invisible);
* **one KV layout** (:mod:`.kv_storage`): per wave a pool holds each prompt's K/V once (shared
  by its samples) and each distinct unconditional prompt once (``"pad"``: per length, per prompt
  for history prompts at worst; ``"short"``: one ``[bos, boi]``); rows store only their own image
  tokens. The flat storage grows to the call's largest wave; :meth:`Generator.release_cache` frees it;
* **decode backends** (:mod:`.backends`), chosen once at construction from device and dtypes:
  the C++ float32 CPU loop, the static step replayed from a CUDA graph, or eager torch; no host
  synchronisation inside a wave's decode loop;
* **CFG by batch doubling**: rows ``[0, R)`` are conditional, ``[R, 2R)`` their
  unconditional partners; logits are mixed as ``u + s * (c - u)`` inside
  :func:`pgen_engine.ops.sample` (or before ``argmax`` for greedy decoding);
* **per-request seeds**: the token of sample ``j`` of a prompt with request seed ``r`` at
  step ``t`` uses the seed ``mix_seed(mix_seed(r, j), t)``, so a request's samples never
  depend on which other requests share the batch or on how the batch is split into waves.

:attr:`Generator.last_stats` holds the prefill / decode wall times and ``kv_bytes_peak`` of
the last call (for benchmarks).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from pgen_engine.models.decoder import KVCache
from pgen_engine.ops import kv_quant
from pgen_engine.ops._backend import BACKENDS, extension
from pgen_engine.ops.rng import mix_seed
from pgen_engine.ops.sampling import clamp_to_float32, sample

from . import inputs
from .alloc import GenerationMemoryError, allocating
from .backends import DecodeBackend, WaveDecode, make_backend
from .coerce import as_flag, as_positive_int
from .decode_graph import resolve_decode_mode
from .kv_storage import WaveKVStorage
from .sampling_params import SamplingParams
from .waves import LOGPROB_DISTRIBUTIONS, UNCOND_MODES, WaveGeometry, WaveItem, plan_kv_bytes, plan_waves, wave_geometry

__all__ = ["CACHE_DTYPES", "GenerationMemoryError", "Generator", "LOGPROB_DISTRIBUTIONS", "NonFiniteLogitsError",
           "UNCOND_MODES", "check_cache_dtype", "plan_kv_bytes"]

_UNSET: object = object()  # a loose sampling keyword the caller did not pass (None is a value: refused)


class NonFiniteLogitsError(RuntimeError):
    """Some step's logits held NaN / Inf, so no code could be picked (see :meth:`Generator.generate`).

    Attributes:
        row: the first affected output row (``prompt * num_samples + sample``).
        token: the image-token index of that row's first affected step.
    """

    def __init__(self, message: str, row: int, token: int):
        super().__init__(message)
        self.row, self.token = row, token


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, kv_quant.FP8_DTYPE)


def check_cache_dtype(dtype, model_dtype: bool = False) -> None:
    """Refuse, at construction, a KV-cache dtype the decode backends could not run (``model_dtype``:
    ``cache_dtype=None`` took the model's). The wave path's cache ops cast on write and read, so any of
    :data:`CACHE_DTYPES` works on every device (a float32 cache with a float32 CPU model selects the C++
    backend); float8 e4m3 quantises on write with per-(row, KV head) scales (:mod:`pgen_engine.ops.kv_quant`).
    """
    if not isinstance(dtype, torch.dtype) or dtype not in CACHE_DTYPES:
        got = f"None, and the model's dtype {dtype} is not one of them: pass cache_dtype" if model_dtype else repr(dtype)
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES} (or None: the model's), got {got}")


class Generator:
    """KV-cached batched image generation for a :class:`pgen_engine.JanusModel`.

    Args:
        model: the model (any device/dtype; put it in eval mode).
        max_batch_size: most output rows (prompts x samples) decoded at once; the cache
            holds twice as many rows for CFG. Larger requests run in waves.
        max_seq_len: longest prompt + ``num_image_tokens`` a row may hold; default
            ``num_image_tokens + 512``.
        uncond_mode: ``"pad"`` (the prompt with every token except BOS / begin-of-image
            replaced by padding, same length — ``transformers``' Janus rule) or ``"short"``
            (``[bos, boi]`` shared by every row).
        cache_dtype: KV cache dtype (default: the model's). ``torch.float8_e4m3fn`` keeps K/V
            as float8 with float32 per-(row, KV head) scales beside them
            (:mod:`pgen_engine.ops.kv_quant`; the eager / static / graph backends, not the C++ one).
        sample_backend: backend for :func:`pgen_engine.ops.sample` ("auto", "torch", ...).
        decode_mode: which decode backend runs the waves (:func:`.backends.make_backend`):
            ``"auto"`` (CUDA graph on CUDA, eager elsewhere), ``"eager"`` (a float32 CPU model:
            the C++ backend; else eager torch), ``"static"`` (the graph-ready step run eagerly,
            any device) or ``"graph"`` (CUDA only). Same tokens in every mode.
    """

    def __init__(self, model, *, max_batch_size: int = 32, max_seq_len: int | None = None,
                 uncond_mode: str = "pad", cache_dtype: torch.dtype | None = None,
                 sample_backend: str = "auto", decode_mode: str = "auto"):
        if not all(hasattr(model, a) for a in ("num_image_tokens", "config", "special_tokens")):
            # else "'str' object has no attribute 'num_image_tokens'"
            raise TypeError(f"model must be a JanusModel (pgen_engine.load_model), got {type(model).__name__}")
        if uncond_mode not in UNCOND_MODES:
            raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {uncond_mode!r}")
        if sample_backend not in BACKENDS:  # else refused only by the first generate call's sampler
            raise ValueError(f"sample_backend must be one of {BACKENDS}, got {sample_backend!r}")
        max_batch_size = as_positive_int(max_batch_size, "max_batch_size", 1)
        T = int(model.num_image_tokens)
        max_seq_len = as_positive_int(T + 512 if max_seq_len is None else max_seq_len, "max_seq_len", T + 1,
                                    "num_image_tokens + 1 = ")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.uncond_mode = uncond_mode
        self.sample_backend = sample_backend
        self.special = model.special_tokens
        self.num_image_tokens = T
        cfg = model.config.text
        dtype = cache_dtype or model.dtype
        check_cache_dtype(dtype, model_dtype=cache_dtype is None)
        self.cache_dtype = dtype
        self.decode_mode = resolve_decode_mode(decode_mode, model.device)
        # chosen once, from device and dtypes: C++ float32 CPU, static step / CUDA graph, or eager torch
        self._backend: DecodeBackend = make_backend(model, dtype, self.decode_mode)
        # captured graphs point into the storage: dropped whenever it moves
        self._kv = WaveKVStorage(cfg.num_layers, (cfg.num_kv_heads, cfg.head_dim), dtype, model.device,
                                 on_move=self._backend.reset)
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ public API
    def cache_nbytes(self) -> int:
        """Bytes of KV storage held now (grown to the largest wave so far; see :meth:`release_cache`)."""
        return self._kv.nbytes()

    def release_cache(self) -> None:
        """Free the KV storage (and captured graphs, which point into it), and on CPU the
        buffer the C++ decode reuses for packed weights; the next call allocates them again."""
        self._kv.release()
        if hasattr(ext := extension(), "release_pack_arena"):
            ext.release_pack_arena()

    def kv_bytes(self, prompt_lens: Sequence[int], num_samples: int = 1, guidance_scale: float = 5.0,
                 distinct_uncond: bool = False) -> int:
        """Peak KV bytes :meth:`generate` would hold for prompts of these lengths (its own wave plan and
        sizing code): one unconditional prefix per distinct length (``"pad"``; per prompt with
        ``distinct_uncond``, the bound for history prompts, whose interior image tokens make same-length
        ones differ) or one ``[bos, boi]`` (``"short"``). For memory planning; works on the meta device."""
        return plan_kv_bytes(self.model.config.text, self.num_image_tokens, prompt_lens, num_samples=num_samples,
                             guidance_scale=guidance_scale, uncond_mode=self.uncond_mode, dtype=self.cache_dtype,
                             max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len, distinct_uncond=distinct_uncond)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, *, gen_code_mask=None, num_samples: int = 1,
                 sampling: SamplingParams | None = None, guidance_scale: float = _UNSET,
                 temperature: float = _UNSET, top_k: int = _UNSET, top_p: float = _UNSET,
                 greedy: bool = _UNSET, seed: int | Sequence[int] | torch.Tensor = _UNSET,
                 progress: bool = False, return_logprobs: bool = False,
                 image_embeds: Sequence[torch.Tensor | None] | None = None,
                 logprob_distribution: str = "conditional"
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generate ``num_image_tokens`` VQ codes per sample.

        Args:
            input_ids: int64 ``[B,S]`` left-padded prompts, or ``B`` lists of token ids.
            attention_mask: ``[B,S]`` (1 = token, 0 = left padding) or None (all tokens real).
            pixel_values: ``[N_img,3,H,W]`` history images filling the ``image`` placeholder
                tokens in reading order (``num_image_tokens`` placeholders per image).
            gen_code_mask: bool ``[B,S]`` (or lists), True where ``input_ids`` holds a VQ code
                of a history image (generation embedding); unconditional rows carry no codes.
            num_samples: samples per prompt; output row ``i * num_samples + j`` is sample ``j``
                of prompt ``i``.
            sampling: a :class:`SamplingParams` (validated once, at its construction), or None
                to build one from the loose keywords below (unset ones take its defaults);
                passing both is a TypeError.
            guidance_scale: CFG scale ``s``; 1 turns CFG off (no unconditional rows).
            temperature, top_k, top_p: sampling filters (see :func:`pgen_engine.ops.sample`).
            greedy: take the argmax of the CFG-mixed logits instead of sampling.
            seed: an int (prompt ``i`` gets request seed ``mix_seed(seed, i)``) or ``B`` ints
                (request seeds used as given: results then do not depend on batch composition).
            progress: show a tqdm bar over decode steps.
            return_logprobs: also return, per code, its log-probability (before the top-k /
                top-p filters), computed inside the decode step (CUDA-graph safe), under
                ``logprob_distribution``.
            logprob_distribution: ``"conditional"``: ``log_softmax(c / T)`` (the conditional
                branch alone); ``"guided"``: ``log_softmax((u + s (c - u)) / T)``, the CFG-mixed
                distribution the codes are sampled from (what on-policy RL on guided rollouts
                needs; equal to the conditional one when ``guidance_scale == 1``). Every
                backend writes either inside its decode loop (the C++ CPU loop included).
            image_embeds: instead of ``pixel_values``: the history images' *aligned* features,
                one entry per prompt — floating ``[n_i, num_image_tokens, hidden_size]``
                (what ``model.vision_features(pixels)`` gives: vision tower + aligner) for a
                prompt with ``n_i`` images, None for a prompt without image placeholders.
                Lets a caller that already holds the features (a frozen tower's feature
                cache, or one encoding per distinct item) skip the vision tower here; they are
                cast to the model's dtype.
        Returns:
            int64 ``[B * num_samples, T]`` codes on the model's device; with
            ``return_logprobs`` a pair ``(codes, float32 [B * num_samples, T] log-probs)``.
        Raises:
            ValueError / TypeError: malformed inputs or settings (ids out of range or not
                integers, a mask that is not left padding of 0 / 1, ``pixel_values`` not floating
                ``[N_img, 3, image_size, image_size]``, non-finite ``guidance_scale`` /
                ``temperature``, ...), before any work.
            NonFiniteLogitsError (a RuntimeError): some step's logits (CFG-mixed; divided by
                ``temperature`` when sampling or for ``return_logprobs``) hold NaN / Inf — NaN / Inf
                weights or ``pixel_values``, or values past float32 — so no code (or log-prob) can
                be picked. Raised when the wave that met them ends; the Generator stays usable.
        """
        if logprob_distribution not in LOGPROB_DISTRIBUTIONS:
            raise ValueError(f"logprob_distribution must be one of {LOGPROB_DISTRIBUTIONS}, "
                             f"got {logprob_distribution!r}")
        prompts = inputs.parse_prompts(self.model, input_ids, attention_mask, gen_code_mask)
        B = len(prompts)
        num_samples = as_positive_int(num_samples, "num_samples", 1)  # NumPy integers too; bools, floats, str not
        # a truthy string ("no") would change the return type to a (codes, log-probs) pair
        return_logprobs = as_flag(return_logprobs, "return_logprobs")
        progress = as_flag(progress, "progress")
        sp = self._sampling(sampling, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                            top_p=top_p, greedy=greedy, seed=seed)
        (top_p, temperature), guidance_scale, top_k, greedy = clamp_to_float32(sp.top_p, sp.temperature), \
            sp.guidance_scale, sp.top_k, sp.greedy  # into float32's range, for every backend and the log-probs
        req_seeds = inputs.request_seeds(sp.request_seeds(B), B)
        if image_embeds is not None:
            if pixel_values is not None:
                raise ValueError("give pixel_values or image_embeds, not both")
            pixel_chunks = inputs.split_embeds(self.model, prompts, image_embeds)
        else:
            pixel_chunks = inputs.split_pixels(self.model, prompts, pixel_values)
        T = self.num_image_tokens
        longest = max(len(p.ids) for p in prompts)
        if longest + T > self.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens + {T} image tokens exceeds max_seq_len={self.max_seq_len}")
        out_bytes = B * num_samples * T * (8 + (4 if return_logprobs else 0))
        call = f"num_samples={num_samples} for {B} prompt(s) (max_batch_size={self.max_batch_size})"
        with allocating(call, "its output codes", out_bytes, self.model.device):  # before planning the waves
            out = torch.empty((B * num_samples, T), dtype=torch.long, device=self.model.device)
            out_lp = torch.empty((B * num_samples, T), dtype=torch.float32, device=self.model.device) \
                if return_logprobs else None
        waves = list(plan_waves(B, num_samples, self.max_batch_size))
        cfg = guidance_scale != 1.0
        geoms = [wave_geometry([len(prompts[it.prompt].ids) for it in w], [it.count for it in w],
                               [inputs.uncond_ids(prompts[it.prompt], self.special, self.uncond_mode) for it in w]
                               if cfg else None, T)
                 for w in waves]
        peak_tokens = max(g.tokens for g in geoms)
        kv_bytes = self._kv.token_bytes() * peak_tokens
        # on failure, release: a partial grow holds some layers; the next call starts clean
        with allocating(call, f"a KV cache of {peak_tokens} positions", out_bytes + kv_bytes, self.model.device,
                        on_failure=self._kv.release):
            self._kv.grow(peak_tokens)
        self.last_stats = {"prefill_s": 0.0, "decode_s": 0.0, "waves": float(len(waves)),
                           "rows": float(B * num_samples), "kv_bytes_peak": float(kv_bytes)}
        bar = None
        if progress:
            from tqdm.auto import tqdm  # late import: it probes for notebook widgets; only a progress bar needs it

            bar = tqdm(total=len(waves) * T, desc="generate", unit="tok")
        try:
            for wave, geom in zip(waves, geoms):
                toks, lps = self._run_wave(wave, geom, prompts, pixel_chunks, req_seeds, float(guidance_scale),
                                           float(temperature), top_k, float(top_p), bool(greedy), bar,
                                           return_logprobs, logprob_distribution)
                rows = torch.cat([torch.arange(it.prompt * num_samples + it.first,
                                               it.prompt * num_samples + it.first + it.count) for it in wave])
                self._check_codes(toks, rows, lps)
                out[rows.to(out.device)] = toks
                if out_lp is not None:
                    out_lp[rows.to(out.device)] = lps
        finally:
            if bar is not None:
                bar.close()
        return (out, out_lp) if return_logprobs else out

    @staticmethod
    def _check_codes(codes: torch.Tensor, rows: torch.Tensor, lps: torch.Tensor | None = None) -> None:
        """Raise if any code is -1 (its step's logits were not finite, see :meth:`_pick`) or any log-prob
        ``lps`` is not (greedy ignores ``temperature``; its log-probs do not). One host read, after a wave."""
        bad = ((codes < 0) if lps is None else (codes < 0) | ~torch.isfinite(lps)).nonzero()
        if bad.numel():
            r, t = (int(v) for v in bad[0])
            row = int(rows[r])
            raise NonFiniteLogitsError(
                f"Generator: non-finite logits (NaN or Inf) for output row {row} at image token {t} "
                f"({bad.shape[0]} code(s) of this batch affected): the model's weights or inputs (pixel_values or "
                "image_embeds) hold NaN / Inf, or logits / temperature overflow float32; no code can be picked",
                row, t)

    @torch.inference_mode()
    def generate_images(self, input_ids, attention_mask=None, pixel_values=None, *, decode_batch_size: int = 16,
                        **kwargs) -> torch.Tensor:
        """:meth:`generate`, then VQ-decode: -> uint8 ``[B * num_samples, H, W, 3]`` (same row order)."""
        # checked before generating: torch.split(0) fails only after all the decoding work
        n = as_positive_int(decode_batch_size, "decode_batch_size", 1)
        codes = self.generate(input_ids, attention_mask, pixel_values, **kwargs)
        return torch.cat([self.model.decode_images(c) for c in codes.split(n)])

    def generate_for_users(self, histories, *, num_samples: int = 1, **kwargs) -> torch.Tensor:
        """Images (or codes) of the next item for each user history: ``histories`` are lists of
        ``(PIL image or path, title)``, oldest first. Prompts are built exactly as the model's
        training built them. See :func:`pgen_engine.generation.personal.generate_for_users`
        for the arguments and the seeding rules."""
        # late import: keeps data.history (PIL, tokenizers) off the Generator's import path
        from .personal import generate_for_users

        return generate_for_users(self, histories, num_samples=num_samples, **kwargs)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _sampling(sampling: SamplingParams | None, **loose) -> SamplingParams:
        """``sampling``, or a SamplingParams built from the loose keywords that were set."""
        given = {k: v for k, v in loose.items() if v is not _UNSET}
        if sampling is None:
            return SamplingParams(**given)
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if given:
            raise TypeError(f"pass sampling=SamplingParams(...) or the loose keywords, not both (got {sorted(given)})")
        return sampling

    @property
    def _k(self) -> list[torch.Tensor]:
        return self._kv.k  # per-layer K storage (tests check it is reused)

    @property
    def _v(self) -> list[torch.Tensor]:
        return self._kv.v

    def _cache_view(self, rows: int, L: int) -> KVCache:
        """A plain head-major ``[rows, Hkv, L, D]`` view of the storage (see :meth:`.WaveKVStorage.view`)."""
        return self._kv.view(rows, L)

    def _prefill_rows(self, cache: KVCache, leaders: list[int], seqs: list[list[int]],
                      code_masks: list[list[bool] | None], pixels: list[torch.Tensor | None]) -> torch.Tensor:
        """Prefill ``seqs`` into contiguous cache rows ``leaders`` (row-local positions 0..len-1).

        Returns the final hidden state of each sequence, ``[len(seqs), H]``.
        """
        L = cache.block_size
        return self._prefill_slots(cache, seqs, code_masks, pixels,
                                   [[r * L + i for i in range(len(s))] for r, s in zip(leaders, seqs)])

    def _prefill_slots(self, cache: KVCache, seqs: list[list[int]], code_masks: list[list[bool] | None],
                       pixels: list[torch.Tensor | None], slots_of: list[list[int]]) -> torch.Tensor:
        """Prefill ``seqs`` (positions 0..len-1 each), token ``i`` of sequence ``r`` into cache
        slot ``slots_of[r][i]``. Returns the final hidden state of each sequence, ``[len(seqs), H]``."""
        m = self.model
        dev = m.device
        S = max(len(s) for s in seqs)
        n = len(seqs)
        ids = torch.full((n, S), self.special.pad, dtype=torch.long)
        mask = torch.zeros((n, S), dtype=torch.long)
        cmask = torch.zeros((n, S), dtype=torch.bool)
        slots = torch.full((n, S), -1, dtype=torch.long)
        for r, (s, cm) in enumerate(zip(seqs, code_masks)):
            pad = S - len(s)
            ids[r, pad:] = torch.tensor(s, dtype=torch.long)
            mask[r, pad:] = 1
            if cm is not None:
                cmask[r, pad:] = torch.tensor(cm, dtype=torch.bool)
            slots[r, pad:] = torch.tensor(slots_of[r], dtype=torch.long)
        # history chunks of one call are all pixels [n,3,S,S] or all aligned features [n,T_img,H]
        # (generate() takes one kind); features skip the vision tower
        px = [p for p in pixels if p is not None]
        hist = torch.cat(px).to(dev) if px else None
        embeds = hist is not None and hist.ndim == 3
        emb = m.embed_inputs(ids.to(dev), cmask.to(dev) if bool(cmask.any()) else None,
                             None if embeds else hist, image_embeds=hist if embeds else None)
        all_real = bool(mask.all())
        # no mask when nothing is padded: the causal fast path of scaled_dot_product_attention
        return self._backend.prefill_last(emb, None if all_real else mask.to(dev), cache, slots.to(dev))

    def _pick(self, hidden: torch.Tensor, R: int, seeds: torch.Tensor, s: float, temperature: float, top_k: int,
              top_p: float, greedy: bool, with_logprobs: bool = False, lp_distribution: str = "conditional"):
        """hidden ``[R or 2R, H]`` (cond rows, then their uncond partners with CFG) -> int64 ``[R]``
        tokens: argmax of the CFG-mixed logits, or one seeded draw per row (``seeds`` ``[R]``).
        With ``with_logprobs`` -> ``(tokens, float32 [R] log_softmax(x / temperature)[token])`` with
        ``x`` the conditional logits (``lp_distribution="conditional"``) or the CFG mix ``u + s (c - u)``
        (``"guided"``)."""
        logits = self.model.image_head_logits(hidden).float()
        cfg = hidden.shape[0] == 2 * R
        c, u = (logits[:R], logits[R:]) if cfg else (logits, None)
        # No code can be picked from NaN / Inf logits: code -1 marks the row (no host sync here;
        # generate raises after the wave, and the next step embeds code 0 instead). The
        # sampler applies that rule itself (ops.sample); argmax needs it here.
        if greedy:
            x = c if u is None else u + (c - u) * s
            tok = torch.where(torch.isfinite(x).all(-1), x.argmax(-1), -1)
        else:
            tok = sample(c, uncond_logits=u, guidance_scale=s, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seeds, backend=self.sample_backend)
        if not with_logprobs:
            return tok
        # the guided mix written exactly as pgen_engine.training.grpo.guided_logprobs writes it, so
        # rollout and trainer log-probs agree to fp32 rounding
        x = c if (u is None or lp_distribution == "conditional") else u + s * (c - u)
        return tok, torch.log_softmax(x / temperature, dim=-1).gather(1, tok.clamp(min=0)[:, None]).squeeze(1)

    def _run_wave(self, wave: list[WaveItem], geom: WaveGeometry, prompts: list[inputs.Prompt], pixel_chunks,
                  req_seeds: torch.Tensor, s: float, temperature: float, top_k: int, top_p: float, greedy: bool, bar,
                  want_lp: bool = False, lp_distribution: str = "conditional"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill and decode one wave -> codes int64 ``[R, T]`` and (``want_lp``) log-probs ``[R, T]``."""
        t_start = time.perf_counter()
        m = self.model
        dev = m.device
        T = self.num_image_tokens
        cfg = s != 1.0
        R, rows = geom.R, geom.rows
        # cond rows [0, R): wave order; uncond rows [R, 2R): their partners
        cond_len, row_prompt, row_sample, item_of_row = [], [], [], []
        for n_item, it in enumerate(wave):
            for j in range(it.first, it.first + it.count):
                cond_len.append(len(prompts[it.prompt].ids))
                row_prompt.append(it.prompt)
                row_sample.append(j)
                item_of_row.append(n_item)
        # pool rows: item i's prompt at i, distinct unconditional prompt j at Pc + j
        prefix_row = list(item_of_row)
        lens = list(cond_len)
        if cfg:
            unc_of_row = [geom.item_uncond[i] for i in item_of_row]
            prefix_row += [geom.Pc + j for j in unc_of_row]
            lens += [len(geom.ukeys[j]) for j in unc_of_row]
        # prefix tables sized for the largest wave up front: a captured graph reads them at fixed addresses
        cache = self._kv.wave_cache(geom, prefix_row, lens, min_rows=2 * self.max_batch_size)

        # --- prefill: each prompt and each distinct unconditional prompt once, into the pool
        pool = KVCache(k=cache.prefix_k, v=cache.prefix_v, layout="bhsd", k_scale=cache.prefix_k_scale,
                       v_scale=cache.prefix_v_scale)
        h_cond = self._prefill_rows(pool, list(range(geom.Pc)), [prompts[it.prompt].ids for it in wave],
                                    [prompts[it.prompt].code_mask for it in wave],
                                    [pixel_chunks[it.prompt] for it in wave])
        h_rows = h_cond.index_select(0, torch.tensor(item_of_row, device=dev))
        if cfg:
            nu = len(geom.ukeys)
            h_unc = self._prefill_rows(pool, [geom.Pc + j for j in range(nu)], [list(k) for k in geom.ukeys],
                                       [None] * nu, [None] * nu)
            h_rows = torch.cat([h_rows, h_unc.index_select(0, torch.tensor(unc_of_row, device=dev))])
        self._sync()
        t_prefill = time.perf_counter()

        # --- decode: everything the loop needs is a tensor prepared here
        base = torch.tensor(lens, dtype=torch.long, device=dev)
        # own positions start at index 0 of each row (position base[b] = own index 0)
        slot0 = torch.arange(rows, dtype=torch.long, device=dev) * geom.Lo
        sample_seeds = mix_seed(req_seeds[row_prompt], torch.tensor(row_sample, dtype=torch.long))
        step_seeds = mix_seed(sample_seeds[None, :], torch.arange(T, dtype=torch.long)[:, None]).to(dev)  # [T,R]

        def pick(hidden: torch.Tensor, seeds: torch.Tensor):
            return self._pick(hidden, R, seeds, s, temperature, top_k, top_p, greedy, want_lp, lp_distribution)

        first = pick(h_rows, step_seeds[0])
        first, first_lp = first if want_lp else (first, None)
        if bar is not None:
            bar.update(1)
        wave_in = WaveDecode(first=first, first_lp=first_lp, base=base, slot0=slot0, step_seeds=step_seeds, cfg=cfg,
                             pick=pick, sampling=(s, temperature, top_k, top_p, greedy),
                             key=(rows, R, geom.P, geom.Lp, geom.Lo, self._k[0].data_ptr(), cfg, s, temperature,
                                  top_k, top_p, greedy, want_lp, lp_distribution),
                             on_steps=None if bar is None else bar.update, lp_distribution=lp_distribution)
        out, out_lp = self._backend.decode_wave(cache, wave_in)
        self._sync()
        self.last_stats["prefill_s"] += t_prefill - t_start
        self.last_stats["decode_s"] += time.perf_counter() - t_prefill
        return out, out_lp

    def reset_graphs(self) -> None:
        """Drop captured decode graphs (they are re-captured on the next wave)."""
        self._backend.reset()

    @property
    def backend(self) -> str:
        """Name of the decode backend chosen at construction: ``"cpp"``, ``"graph"``, ``"static"`` or ``"eager"``."""
        return self._backend.name

    @property
    def _static(self):
        """The static backend's step runner (:class:`~.decode_graph.StaticDecode`; tests swap in one
        that records captures), or None for the other backends."""
        return getattr(self._backend, "runner", None)

    @_static.setter
    def _static(self, runner) -> None:
        if not hasattr(self._backend, "runner"):
            raise AttributeError(f"the {self._backend.name!r} decode backend runs no static step")
        self._backend.runner = runner

    def _sync(self) -> None:
        # wave boundaries only (never inside the decode loop): makes last_stats honest on GPUs
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

