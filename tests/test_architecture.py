"""The package's shape (issue 13): no import cycles, no project imports hidden inside functions (outside the
CLI's documented lazy imports), and the training/dump loops short enough to read on one screen."""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "logitcache"
#: the CLI imports the library inside each command so that `logitcache --help` stays fast (cli/__init__.py)
LAZY_IMPORTS_ALLOWED = ("logitcache.cli",)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _targets(mods: dict[str, pathlib.Path], current: str, node: ast.AST) -> set[str]:
    """Project modules an import statement loads (``from pkg import sub`` counts as ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = current.split(".")
        pkg = base if mods[current].name == "__init__.py" else base[:-1]
        module = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    out = set()
    for a in node.names:
        if f"{module}.{a.name}" in mods:
            out.add(f"{module}.{a.name}")
        elif module in mods:
            out.add(module)
    return out - {current}


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    inner = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[m] |= _targets(mods, m, node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.startswith(LAZY_IMPORTS_ALLOWED):
                inner += [f"{p.relative_to(PKG.parent)}:{s.lineno}" for s in ast.walk(node)
                          if isinstance(s, (ast.Import, ast.ImportFrom)) and _targets(mods, m, s)]
    return edges, inner


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    edges, _ = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle of the code's layers
    layered = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    assert _cycles(layered) == []


def test_no_project_module_is_imported_inside_a_function():
    _, inner = _graph()
    assert inner == [], f"function-level project imports (fix the layering instead): {inner}"


def test_the_checker_sees_cycles_and_inner_imports(tmp_path):
    """The two checks above can fail: a planted cycle and a planted inner import are found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    mods = {"logitcache.x": tmp_path / "x.py", "logitcache.y": tmp_path / "y.py"}
    node = ast.parse("def f():\n    from logitcache import y\n").body[0].body[0]
    assert _targets(mods, "logitcache.x", node) == {"logitcache.y"}


def _function_length(module: str, name: str) -> int:
    tree = ast.parse(_modules()[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise AssertionError(f"{module}.{name} not found")


def test_the_loops_read_on_one_screen():
    assert _function_length("logitcache.train.loop", "train") <= 80
    assert _function_length("logitcache.train.loop", "train_pass") <= 80
    assert _function_length("logitcache.dump", "dump") <= 80
