"""Batched image-token generation with a static KV cache and classifier-free guidance.

:class:`Generator` turns prompts (left-padded token ids, optional history images as
``pixel_values`` or as VQ codes under ``gen_code_mask``) into ``T = model.num_image_tokens``
VQ codes per sample:

* **one static KV cache**, allocated once per :class:`Generator` as flat per-layer buffers
  for ``2 * max_batch_size`` rows (conditional + unconditional) of ``max_seq_len`` tokens;
  each call views a prefix of it as a contiguous ``[rows, L, Hkv, D]`` cache (row ``b`` =
  block ``b``), so nothing is reallocated between calls and attention reads only ``L``
  positions per row;
* **shared prefill**: each prompt is prefilled once and its KV copied to the rows of its
  other samples; identical unconditional prompts are prefilled once (in ``"pad"`` mode all
  prompts of one length share one; in ``"short"`` mode every row shares ``[bos, boi]``);
* **no host synchronisation inside the decode loop**: per-row lengths, positions, slots
  and sampling seeds are tensors prepared before the loop; on CUDA the step is captured
  once as a CUDA graph and replayed (:mod:`pgen_engine.generation.decode_graph`); in
  float32 on CPU the whole loop is one C++ call (:mod:`pgen_engine.generation.decode_cpu`);
* **CFG by batch doubling**: rows ``[0, R)`` are conditional, ``[R, 2R)`` their
  unconditional partners; logits are mixed as ``u + s * (c - u)`` inside
  :func:`pgen_engine.ops.sample` (or before ``argmax`` for greedy decoding);
* **per-request seeds**: the token of sample ``j`` of a prompt with request seed ``r`` at
  step ``t`` uses the seed ``mix_seed(mix_seed(r, j), t)``, so a request's samples never
  depend on which other requests share the batch or on how the batch is split into waves.

Batches larger than ``max_batch_size`` rows run in waves of at most that many rows (a
prompt's samples may straddle two waves; seeds make that invisible). Every image has exactly
``T`` tokens, so all rows of a wave finish together and a wave boundary is where finished
rows are refilled. :attr:`Generator.last_stats` holds the prefill / decode wall times of
the last call (for benchmarks).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import torch

from pgen_engine import envs
from pgen_engine.data.prompts import uncond_pad_ids
from pgen_engine.models.decoder import KVCache
from pgen_engine.ops import kv_quant
from pgen_engine.ops.rng import mix_seed
from pgen_engine.ops.sampling import sample

from . import decode_cpu
from .coerce import INT64_MAX, INT64_MIN, as_float, as_int
from .continuous import BLOCK_SIZE
from .decode_graph import StaticDecode, resolve_decode_mode
from .sampling_params import SamplingParams

UNCOND_MODES = ("pad", "short")
_UNSET: object = object()  # a loose sampling keyword the caller did not pass (None is a value: refused)
SCHEDULERS = ("waves", "continuous")


class NonFiniteLogitsError(RuntimeError):
    """Some step's logits held NaN / Inf, so no code could be picked (see :meth:`Generator.generate`).

    Attributes:
        row: the first affected output row (``prompt * num_samples + sample``).
        token: the image-token index of that row's first affected step.
    """

    def __init__(self, message: str, row: int, token: int):
        super().__init__(message)
        self.row, self.token = row, token


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """One validated prompt: real tokens only (padding stripped)."""

    ids: list[int]
    code_mask: list[bool] | None
    num_images: int  # vision placeholders / num_image_tokens, i.e. images in pixel_values it consumes


@dataclasses.dataclass(frozen=True)
class _WaveItem:
    """Samples ``[first, first + count)`` of prompt ``prompt``."""

    prompt: int
    first: int
    count: int


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, kv_quant.FP8_DTYPE)


def check_cache_dtype(model, dtype, scheduler: str = "waves") -> None:
    """Refuse, at construction, a KV-cache dtype some decode path could not run.

    The wave path's cache ops (head-major write, cascade attention, C++ CPU step) cast on
    write and read, so any of :data:`CACHE_DTYPES` works on every device there (a float32
    cache is what enables the C++ CPU step). The continuous scheduler's paged kernels on CUDA
    (or under ``PGEN_FUSED_OPS=1``) take one dtype for activations and cache.
    """
    if not isinstance(dtype, torch.dtype) or dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES} (or None: the model's), got {dtype!r}")
    if kv_quant.is_fp8(dtype) and scheduler != "waves":
        raise ValueError(f"cache_dtype={dtype} (float8 with per-head scales) needs scheduler='waves'")
    fused = model.device.type == "cuda" or bool(envs.get("PGEN_FUSED_OPS"))
    if scheduler == "continuous" and fused and dtype != model.dtype:
        raise ValueError(f"cache_dtype={dtype} differs from the model's {model.dtype}: scheduler='continuous' runs "
                         "the paged attention kernels, which need both in one dtype (use scheduler='waves')")


@dataclasses.dataclass(frozen=True)
class WaveGeometry:
    """How one wave's KV is laid out (cascade layout, see :class:`~pgen_engine.models.decoder.KVCache`).

    The pool holds ``P = Pc + len(ukeys)`` prefixes of ``Lp`` positions: the wave's ``Pc``
    conditional prompts (one per wave item, shared by that prompt's samples), then each
    distinct unconditional prompt once. Each of the ``rows`` cache rows (``R`` conditional,
    their ``R`` partners with CFG) owns ``Lo = max(T - 1, 1)`` positions for the image tokens
    it feeds back (the last code is never fed back).
    """

    Pc: int
    ukeys: tuple[tuple[int, ...], ...]
    item_uncond: tuple[int, ...]  # per wave item: index into ukeys (empty without CFG)
    Lp: int
    R: int
    rows: int
    Lo: int

    @property
    def P(self) -> int:
        return self.Pc + len(self.ukeys)

    @property
    def tokens(self) -> int:
        """Positions per layer the wave holds: pool plus own rows."""
        return self.P * self.Lp + self.rows * self.Lo


def wave_geometry(cond_lens: Sequence[int], counts: Sequence[int], uncond_keys: Sequence[tuple[int, ...]] | None,
                  T: int) -> WaveGeometry:
    """Geometry of a wave of items (prompt length ``cond_lens[i]``, ``counts[i]`` samples), with
    ``uncond_keys[i]`` the unconditional prompt of item ``i`` (None: no CFG)."""
    uniq: dict[tuple[int, ...], int] = {}
    item_uncond = tuple(uniq.setdefault(tuple(k), len(uniq)) for k in uncond_keys) if uncond_keys is not None else ()
    R = int(sum(counts))
    lp = max([*cond_lens, *(len(k) for k in uniq)])
    return WaveGeometry(Pc=len(cond_lens), ukeys=tuple(uniq), item_uncond=item_uncond, Lp=lp, R=R,
                        rows=2 * R if uncond_keys is not None else R, Lo=max(T - 1, 1))


def plan_waves(num_prompts: int, num_samples: int, cap: int) -> Iterator[list["_WaveItem"]]:
    """Groups of (prompt, sample range) with at most ``cap`` rows each, in prompt order."""
    wave: list[_WaveItem] = []
    used = 0
    for i in range(num_prompts):
        first = 0
        while first < num_samples:
            n = min(num_samples - first, cap - used)
            wave.append(_WaveItem(i, first, n))
            used += n
            first += n
            if used == cap:
                yield wave
                wave, used = [], 0
    if wave:
        yield wave


def plan_kv_bytes(text_cfg, num_image_tokens: int, prompt_lens: Sequence[int], *, num_samples: int = 1,
                  guidance_scale: float = 5.0, uncond_mode: str = "pad", max_batch_size: int = 32,
                  dtype: torch.dtype = torch.float32) -> int:
    """Peak KV bytes a wave-scheduled :meth:`Generator.generate` holds for prompts of these
    lengths: the Generator's own wave plan and :func:`wave_geometry` (the code that sizes its
    storage). ``"pad"`` unconditional prompts are shared per distinct length; ``"short"`` is
    one ``[bos, boi]``. No model or device needed (memory planning)."""
    if uncond_mode not in UNCOND_MODES:
        raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {uncond_mode!r}")
    lens = [int(n) for n in prompt_lens]
    if not lens or min(lens) < 1:
        raise ValueError(f"prompt_lens must be non-empty lengths >= 1, got {prompt_lens!r}")
    cfg = float(guidance_scale) != 1.0
    T = int(num_image_tokens)

    def ukey(n: int) -> tuple[int, ...]:
        return (-2, -3) if uncond_mode == "short" else (-1,) * n  # stands for the pad prompt of length n

    peak = 0
    for w in plan_waves(len(lens), num_samples, max_batch_size):
        g = wave_geometry([lens[it.prompt] for it in w], [it.count for it in w],
                          [ukey(lens[it.prompt]) for it in w] if cfg else None, T)
        peak = max(peak, g.tokens)
    per_token = 2 * text_cfg.num_layers * text_cfg.num_kv_heads * text_cfg.head_dim * \
        torch.empty((), dtype=dtype).element_size()
    return peak * per_token


def _as_int64_seed(x, what: str) -> int:
    x = as_int(x, what)
    if not INT64_MIN <= x < 2 ** 64:
        raise ValueError(f"{what}: {x} does not fit in 64 bits")
    return x - 2 ** 64 if x > INT64_MAX else x


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
            as float8 with float32 per-(row, KV head) scales (:mod:`pgen_engine.ops.kv_quant`;
            ``scheduler="waves"`` only; not the C++ CPU step, which takes float32).
        sample_backend: backend for :func:`pgen_engine.ops.sample` ("auto", "torch", ...).
        scheduler: ``"waves"`` (default: groups of ``max_batch_size`` rows that start and end
            together in a contiguous cache — every row makes exactly ``num_image_tokens``
            codes, so nothing is wasted) or ``"continuous"`` (the C++ continuous-batching
            scheduler over a paged cache: a finished request's rows are refilled from the
            queue while the others decode; ``uncond_mode="pad"`` only). Same tokens either way.
        decode_mode: how a wave's decode loop runs (``"waves"`` scheduler): ``"auto"``
            (CUDA graph on CUDA, eager elsewhere), ``"eager"`` (a float32 CPU model: the C++
            wave loop of :mod:`pgen_engine.generation.decode_cpu`; else a Python loop),
            ``"static"`` (the graph-ready step run eagerly, any device) or ``"graph"`` (CUDA
            only). See :mod:`pgen_engine.generation.decode_graph`. Same tokens in every mode.
    """

    def __init__(self, model, *, max_batch_size: int = 32, max_seq_len: int | None = None,
                 uncond_mode: str = "pad", cache_dtype: torch.dtype | None = None,
                 sample_backend: str = "auto", scheduler: str = "waves", decode_mode: str = "auto"):
        if uncond_mode not in UNCOND_MODES:
            raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {uncond_mode!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if scheduler == "continuous" and uncond_mode != "pad":
            raise ValueError("scheduler='continuous' needs uncond_mode='pad' (the scheduler gives each "
                             "unconditional prompt the length of its conditional prompt)")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        T = int(model.num_image_tokens)
        max_seq_len = T + 512 if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < T + 1:
            raise ValueError(f"max_seq_len must be an int >= num_image_tokens + 1 = {T + 1}, got {max_seq_len!r}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.uncond_mode = uncond_mode
        self.sample_backend = sample_backend
        self.scheduler = scheduler
        self.special = model.special_tokens
        self.num_image_tokens = T
        cfg = model.config.text
        self._kv_shape = (cfg.num_kv_heads, cfg.head_dim)
        dtype = cache_dtype or model.dtype
        check_cache_dtype(model, dtype, scheduler)
        self.cache_dtype = dtype
        self._num_layers = cfg.num_layers
        # Flat per-layer storage [tokens, Hkv, D]. Waves carve it into the shared-prefix pool
        # and the rows' own image tokens (see _wave_cache) and grow it to what a call actually
        # needs; the continuous path carves a fixed pool into BLOCK_SIZE-token blocks, a row of
        # max_seq_len tokens rounded up to whole blocks (else a request the wave path runs
        # could never fit), so it is allocated here.
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        if scheduler == "continuous":
            self._grow(2 * max_batch_size * -(-max_seq_len // BLOCK_SIZE) * BLOCK_SIZE)
        # float8: per-(row, KV head) scales beside the cache, fixed addresses (graphs read them):
        # rows [0, 2 * max_batch_size) for a wave's prefix pool (at most one conditional and one
        # unconditional prompt per wave item), the next 2 * max_batch_size for its own rows
        self._scales = kv_quant.ScaleStore(cfg.num_layers, 4 * max_batch_size, cfg.num_kv_heads, model.device) \
            if kv_quant.is_fp8(dtype) else None
        self.decode_mode = resolve_decode_mode(decode_mode, model.device)
        self._static = StaticDecode(graphs=self.decode_mode == "graph")
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ public API
    def cache_nbytes(self) -> int:
        """Bytes of KV storage held now (grown to the largest wave so far; see :meth:`release_cache`)."""
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

    def release_cache(self) -> None:
        """Free the KV storage (and captured graphs, which point into it); the next call allocates again."""
        if self.scheduler == "continuous":
            return  # its block pool is sized once, at construction
        self._k, self._v = [], []
        self._static.clear()

    def kv_bytes(self, prompt_lens: Sequence[int], num_samples: int = 1, guidance_scale: float = 5.0) -> int:
        """Bytes of KV storage :meth:`generate` would hold at its peak for prompts of these
        lengths (``scheduler="waves"``): the same wave plan and sizing code the call runs,
        with one unconditional prefix per distinct length (``"pad"``) or one ``[bos, boi]``
        (``"short"``). For memory planning; works for a model on the meta device."""
        return plan_kv_bytes(self.model.config.text, self.num_image_tokens, prompt_lens, num_samples=num_samples,
                             guidance_scale=guidance_scale, uncond_mode=self.uncond_mode,
                             max_batch_size=self.max_batch_size, dtype=self.cache_dtype)

    def _grow(self, tokens: int) -> None:
        """Make the flat storage hold at least ``tokens`` positions per layer (contents lost)."""
        if self._k and self._k[0].shape[0] >= tokens:
            return
        dev = self.model.device
        self._static.clear() if hasattr(self, "_static") else None  # graphs point into the old storage
        self._k, self._v = [], []  # free first: peak = the new storage, not old + new
        self._k = [torch.zeros((tokens, *self._kv_shape), dtype=self.cache_dtype, device=dev)
                   for _ in range(self._num_layers)]
        self._v = [torch.zeros((tokens, *self._kv_shape), dtype=self.cache_dtype, device=dev)
                   for _ in range(self._num_layers)]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, *, gen_code_mask=None, num_samples: int = 1,
                 sampling: SamplingParams | None = None, guidance_scale: float = _UNSET,
                 temperature: float = _UNSET, top_k: int = _UNSET, top_p: float = _UNSET,
                 greedy: bool = _UNSET, seed: int | Sequence[int] | torch.Tensor = _UNSET,
                 progress: bool = False, return_logprobs: bool = False
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
            return_logprobs: also return, per code, its log-probability under the
                *conditional* distribution at ``temperature`` (``log_softmax(c / T)``, before
                CFG and the top-k / top-p filters: what an RL objective differentiates),
                computed inside the decode step (CUDA-graph safe). ``scheduler="waves"`` only.
        Returns:
            int64 ``[B * num_samples, T]`` codes on the model's device; with
            ``return_logprobs`` a pair ``(codes, float32 [B * num_samples, T] log-probs)``.
        Raises:
            ValueError / TypeError: malformed inputs or settings (ids out of range or not
                integers, a mask that is not left padding of 0 / 1, ``pixel_values`` not floating
                ``[N_img, 3, image_size, image_size]``, non-finite ``guidance_scale`` /
                ``temperature``, ...), before any work.
            NonFiniteLogitsError (a RuntimeError): some step's logits (CFG-mixed; divided by
                ``temperature`` when sampling) hold NaN / Inf — NaN / Inf weights or
                ``pixel_values``, or values past float32 — so no code can be picked. Raised when
                the wave that met them ends; the Generator stays usable.
        """
        prompts = self._parse_prompts(input_ids, attention_mask, gen_code_mask)
        B = len(prompts)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        sp = self._sampling(sampling, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                            top_p=top_p, greedy=greedy, seed=seed)
        guidance_scale, temperature, top_k, top_p, greedy = (sp.guidance_scale, sp.temperature, sp.top_k,
                                                             sp.top_p, sp.greedy)
        req_seeds = self._request_seeds(sp.request_seeds(B), B)
        pixel_chunks = self._split_pixels(prompts, pixel_values)
        T = self.num_image_tokens
        longest = max(len(p.ids) for p in prompts)
        if longest + T > self.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens + {T} image tokens exceeds max_seq_len={self.max_seq_len}")
        if return_logprobs and self.scheduler == "continuous":
            raise ValueError("return_logprobs needs scheduler='waves'")
        out = torch.empty((B * num_samples, T), dtype=torch.long, device=self.model.device)
        out_lp = torch.empty((B * num_samples, T), dtype=torch.float32, device=self.model.device) \
            if return_logprobs else None
        if self.scheduler == "continuous":
            return self._generate_continuous(prompts, pixel_chunks, req_seeds, num_samples, float(guidance_scale),
                                             float(temperature), top_k, float(top_p), bool(greedy), progress, out)
        waves = list(self._plan_waves(prompts, num_samples))
        cfg = guidance_scale != 1.0
        geoms = [wave_geometry([len(prompts[it.prompt].ids) for it in w], [it.count for it in w],
                               [self._uncond_ids(prompts[it.prompt]) for it in w] if cfg else None, T)
                 for w in waves]
        peak_tokens = max(g.tokens for g in geoms)
        self._grow(peak_tokens)
        self.last_stats = {"prefill_s": 0.0, "decode_s": 0.0, "waves": float(len(waves)),
                           "rows": float(B * num_samples), "kv_bytes_peak": float(self._token_bytes() * peak_tokens)}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(waves) * T, desc="generate", unit="tok")
        try:
            for wave, geom in zip(waves, geoms):
                toks, lps = self._run_wave(wave, geom, prompts, pixel_chunks, req_seeds, float(guidance_scale),
                                           float(temperature), top_k, float(top_p), bool(greedy), bar,
                                           return_logprobs)
                rows = torch.cat([torch.arange(it.prompt * num_samples + it.first,
                                               it.prompt * num_samples + it.first + it.count) for it in wave])
                self._check_codes(toks, rows)
                out[rows.to(out.device)] = toks
                if out_lp is not None:
                    out_lp[rows.to(out.device)] = lps
        finally:
            if bar is not None:
                bar.close()
        return (out, out_lp) if return_logprobs else out

    def _generate_continuous(self, prompts, pixel_chunks, req_seeds, num_samples, s, temperature, top_k, top_p,
                             greedy, progress, out) -> torch.Tensor:
        from .continuous import generate_continuous

        B, T = len(prompts), self.num_image_tokens
        self.last_stats = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0.0, "rows": float(B * num_samples)}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=B * num_samples * T, desc="generate", unit="tok")
        try:
            generate_continuous(self, prompts, pixel_chunks, req_seeds, num_samples, s, temperature, top_k, top_p,
                                greedy, bar, out)
        finally:
            if bar is not None:
                bar.close()
        self._sync()
        self._check_codes(out, torch.arange(out.shape[0]))
        return out

    @staticmethod
    def _check_codes(codes: torch.Tensor, rows: torch.Tensor) -> None:
        """Raise if any code is -1: its step's logits were not finite (see :meth:`_pick`).
        ``codes`` ``[n, T]`` are output rows ``rows``. One host read, after a wave."""
        bad = (codes < 0).nonzero()
        if bad.numel():
            r, t = (int(v) for v in bad[0])
            row = int(rows[r])
            raise NonFiniteLogitsError(
                f"Generator: non-finite logits (NaN or Inf) for output row {row} at image token {t} "
                f"({bad.shape[0]} code(s) of this batch affected): the model's weights or inputs (pixel_values) "
                "hold NaN / Inf, or logits / temperature overflow float32; no code can be picked from them",
                row, t)

    @torch.inference_mode()
    def generate_images(self, input_ids, attention_mask=None, pixel_values=None, *, decode_batch_size: int = 16,
                        **kwargs) -> torch.Tensor:
        """:meth:`generate`, then VQ-decode: -> uint8 ``[B * num_samples, H, W, 3]`` (same row order)."""
        codes = self.generate(input_ids, attention_mask, pixel_values, **kwargs)
        return torch.cat([self.model.decode_images(c) for c in codes.split(decode_batch_size)])

    def generate_for_users(self, histories, *, num_samples: int = 1, **kwargs) -> torch.Tensor:
        """Images (or codes) of the next item for each user history: ``histories`` are lists of
        ``(PIL image or path, title)``, oldest first. Prompts are built exactly as the model's
        training built them. See :func:`pgen_engine.generation.personal.generate_for_users`
        for the arguments and the seeding rules."""
        from .personal import generate_for_users

        return generate_for_users(self, histories, num_samples=num_samples, **kwargs)

    # ------------------------------------------------------------------ input handling
    def _parse_prompts(self, input_ids, attention_mask, gen_code_mask) -> list[_Prompt]:
        img_id = self.model.config.image_token_id
        T_img = self.model.num_image_tokens
        if isinstance(input_ids, torch.Tensor):
            if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer [B,S] tensor, got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}")
            B, S = input_ids.shape
            if attention_mask is None:
                mask = torch.ones(B, S, dtype=torch.bool)
            else:
                if not isinstance(attention_mask, torch.Tensor):
                    try:
                        attention_mask = torch.as_tensor(attention_mask)
                    except (TypeError, ValueError, RuntimeError) as e:
                        raise ValueError(f"attention_mask must be a [B,S] tensor of 0 / 1: {e}") from None
                if tuple(attention_mask.shape) != (B, S):
                    raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, S)}")
                am = attention_mask.detach().cpu()
                mask = am.bool()
                if not bool((am == mask.to(am.dtype)).all()):  # any value but 0 / 1 (2, 0.5, -1, NaN)
                    raise ValueError("attention_mask must hold only 0 (left padding) and 1 (token), got values "
                                     f"{sorted(set(am[am != mask.to(am.dtype)].tolist()))[:5]}")
                # left padding only: once a row starts, it never stops
                if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
                    raise ValueError("attention_mask must be left padding (each row 0..0 then 1..1)")
            if gen_code_mask is not None and tuple(gen_code_mask.shape) != (B, S):
                raise ValueError(f"gen_code_mask shape {tuple(gen_code_mask.shape)} != input_ids shape {(B, S)}")
            ids_rows = input_ids.detach().cpu().long().tolist()
            cm_rows = None if gen_code_mask is None else gen_code_mask.detach().cpu().bool().tolist()
            mask_rows = mask.tolist()
            rows = []
            for b in range(B):
                start = S - sum(mask_rows[b])
                rows.append((ids_rows[b][start:], None if cm_rows is None else cm_rows[b][start:]))
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with a tensor input_ids (lists are unpadded)")
            rows = []
            if isinstance(input_ids, (str, bytes)):
                raise TypeError("input_ids must be token ids ([B,S] tensor or B lists of ints), got a string: "
                                "tokenize the prompt first")
            ids_list = list(input_ids)
            if gen_code_mask is not None and len(gen_code_mask) != len(ids_list):
                raise ValueError(f"gen_code_mask has {len(gen_code_mask)} rows, input_ids {len(ids_list)}")
            for b, r in enumerate(ids_list):
                if isinstance(r, (str, bytes)):
                    raise TypeError(f"input_ids: prompt {b} is a string; pass token ids (tokenize the prompt first)")
                try:
                    toks = list(r)
                except TypeError:  # e.g. one flat list of ids: its rows are ints
                    raise TypeError(f"input_ids: prompt {b} must be a sequence of token ids, got "
                                    f"{type(r).__name__} {r!r} (pass B prompts as B lists of ints, or a [B,S] "
                                    "tensor)") from None
                ids = [as_int(t, f"input_ids: prompt {b}, position {pos}") for pos, t in enumerate(toks)]
                cm = None
                if gen_code_mask is not None:
                    cm = [bool(c) for c in gen_code_mask[b]]
                    if len(cm) != len(ids):
                        raise ValueError(f"prompt {b}: gen_code_mask has {len(cm)} entries, input_ids {len(ids)}")
                rows.append((ids, cm))
        if not rows:
            raise ValueError("input_ids holds no prompt")
        vocab = self.model.config.text.vocab_size
        K = self.model.codebook_size
        prompts = []
        for b, (ids, cm) in enumerate(rows):
            if not ids:
                raise ValueError(f"prompt {b} is empty (no attended token)")
            for pos, t in enumerate(ids):
                is_code = cm is not None and cm[pos]
                hi = K if is_code else vocab
                if not 0 <= t < hi:
                    kind = "VQ code" if is_code else "token id"
                    raise ValueError(f"prompt {b}, position {pos}: {kind} {t} outside [0, {hi})")
            n_ph = sum(1 for pos, t in enumerate(ids) if t == img_id and not (cm is not None and cm[pos]))
            if n_ph % T_img:
                raise ValueError(f"prompt {b} holds {n_ph} image placeholders (id {img_id}), not a multiple of "
                                 f"{T_img} per image")
            prompts.append(_Prompt(ids, cm if cm is not None and any(cm) else None, n_ph // T_img))
        return prompts

    def _split_pixels(self, prompts: list[_Prompt], pixel_values) -> list[torch.Tensor | None]:
        need = sum(p.num_images for p in prompts)
        if pixel_values is None:
            if need:
                raise ValueError(f"the prompts hold placeholders for {need} image(s) but pixel_values is None")
            return [None] * len(prompts)
        S = self.model.image_size
        if not need:
            raise ValueError(f"pixel_values holds {len(pixel_values)} image(s) but the prompts hold no image "
                             f"placeholder (id {self.model.config.image_token_id}); pass pixel_values=None")
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            what = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a floating tensor normalised to [-1, 1], got {what} "
                             "(uint8 images: pgen_engine.models.janus.uint8_to_pixels)")
        # the vision tower's patch grid is fixed: a smaller image would give fewer patches and
        # broadcast them over its position table without an error
        if tuple(pixel_values.shape) != (need, 3, S, S):
            raise ValueError(f"pixel_values must be [N_img,3,H,W] = [{need},3,{S},{S}] (N_img: images whose "
                             f"placeholders the prompts hold; H = W = the model's image_size), got "
                             f"{tuple(pixel_values.shape)}")
        out, i = [], 0
        for p in prompts:
            out.append(pixel_values[i:i + p.num_images] if p.num_images else None)
            i += p.num_images
        return out

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

    @staticmethod
    def _request_seeds(seed, B: int) -> torch.Tensor:
        if getattr(seed, "ndim", None) == 0:  # 0-d tensor / array: one seed
            seed = seed.item()
        if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):  # one request seed for the call
            return mix_seed(_as_int64_seed(seed, "seed"), torch.arange(B, dtype=torch.int64))
        seeds = list(seed)
        if len(seeds) != B:
            raise ValueError(f"seed: expected one int or {B} ints (one per prompt), got {len(seeds)}")
        return torch.tensor([_as_int64_seed(s, f"seed[{i}]") for i, s in enumerate(seeds)], dtype=torch.int64)

    def _uncond_ids(self, p: _Prompt) -> tuple[int, ...]:
        sp = self.special
        if self.uncond_mode == "short":
            return (sp.bos, sp.boi)
        cm = None if p.code_mask is None else torch.tensor(p.code_mask, dtype=torch.bool)
        return tuple(uncond_pad_ids(torch.tensor(p.ids, dtype=torch.long), cm, sp).tolist())

    # ------------------------------------------------------------------ waves
    def _plan_waves(self, prompts: list[_Prompt], num_samples: int) -> Iterator[list[_WaveItem]]:
        """Groups of (prompt, sample range) with at most ``max_batch_size`` rows each."""
        return plan_waves(len(prompts), num_samples, self.max_batch_size)

    # ------------------------------------------------------------------ one wave
    def _token_bytes(self) -> int:
        """Bytes of K and V for one position across all layers."""
        hkv, d = self._kv_shape
        return 2 * self._num_layers * hkv * d * torch.empty((), dtype=self.cache_dtype).element_size()

    def _cache_view(self, rows: int, L: int) -> KVCache:
        """A plain head-major ``[rows, Hkv, L, D]`` view of the storage (no shared prefixes:
        row ``b`` holds positions from 0), for tests and direct decode-loop callers."""
        self._grow(rows * L)
        hkv, d = self._kv_shape
        n = rows * L
        ks = vs = None
        if self._scales is not None:
            ks, vs = self._scales.views(0, rows)
        return KVCache(k=[k[:n].view(rows, hkv, L, d) for k in self._k],
                       v=[v[:n].view(rows, hkv, L, d) for v in self._v], layout="bhsd", k_scale=ks, v_scale=vs)

    def _wave_cache(self, g: WaveGeometry, prefix_row: list[int], prefix_len: list[int]) -> KVCache:
        """The wave's views of the storage: the prefix pool ``[P, Hkv, Lp, D]`` then the own
        rows ``[rows, Hkv, Lo, D]`` (head-major), with the rows' prefix tables."""
        hkv, d = self._kv_shape
        n_pool = g.P * g.Lp
        n_own = g.rows * g.Lo
        # fixed buffers: a captured graph reads prefix_row / prefix_len at fixed addresses
        need = max(g.rows, 2 * self.max_batch_size)
        if getattr(self, "_prow", None) is None or self._prow.shape[0] < need:
            self._prow = torch.zeros(need, dtype=torch.int32, device=self.model.device)
            self._plen = torch.zeros(need, dtype=torch.int32, device=self.model.device)
            self._static.clear()
        self._prow[:g.rows].copy_(torch.tensor(prefix_row, dtype=torch.int32))
        self._plen[:g.rows].copy_(torch.tensor(prefix_len, dtype=torch.int32))
        sc = {}
        if self._scales is not None:
            cap = 2 * self.max_batch_size
            pks, pvs = self._scales.views(0, g.P)
            ks, vs = self._scales.views(cap, g.rows)
            sc = dict(k_scale=ks, v_scale=vs, prefix_k_scale=pks, prefix_v_scale=pvs)
        return KVCache(k=[k[n_pool:n_pool + n_own].view(g.rows, hkv, g.Lo, d) for k in self._k],
                       v=[v[n_pool:n_pool + n_own].view(g.rows, hkv, g.Lo, d) for v in self._v], layout="bhsd",
                       prefix_k=[k[:n_pool].view(g.P, hkv, g.Lp, d) for k in self._k],
                       prefix_v=[v[:n_pool].view(g.P, hkv, g.Lp, d) for v in self._v],
                       prefix_row=self._prow[:g.rows], prefix_len=self._plen[:g.rows], **sc)

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
        px = [p for p in pixels if p is not None]
        pixel_values = torch.cat(px).to(dev) if px else None
        emb = m.embed_inputs(ids.to(dev), cmask.to(dev) if bool(cmask.any()) else None, pixel_values)
        all_real = bool(mask.all())
        # no mask when nothing is padded: the causal fast path of scaled_dot_product_attention
        h = m.prefill(emb, None if all_real else mask.to(dev), cache, slots.to(dev))
        return h[:, -1]

    def _pick(self, hidden: torch.Tensor, R: int, seeds: torch.Tensor, s: float, temperature: float, top_k: int,
              top_p: float, greedy: bool, with_logprobs: bool = False):
        """hidden ``[R or 2R, H]`` (cond rows, then their uncond partners with CFG) -> int64 ``[R]``
        tokens: argmax of the CFG-mixed logits, or one seeded draw per row (``seeds`` ``[R]``).
        With ``with_logprobs`` -> ``(tokens, float32 [R] log_softmax(cond / temperature)[token])``."""
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
        return tok, torch.log_softmax(c / temperature, dim=-1).gather(1, tok.clamp(min=0)[:, None]).squeeze(1)

    def _run_wave(self, wave: list[_WaveItem], geom: WaveGeometry, prompts: list[_Prompt], pixel_chunks,
                  req_seeds: torch.Tensor, s: float, temperature: float, top_k: int, top_p: float, greedy: bool, bar,
                  want_lp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        cache = self._wave_cache(geom, prefix_row, lens)

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
        out = torch.empty((R, T), dtype=torch.long, device=dev)
        out_lp = torch.empty((R, T), dtype=torch.float32, device=dev) if want_lp else None

        def pick_any(hidden: torch.Tensor, seeds: torch.Tensor):
            return self._pick(hidden, R, seeds, s, temperature, top_k, top_p, greedy, want_lp)

        def pick(hidden: torch.Tensor, t: int) -> torch.Tensor:
            picked = pick_any(hidden, step_seeds[t])
            if not want_lp:
                return picked
            out_lp[:, t] = picked[1]
            return picked[0]

        tok = pick(h_rows, 0)
        if bar is not None:
            bar.update(1)
        if self.decode_mode != "eager":
            # a graph bakes in shapes, sampling settings and parameter addresses
            key = (rows, R, geom.P, geom.Lp, geom.Lo, self._k[0].data_ptr(), cfg, s, temperature, top_k, top_p,
                   greedy, want_lp, self._weights_key() if self._static.graphs else None)
            out, out_lp = self._static.run(key, m, cache, cfg, pick_any, tok, base, slot0, step_seeds,
                                           None if bar is None else lambda: bar.update(1),
                                           first_lp=None if out_lp is None else out_lp[:, 0])
        elif decode_cpu.applies(m, cache):
            # float32 CPU: the whole loop in one C++ call (no per-step Python)
            out[:, 0] = tok
            decode_cpu.run_decode_loop(m, cache, cfg, out, out_lp, step_seeds, base, slot0, guidance_scale=s,
                                       temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                       progress=None if bar is None else bar.update)
        else:
            # the same step as decode_graph.decode_step with a host-side t: on CPU the
            # device-side counter's index ops cost more than the C++ step saves
            out[:, 0] = tok
            for t in range(1, T):
                emb = m.embed_image_codes(tok.clamp(min=0))  # -1: non-finite logits, see _pick
                if cfg:
                    emb = torch.cat([emb, emb])
                pos = base + (t - 1)
                h = m.decode_step(emb, pos, cache, slot0 + (t - 1), (pos + 1).to(torch.int32), None)
                tok = pick(h, t)
                out[:, t] = tok
                if bar is not None:
                    bar.update(1)
        self._sync()
        self.last_stats["prefill_s"] += t_prefill - t_start
        self.last_stats["decode_s"] += time.perf_counter() - t_prefill
        return out, out_lp

    def _weights_key(self) -> tuple[int, ...]:
        # A captured graph reads parameters at fixed addresses: re-capture if any moved.
        return tuple(p.data_ptr() for p in self.model.parameters())

    def reset_graphs(self) -> None:
        """Drop captured decode graphs (they are re-captured on the next wave)."""
        self._static.clear()

    def _sync(self) -> None:
        # wave boundaries only (never inside the decode loop): makes last_stats honest on GPUs
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

