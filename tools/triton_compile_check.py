"""Compile every Triton kernel the ops launch for real GPU targets, on a machine without one.

    TRITON_INTERPRET=0 python tools/triton_compile_check.py [--arch 80 --arch 89 --arch 90]
        [--dtypes fp32,bf16,fp16] [--head-dims 64,80,128] [--all-heads] [--ops prefill,decode] [--verbose]

The CPU test suite runs the kernels in Triton's interpreter, which accepts code the compiler
rejects (plain module globals read inside a kernel, loop-carried values that change type, ...)
and has no shared-memory limit. This script drives each public op with the dtypes / head dims
/ flags the GPU path uses, on CPU tensors, once per target architecture with the ops told
they run on that architecture (so they pick that GPU's block sizes, see
``pgen_engine.ops._triton_config``), but replaces Triton's launcher with a compile for
``cuda:<arch>`` (TTIR -> PTX -> cubin, ptxas included). Nothing runs. Each compiled kernel's
shared memory is checked against the architecture's per-block limit, which a launch on that
GPU would otherwise fail with ``OutOfResources``.
Exit status 1 lists the kernels that failed to compile or overflow.
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("triton_compile_check: run with TRITON_INTERPRET=0 (interpreted kernels are not compiled)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pgen_engine.ops import _triton_config  # noqa: E402

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_LAUNCH_OPTS = ("num_warps", "num_stages", "num_ctas")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("norm", "rotary", "prefill", "decode", "kv_write", "sample", "logprobs", "decode_shared")
DEFAULT_ARCHS = (80, 89, 90)


class Compiler:
    """Stands in for ``JITFunction.run``: compiles each distinct specialisation once for the
    current target and records its shared memory."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.target: GPUTarget | None = None
        self.seen: set = set()
        self.failures: list[tuple[str, str, str]] = []
        self.shared: dict[tuple[str, int], int] = {}  # (kernel, arch) -> largest shared memory, bytes

    def signature(self, fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTS}
        vals = dict(zip(fn.arg_names, args))
        vals.update(kwargs)
        sig, const = {}, {}
        for p in fn.params:
            v = vals.get(p.name)
            if p.is_constexpr or v is None:
                sig[p.name], const[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _DT[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {p.name} has unsupported type {type(v).__name__}")
        return sig, const, opts

    def run(self, fn: JITFunction, *args, grid=None, warmup=False, **kwargs):
        sig, const, opts = self.signature(fn, args, dict(kwargs))
        arch = self.target.arch
        key = (fn.__name__, arch, tuple(sorted(sig.items())),
               tuple(sorted((k, repr(v)) for k, v in const.items())), tuple(sorted(opts.items())))
        if key in self.seen:
            return None
        self.seen.add(key)
        spec = f"sm_{arch} {const} {opts}"
        try:
            kernel = triton.compile(ASTSource(fn, sig, const), target=self.target, options=opts)
        except Exception as e:  # report every kernel, not just the first
            self.failures.append((fn.__name__, spec, str(e)[-2000:]))
            return None
        shared, limit = int(kernel.metadata.shared), _triton_config.smem_limit(arch)
        if self.verbose:
            print(f"{fn.__name__} {spec}: {shared} B", flush=True)
        self.shared[fn.__name__, arch] = max(shared, self.shared.get((fn.__name__, arch), 0))
        if shared > limit:
            self.failures.append((fn.__name__, spec, f"needs {shared} B of shared memory; sm_{arch} allows {limit} B"))
        return None


def drive_ops(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16),
              head_dims: tuple[int, ...] = (64, 80, 128), heads: tuple[tuple[int, int], ...] = ((8, 2),),
              ops: tuple[str, ...] = OPS) -> None:
    """Call every op in ``ops`` on its Triton path with representative arguments (CPU
    tensors, outputs unused). ``heads`` are (query heads, KV heads) pairs."""
    from pgen_engine.ops.attention import decode_attention, paged_kv_write, prefill_attention
    from pgen_engine.ops.logprobs import token_logprobs
    from pgen_engine.ops.norm import rms_norm
    from pgen_engine.ops.rotary import apply_rotary
    from pgen_engine.ops.sampling import sample

    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; expected some of {OPS}")
    t = "triton"
    for dt in dtypes:
        if "norm" in ops:
            x = torch.randn(6, 64, dtype=dt, requires_grad=True)
            w = torch.ones(64, dtype=dt, requires_grad=True)
            rms_norm(x, w, 1e-6, backend=t).float().sum().backward()
            y, h = rms_norm(x, w, 1e-6, residual=torch.randn(6, 64, dtype=dt), backend=t)
            (y.float().sum() + h.float().sum()).backward()
        for d in head_dims:
            if "rotary" in ops:
                xr = torch.randn(2, 5, 4, d, dtype=dt, requires_grad=True)
                cos, sin = torch.randn(2, 5, d, dtype=dt), torch.randn(2, 5, d, dtype=dt)
                apply_rotary(xr, cos, sin, backend=t).float().sum().backward()
            for hq, hkv in heads:
                q = torch.randn(2, 9, hq, d, dtype=dt, requires_grad=True)
                k = torch.randn(2, 9, hkv, d, dtype=dt, requires_grad=True)
                v = torch.randn(2, 9, hkv, d, dtype=dt, requires_grad=True)
                if "prefill" in ops:
                    kpm = torch.ones(2, 9, dtype=torch.bool)
                    kpm[0, :3] = False
                    prefill_attention(q, k, v, causal=True, backend=t).float().sum().backward()
                    prefill_attention(q, k, v, causal=True, key_padding_mask=kpm, backend=t).float().sum().backward()
                    spans = torch.tensor([[[1, 4]], [[0, 0]]], dtype=torch.int32)
                    prefill_attention(q, k, v, causal=True, bidirectional_spans=spans, backend=t)
                    qv, kv_, vv = (z.detach().reshape(18, *z.shape[2:]) for z in (q, k, v))
                    cu = torch.tensor([0, 7, 18], dtype=torch.int32)
                    prefill_attention(qv, kv_, vv, causal=True, cu_seqlens=cu, max_seqlen=11, backend=t)
                kc = torch.zeros(6, 16, hkv, d, dtype=dt)
                vc = torch.zeros(6, 16, hkv, d, dtype=dt)
                if "kv_write" in ops:
                    paged_kv_write(kc, vc, torch.randn(3, hkv, d, dtype=dt), torch.randn(3, hkv, d, dtype=dt),
                                   torch.tensor([0, 17, -1]), backend=t)
                if "decode" in ops:
                    bt = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
                    decode_attention(torch.randn(3, hq, d, dtype=dt), kc, vc,
                                     torch.tensor([5, 20, 32], dtype=torch.int32), block_table=bt, backend=t)
                    decode_attention(torch.randn(6, hq, d, dtype=dt), kc, vc, torch.full((6,), 9, dtype=torch.int32),
                                     backend=t)
                if "decode_shared" in ops:
                    _drive_decode_shared(dt, hq, hkv, d)
        if "sample" in ops:
            # Janus' image vocabulary: the kernel's tile is min(next_pow2(V), 4096) on a GPU
            logits = torch.randn(3, 16384, dtype=dt)
            seeds = torch.arange(3, dtype=torch.int64)
            for u, k_, p_ in ((None, 0, 1.0), (torch.randn(3, 16384, dtype=dt), 50, 0.9), (None, 0, 0.8)):
                sample(logits, uncond_logits=u, guidance_scale=3.0, top_k=k_, top_p=p_, seed=seeds, backend=t)
        if "logprobs" in ops:  # tiles are fixed on a GPU; sizes only need to reach every code path
            hid = torch.randn(5, 32, dtype=dt, requires_grad=True)
            head = torch.randn(300, 32, dtype=dt, requires_grad=True)
            lp, ent = token_logprobs(hid, head, torch.tensor([0, 5, 299, 7, 1]), backend=t)
            (lp.sum() + ent.sum()).backward()


def _drive_decode_shared(dt: torch.dtype, hq: int, hkv: int, d: int) -> None:
    """The shared-prefix decode kernels with caches in ``dt`` and (16-bit activations) float8."""
    from pgen_engine.ops.decode_shared import shared_prefix_decode
    from pgen_engine.ops.kv_quant import FP8_DTYPE

    q = torch.randn(4, hq, d, dtype=dt)
    idx = dict(seqlens=torch.tensor([9, 7, 5, 6], dtype=torch.int32),
               prefix_row=torch.tensor([0, 0, 1, 1], dtype=torch.int32),
               prefix_len=torch.tensor([6, 6, 3, 3], dtype=torch.int32))
    caches = [dt] if dt == torch.float32 else [dt, FP8_DTYPE]
    for cd in caches:
        own = torch.zeros(4, hkv, 4, d, dtype=cd)
        pool = torch.zeros(2, hkv, 8, d, dtype=cd)
        sc = {}
        if cd == FP8_DTYPE:
            sc = dict(k_scale=torch.ones(4, hkv), v_scale=torch.ones(4, hkv), prefix_k_scale=torch.ones(2, hkv),
                      prefix_v_scale=torch.ones(2, hkv))
        shared_prefix_decode(q, own, own, prefix_k=pool, prefix_v=pool, backend="triton", **idx, **sc)


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append",
                    help=f"compute capability x10, repeatable (default: {' '.join(map(str, DEFAULT_ARCHS))})")
    ap.add_argument("--dtypes", type=_csv(str), default=tuple(_DTYPES), help="comma list of fp32,bf16,fp16")
    ap.add_argument("--head-dims", type=_csv(int), default=(64, 80, 128), help="comma list (default 64,80,128)")
    ap.add_argument("--all-heads", action="store_true",
                    help="also equal query/KV head counts (default: grouped-query 8/2 only)")
    ap.add_argument("--ops", type=_csv(str), default=OPS, help=f"comma list of {','.join(OPS)}")
    ap.add_argument("--geometry-arch", type=int,
                    help="size the tiles as for this architecture instead of the target (to test the check)")
    ap.add_argument("--verbose", action="store_true", help="print every specialisation's shared memory")
    args = ap.parse_args(argv)
    bad = [d for d in args.dtypes if d not in _DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; expected some of {list(_DTYPES)}")
    comp = Compiler(verbose=args.verbose)
    JITFunction.run = lambda fn, *a, **k: comp.run(fn, *a, **k)
    import pgen_engine.ops._backend as backend
    import pgen_engine.ops.sampling as sampling

    # the ops pick their Triton path only where a GPU (or the interpreter) is present
    backend.triton_available = sampling.triton_available = lambda: True
    archs = args.arch or list(DEFAULT_ARCHS)
    heads = ((8, 2), (4, 4)) if args.all_heads else ((8, 2),)
    for arch in archs:
        comp.target = GPUTarget("cuda", arch, 32)
        # the launchers size their tiles for the architecture they believe they run on
        _triton_config.device_arch = lambda device, a=args.geometry_arch or arch: a
        drive_ops(tuple(_DTYPES[d] for d in args.dtypes), head_dims=args.head_dims, heads=heads, ops=args.ops)
    names = sorted({s[0] for s in comp.seen})
    for arch in archs:
        limit = _triton_config.smem_limit(arch)
        worst = max(((v, k[0]) for k, v in comp.shared.items() if k[1] == arch), default=(0, "-"))
        print(f"sm_{arch}: largest shared memory {worst[0]} B ({worst[1]}) of {limit} B")
    print(f"compiled {len(comp.seen)} specialisations of {len(names)} kernels for "
          f"{', '.join(f'sm_{a}' for a in archs)}: {', '.join(names)}")
    for name, spec, err in comp.failures:
        print(f"FAILED {name} [{spec}]\n{err}\n", file=sys.stderr)
    return 1 if comp.failures else 0


if __name__ == "__main__":
    sys.exit(main())
