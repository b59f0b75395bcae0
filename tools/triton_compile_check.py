"""Compile every Triton kernel the ops launch for a real GPU target, on a machine without one.

    TRITON_INTERPRET=0 python tools/triton_compile_check.py [--arch 90] [--arch 80] [--quick] [--fp16]

The CPU test suite runs the kernels in Triton's interpreter, which accepts code the compiler
rejects (plain module globals read inside a kernel, loop-carried values that change type, ...).
This script drives each public op with representative dtypes / head dims / flags on CPU
tensors, but replaces Triton's launcher with a compile for ``cuda:<arch>`` (TTIR -> PTX ->
cubin, ptxas included): a kernel that would not build on a GPU fails here, and nothing runs.
Exit status 1 lists the failing kernels and their errors.
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

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_LAUNCH_OPTS = ("num_warps", "num_stages", "num_ctas")


class Compiler:
    """Stands in for ``JITFunction.run``: compiles each distinct specialisation once."""

    def __init__(self, archs: list[int]):
        self.targets = [GPUTarget("cuda", a, 32) for a in archs]
        self.seen: set = set()
        self.failures: list[tuple[str, str, str]] = []

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
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())),
               tuple(sorted(opts.items())))
        if key in self.seen:
            return None
        self.seen.add(key)
        for target in self.targets:
            try:
                triton.compile(ASTSource(fn, sig, const), target=target, options=opts)
            except Exception as e:  # report every kernel, not just the first
                self.failures.append((fn.__name__, f"sm_{target.arch} {const}", str(e)[-2000:]))
        return None


def drive_ops(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), head_dims: tuple[int, ...] = (64, 128),
              heads: tuple[tuple[int, int], ...] = ((4, 4), (8, 2))) -> None:
    """Call every op's Triton path with representative arguments (CPU tensors, outputs unused).

    fp16 shares bf16's code paths (16-bit loads, fp32 accumulation), so it is opt-in."""
    from pgen_engine.ops.attention import decode_attention, paged_kv_write, prefill_attention
    from pgen_engine.ops.logprobs import token_logprobs
    from pgen_engine.ops.norm import rms_norm
    from pgen_engine.ops.rotary import apply_rotary
    from pgen_engine.ops.sampling import sample

    t = "triton"
    for dt in dtypes:
        x = torch.randn(6, 64, dtype=dt, requires_grad=True)
        w = torch.ones(64, dtype=dt, requires_grad=True)
        rms_norm(x, w, 1e-6, backend=t).float().sum().backward()
        y, h = rms_norm(x, w, 1e-6, residual=torch.randn(6, 64, dtype=dt), backend=t)
        (y.float().sum() + h.float().sum()).backward()
        for d in head_dims:
            xr = torch.randn(2, 5, 4, d, dtype=dt, requires_grad=True)
            cos, sin = torch.randn(2, 5, d, dtype=dt), torch.randn(2, 5, d, dtype=dt)
            apply_rotary(xr, cos, sin, backend=t).float().sum().backward()
            for hq, hkv in heads:
                q = torch.randn(2, 9, hq, d, dtype=dt, requires_grad=True)
                k = torch.randn(2, 9, hkv, d, dtype=dt, requires_grad=True)
                v = torch.randn(2, 9, hkv, d, dtype=dt, requires_grad=True)
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
                paged_kv_write(kc, vc, torch.randn(3, hkv, d, dtype=dt), torch.randn(3, hkv, d, dtype=dt),
                               torch.tensor([0, 17, -1]), backend=t)
                bt = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
                decode_attention(torch.randn(3, hq, d, dtype=dt), kc, vc, torch.tensor([5, 20, 32], dtype=torch.int32),
                                 block_table=bt, backend=t)
                decode_attention(torch.randn(6, hq, d, dtype=dt), kc, vc, torch.full((6,), 9, dtype=torch.int32),
                                 backend=t)
        logits = torch.randn(3, 1000, dtype=dt)
        seeds = torch.arange(3, dtype=torch.int64)
        for u, k_, p_ in ((None, 0, 1.0), (torch.randn(3, 1000, dtype=dt), 50, 0.9), (None, 0, 0.8)):
            sample(logits, uncond_logits=u, guidance_scale=3.0, top_k=k_, top_p=p_, seed=seeds, backend=t)
        hid = torch.randn(5, 32, dtype=dt, requires_grad=True)
        head = torch.randn(300, 32, dtype=dt, requires_grad=True)
        lp, ent = token_logprobs(hid, head, torch.tensor([0, 5, 299, 7, 1]), backend=t)
        (lp.sum() + ent.sum()).backward()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90)")
    ap.add_argument("--fp16", action="store_true", help="also compile the float16 specialisations")
    ap.add_argument("--quick", action="store_true",
                    help="head dim 128 with grouped-query heads only (Janus' geometry; about a third of the time)")
    args = ap.parse_args(argv)
    comp = Compiler(args.arch or [90])
    JITFunction.run = lambda fn, *a, **k: comp.run(fn, *a, **k)
    import pgen_engine.ops._backend as backend
    import pgen_engine.ops.sampling as sampling

    # the ops pick their Triton path only where a GPU (or the interpreter) is present
    backend.triton_available = sampling.triton_available = lambda: True
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if args.fp16 else (torch.float32, torch.bfloat16)
    if args.quick:
        drive_ops(dtypes, head_dims=(128,), heads=((8, 2),))
    else:
        drive_ops(dtypes)
    names = sorted({s[0] for s in comp.seen})
    print(f"compiled {len(comp.seen)} specialisations of {len(names)} kernels for "
          f"{', '.join(f'sm_{t.arch}' for t in comp.targets)}: {', '.join(names)}")
    for name, spec, err in comp.failures:
        print(f"FAILED {name} [{spec}]\n{err}\n", file=sys.stderr)
    return 1 if comp.failures else 0


if __name__ == "__main__":
    sys.exit(main())
