"""Package shape: no import circles between the package's modules, no module over ~500 lines, and no
unexplained import inside a function body."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pgen_engine"
MAX_LINES = 500
# Known debts (to split, not to grow): the pinned size is today's, so any growth fails.
OVER_LIMIT: dict[str, int] = {}
# A function-body import needs a reason (an optional dependency, an import cycle, a slow import kept
# off `pgen`'s start-up path), written as this comment on the import or on the comment lines above it.
LATE_IMPORT_MARK = "# late import:"
# Known debts (to sort out, not to grow): unmarked function-body imports per file.
LATE_IMPORT_DEBTS: dict[str, int] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """In-package modules ``path`` imports at module level (function bodies excluded: they run later)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def test_no_import_circles():
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: _imports(p, set(paths)) - {m} for m, p in paths.items()}
    # a package's __init__ importing its own submodules is not a circle through that package
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_are_small():
    big = {}
    for p in PKG.rglob("*.py"):
        rel = str(p.relative_to(REPO))
        n = len(p.read_text().splitlines())
        if n > OVER_LIMIT.get(rel, MAX_LINES):
            big[rel] = n
    assert not big, f"modules over {MAX_LINES} lines (or grown past their recorded size): {big}"


def unmarked_late_imports(source: str) -> list[int]:
    """Line numbers of imports inside function bodies that carry no ``# late import:`` reason."""
    lines = source.splitlines()
    found = set()
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            marked = any(LATE_IMPORT_MARK in ln for ln in lines[node.lineno - 1:node.end_lineno])
            j = node.lineno - 2
            while not marked and j >= 0 and lines[j].strip().startswith("#"):
                marked = LATE_IMPORT_MARK in lines[j]
                j -= 1
            if not marked:
                found.add(node.lineno)
    return sorted(found)


def test_unmarked_late_imports_are_found():
    src = (
        "import os\n"
        "def f():\n"
        "    import json\n"
        "    import triton  # late import: optional\n"
        "    # late import: an import cycle\n"
        "    # (second line of the reason)\n"
        "    from x import y\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from z import w\n"
    )
    assert unmarked_late_imports(src) == [3, 10]


def test_function_body_imports_say_why():
    bad = {}
    for p in PKG.rglob("*.py"):
        rel = str(p.relative_to(REPO))
        lines = unmarked_late_imports(p.read_text())
        if len(lines) > LATE_IMPORT_DEBTS.get(rel, 0):
            bad[rel] = lines
    assert not bad, (f"imports inside function bodies without a `{LATE_IMPORT_MARK} <why>` comment (move them to "
                     f"the top of the module, or say why they must be late): {bad}")
