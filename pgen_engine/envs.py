"""Every ``PGEN_*`` environment variable: its type, default and meaning, read in one place.

The package reads its switches only through :func:`get` (``tests/test_envs.py`` fails when
another module of the package reads a ``PGEN_*`` variable from ``os.environ``); build,
test and benchmark scripts read theirs directly but are listed here too, so that the
README's table (:func:`markdown_table`, tested against the README) names them all.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Union

Value = Union[bool, int, str, None]


class EnvError(ValueError):
    """A ``PGEN_*`` variable holds a value of the wrong type (the message names it)."""


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One variable: ``type`` is "bool" ("0"/"1"), "int" (>= 0) or "str"; ``scope`` says who reads it."""

    name: str
    type: str
    default: Value
    scope: str
    doc: str


VARIABLES: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("PGEN_OPS_BACKEND", "str", None, "package",
           "force one backend (torch, triton, cuda, cpp) for every op called with backend='auto'; tests"),
    EnvVar("PGEN_FUSED_OPS", "bool", False, "package",
           "1: the model's eager CPU path uses the fused ops too (read at import)"),
    EnvVar("PGEN_CPU_DECODE", "bool", True, "package",
           "0: CPU generation uses the eager torch decode instead of the C++ decode loop (read at import)"),
    EnvVar("PGEN_CPU_DECODE_TEAM", "str", "auto", "package",
           "C++ CPU decode: 1 = all threads decode every step together (each projection split by output "
           "columns), 0 = one independent group of rows per thread, auto = team at <= 4 rows per thread"),
    EnvVar("PGEN_ROWS_PER_PASS", "int", None, "package",
           "rows per pass of the C++ CPU decode (0 = all of a thread's rows at once; unset = sized to the cache)"),
    EnvVar("PGEN_CPU_PACK_MAX_MB", "int", 1024, "package (C++)",
           "largest packed copy of the weights the C++ CPU decode may hold per call, MiB"),
    EnvVar("PGEN_CACHE_DIR", "str", None, "package",
           "folder of the token caches `pgen eval` builds without --out / --cache-dir "
           "(unset: $XDG_CACHE_HOME/pgen_engine, else ~/.cache/pgen_engine)"),
    EnvVar("PGEN_PLAN", "bool", True, "package",
           "0: train.py skips the start-up memory-plan check on GPU machines"),
    EnvVar("PGEN_NO_CUDA", "bool", False, "build", "set: setup.py builds _C without the CUDA kernels"),
    EnvVar("PGEN_WITH_CUDA", "bool", False, "build", "CMake option / compile define for the CUDA kernels"),
    EnvVar("PGEN_REQUIRE_EXT", "bool", False, "tests", "1: a missing compiled _C fails the tests (make test)"),
    EnvVar("PGEN_SHARED_DIR", "str", None, "tests", "folder holding shared data sets (default: ../shared)"),
    EnvVar("PGEN_TEST_DEVICE", "str", "cpu", "tests", "device the op tests run on (cpu or cuda)"),
    EnvVar("PGEN_BENCH_DEVICE", "str", None, "benchmarks", "device of the generation benchmark"),
    EnvVar("PGEN_BENCH_DTYPE", "str", None, "benchmarks", "dtype of the generation benchmark"),
    EnvVar("PGEN_BENCH_GEOMETRY", "str", None, "benchmarks", "model geometry of the generation benchmark"),
    EnvVar("PGEN_BENCH_BATCHES", "str", None, "benchmarks", "comma-separated batch sizes"),
    EnvVar("PGEN_BENCH_HF_BATCHES", "str", None, "benchmarks", "batch sizes of the transformers baseline"),
    EnvVar("PGEN_BENCH_PROMPT_LEN", "int", None, "benchmarks", "prompt length in tokens"),
    EnvVar("PGEN_BENCH_ROUNDS", "int", None, "benchmarks", "timed rounds"),
    EnvVar("PGEN_BENCH_TEAM_BATCHES", "str", None, "benchmarks",
           "comma-separated batch sizes of the team-vs-groups CPU decode benchmark"),
    EnvVar("PGEN_BENCH_GUIDED_CASES", "str", None, "benchmarks",
           "cases of the guided-rollout benchmark (demo-rl,realistic)"),
    EnvVar("PGEN_BENCH_PROFILE", "bool", False, "benchmarks", "1: write a torch profiler trace"),
    EnvVar("PGEN_BENCH_KV", "str", None, "benchmarks",
           "KV cache dtypes the GPU generation benchmark times (comma list of bf16, fp8; default both)"),
)}


def get(name: str) -> Value:
    """The typed value of ``name`` (its default when unset or empty).

    Raises:
        KeyError: ``name`` is not a registered variable.
        EnvError: the value does not parse as the variable's type.
    """
    var = VARIABLES[name]
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return var.default
    if var.type == "bool":
        if raw not in ("0", "1"):
            raise EnvError(f"{name}={raw!r}: expected 0 or 1")
        return raw == "1"
    if var.type == "int":
        if not raw.isdigit():
            raise EnvError(f"{name}={raw!r}: expected an integer >= 0")
        return int(raw)
    return raw


def markdown_table() -> str:
    """The README's table of variables (one row per variable, in registry order)."""
    rows = ["| variable | type | default | read by | meaning |", "|---|---|---|---|---|"]
    for v in VARIABLES.values():
        default = "unset" if v.default is None else (str(int(v.default)) if isinstance(v.default, bool)
                                                     else str(v.default))
        rows.append(f"| `{v.name}` | {v.type} | {default} | {v.scope} | {v.doc} |")
    return "\n".join(rows) + "\n"
