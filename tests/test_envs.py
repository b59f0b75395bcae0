"""PGEN_* variables: one registry (pgen_engine/envs.py), read only there, and the README's table matches it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pgen_engine import envs

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pgen_engine"


def test_readme_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    assert envs.markdown_table() in readme


def test_typed_values(monkeypatch):
    monkeypatch.delenv("PGEN_PLAN", raising=False)
    assert envs.get("PGEN_PLAN") is True  # default
    monkeypatch.setenv("PGEN_PLAN", "0")
    assert envs.get("PGEN_PLAN") is False
    monkeypatch.setenv("PGEN_ROWS_PER_PASS", "3")
    assert envs.get("PGEN_ROWS_PER_PASS") == 3
    monkeypatch.setenv("PGEN_ROWS_PER_PASS", "-1")
    with pytest.raises(envs.EnvError, match="PGEN_ROWS_PER_PASS='-1': expected an integer >= 0"):
        envs.get("PGEN_ROWS_PER_PASS")
    monkeypatch.setenv("PGEN_FUSED_OPS", "yes")
    with pytest.raises(envs.EnvError, match="expected 0 or 1"):
        envs.get("PGEN_FUSED_OPS")
    with pytest.raises(KeyError):
        envs.get("PGEN_NOT_A_VARIABLE")


def _env_reads(path: Path) -> list[tuple[int, str]]:
    """(line, name) of each ``os.environ.get("PGEN_...")`` / ``os.environ["PGEN_..."]`` / ``os.getenv`` read."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = ast.unparse(node.func)
            if f.endswith("environ.get") or f.endswith("getenv") or f.endswith("environ.setdefault"):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and ast.unparse(node.value).endswith("environ") and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        if isinstance(key, str) and key.startswith("PGEN_"):
            out.append((node.lineno, key))
    return out


def test_package_reads_pgen_variables_only_through_envs():
    offenders = [f"{p.relative_to(REPO)}:{line} {name}" for p in sorted(PKG.rglob("*.py")) if p.name != "envs.py"
                 for line, name in _env_reads(p)]
    assert not offenders, "read PGEN_* through pgen_engine.envs.get instead:\n" + "\n".join(offenders)


def test_every_variable_read_anywhere_is_registered():
    files = [*REPO.glob("*.py"), *(REPO / "pgen_engine").rglob("*.py"), *(REPO / "tests").rglob("*.py"),
             *(REPO / "benchmarks").rglob("*.py"), *(REPO / "tools").rglob("*.py")]
    names = {name for p in files for _, name in _env_reads(p)}
    # reads through an alias (`env = os.environ.get; env("PGEN_X")`) escape _env_reads: count every
    # call whose first argument is a PGEN_* name
    names |= {node.args[0].value for p in files for node in ast.walk(ast.parse(p.read_text()))
              if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and re.fullmatch(r"PGEN_[A-Z0-9_]+", node.args[0].value)}
    cpp = "".join(p.read_text() for p in (REPO / "csrc").glob("*.cpp"))
    names |= set(re.findall(r'getenv\("(PGEN_[A-Z_]+)"\)', cpp))
    names.discard("PGEN_BENCH_")  # a prefix scan in the benchmark, not a variable
    names.discard("PGEN_NOT_A_VARIABLE")  # this file's unknown-name case
    missing = sorted(names - set(envs.VARIABLES))
    assert not missing, f"unregistered PGEN_* variables (add them to pgen_engine/envs.py): {missing}"
