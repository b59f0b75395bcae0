"""``wheelhouse/``: the pure-Python dependencies a lent GPU machine may lack, carried as wheels.

    python -m benchmarks.wheelhouse build [--dir wheelhouse] [--python-version 3.12]   # here (needs a registry)
    python -m benchmarks.wheelhouse install [--dir wheelhouse]                        # there (no registry)

``build`` writes wheels for :data:`ROOTS` (DeepSpeed, built here as a pure-Python wheel with
``DS_BUILD_OPS=0``, the test tools, scipy and pillow) plus every runtime dependency they declare for the
*target* interpreter (``--python-version``, Linux x86-64), each pinned to the version installed
here when there is one (the versions CI tests), never :data:`EXCLUDED` (the CUDA stack the GPU
machine already has, and numpy, which ``transformers`` already requires). It fails when the
folder ends up larger than :data:`MAX_MIB`.

``install`` installs, from that folder only (``pip --no-index``), the :data:`NEEDED_MODULES`
that do not import, and never torch: :func:`missing_modules` decides, so a machine that has
everything installs nothing.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "wheelhouse"
MAX_MIB = 60.0
# distribution -> the module that proves it is installed. pillow: `import pgen_engine` loads PIL
# (pgen_engine.data) and neither torch nor transformers requires it, so a GPU image may lack it.
NEEDED_MODULES = {"deepspeed": "deepspeed", "pytest": "pytest", "pytest-benchmark": "pytest_benchmark",
                  "pytest-xdist": "xdist", "scipy": "scipy", "pillow": "PIL"}
ROOTS = tuple(NEEDED_MODULES)
# Never carried: the GPU machine's own CUDA stack (replacing it would break its torch), and
# numpy (transformers, which pgen_engine needs, already requires it; ~16 MiB).
EXCLUDED = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*|cuda-.*|numpy)$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``Py_CPUInfo`` -> ``py-cpuinfo``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_modules(needed: dict[str, str] | None = None) -> list[str]:
    """Distributions of ``needed`` (default :data:`NEEDED_MODULES`) whose module does not import here."""
    needed = NEEDED_MODULES if needed is None else needed
    return [dist for dist, mod in needed.items() if importlib.util.find_spec(mod) is None]


def wheel_requirements(wheel: Path, python_version: str) -> list[str]:
    """Names of the runtime (non-extra) dependencies a wheel declares for CPython ``python_version`` on Linux x86-64."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(env):
            names.append(canonical(req.name))
    return names


def _pin(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _wheel_name(path: Path) -> str:
    return canonical(path.name.split("-", 1)[0])


def folder_mib(folder: Path) -> float:
    """Total size of the wheels in ``folder`` in MiB."""
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2 ** 20


def build(folder: Path, python_version: str, max_mib: float = MAX_MIB) -> list[Path]:
    """Fill ``folder`` with the wheels (see module docstring); returns them. Raises SystemExit when too large."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = python_version.replace(".", "")
    have = {_wheel_name(p) for p in folder.glob("*.whl")}
    todo = [canonical(r) for r in ROOTS]
    done: set[str] = set()
    while todo:
        name = todo.pop(0)
        if name in done or EXCLUDED.match(name):
            continue
        done.add(name)
        if name not in have:
            with tempfile.TemporaryDirectory() as tmp:
                if name == "deepspeed":
                    # sdist only on PyPI: build the pure-Python wheel here (no ops compiled;
                    # DeepSpeed JIT-builds the few it needs on the GPU machine). No build
                    # isolation, so the build uses the torch installed here and fetches none.
                    env = dict(os.environ, DS_BUILD_OPS="0")
                    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp, _pin(name), env=env)
                else:
                    plat = [a for p in PLATFORMS for a in ("--platform", p)]
                    _pip("download", "--no-deps", "--only-binary=:all:", "-q", "--python-version", python_version,
                         "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none", *plat,
                         "-d", tmp, _pin(name))
                for w in Path(tmp).glob("*.whl"):
                    shutil.move(str(w), folder / w.name)
            have = {_wheel_name(p) for p in folder.glob("*.whl")}
            if name not in have:
                raise SystemExit(f"wheelhouse: pip produced no wheel for {name}")
        wheel = next(p for p in folder.glob("*.whl") if _wheel_name(p) == name)
        todo += [d for d in wheel_requirements(wheel, python_version) if d not in done]
    wheels = sorted(folder.glob("*.whl"))
    mib = folder_mib(folder)
    for w in wheels:
        print(f"  {w.name}  {w.stat().st_size / 2 ** 20:.2f} MiB")
    print(f"wheelhouse: {len(wheels)} wheels, {mib:.1f} MiB in {folder}")
    if mib > max_mib:
        raise SystemExit(f"wheelhouse: {mib:.1f} MiB is over the {max_mib:.0f} MiB limit "
                         "(the working tree and carried paths travel within 64 MiB)")
    return wheels


def install(folder: Path, needed: dict[str, str] | None = None) -> list[str]:
    """``pip install --no-index --find-links folder`` the missing distributions; returns what it installed.

    Raises:
        RuntimeError: something is missing and ``folder`` holds no wheels (one line saying what to run).
    """
    missing = missing_modules(needed)
    if not missing:
        return []
    if not any(folder.glob("*.whl")):
        raise RuntimeError(f"missing {', '.join(missing)} and {folder} holds no wheels: run `make wheelhouse` on a "
                           "machine with a package registry and carry the folder here")
    # --no-index: never a registry; torch is not in the folder, so pip can only keep the installed one.
    _pip("install", "-q", "--no-index", "--find-links", str(folder), *missing)
    importlib.invalidate_caches()
    still = missing_modules(needed)
    if still:
        raise RuntimeError(f"installed from {folder} but {', '.join(still)} still do not import")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "install", "missing"))
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--python-version", default="3.12", help="target interpreter (the lent GPU machines: 3.12)")
    ap.add_argument("--max-mib", type=float, default=MAX_MIB)
    args = ap.parse_args(argv)
    if args.action == "build":
        build(args.dir, args.python_version, args.max_mib)
    elif args.action == "install":
        try:
            got = install(args.dir)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"wheelhouse: error: {e}", file=sys.stderr)
            return 1
        print(f"wheelhouse: installed {', '.join(got) if got else 'nothing (all present)'}")
    else:
        print(" ".join(missing_modules()) or "nothing missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
