"""The package's import graph, read from the source (no imports run): no circles, and the
layers point one way (``vllm/`` may use ``transport/``, ``cuda``, ``store``; never the
reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "p2pkv"

# (importer prefix, imported prefix) pairs that must never occur
FORBIDDEN = [
    ("p2pkv.transport", "p2pkv.vllm"),
    ("p2pkv.cuda", "p2pkv.vllm"),
    ("p2pkv.cuda", "p2pkv.transport"),
    ("p2pkv.store", "p2pkv.vllm"),
    ("p2pkv.store", "p2pkv.transport"),
    ("p2pkv.keys", "p2pkv.vllm"),
    ("p2pkv.directory", "p2pkv.vllm"),
    ("p2pkv.directory", "p2pkv.transport"),
    ("p2pkv.transport", "p2pkv.directory"),
    # the cost model and planner are pure; the trace simulation sits on top of everything
    ("p2pkv.planner", "p2pkv.directory"),
    ("p2pkv.planner", "p2pkv.sim"),
    ("p2pkv.directory", "p2pkv.planner"),
    ("p2pkv.directory", "p2pkv.sim"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The p2pkv module ``name`` refers to (a module, else its nearest package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the p2pkv modules it imports (anywhere in it: top level, functions, and
    ``TYPE_CHECKING`` blocks, which are design dependencies too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")
                    anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            for name in names:
                if not name.startswith("p2pkv"):
                    continue
                target = _resolve(name, modules)
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph = import_graph()
    assert "p2pkv.transport.base" in graph["p2pkv.vllm.worker"]
    assert "p2pkv.transport.wire" in graph["p2pkv.transport.server"]


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, f"import circles: {[sorted(c) for c in found]}"


def test_layers_point_one_way():
    bad = [(m, t) for m, targets in import_graph().items() for t in targets
           for a, b in FORBIDDEN if (m == a or m.startswith(a + "."))
           and (t == b or t.startswith(b + "."))]
    assert not bad, f"imports against the layering: {bad}"


def test_the_harness_serves_only_tests_benches_and_the_demo():
    """Nothing that runs in production imports ``harness/`` or ``bench/``, and no bench imports
    another (what they share lives in ``harness/`` and ``bench/report``)."""
    users = ("p2pkv.harness", "p2pkv.bench", "p2pkv.demo", "p2pkv.cli")
    graph = import_graph()
    bad = [(m, t) for m, targets in graph.items() for t in targets
           if t.startswith(("p2pkv.harness", "p2pkv.bench")) and not m.startswith(users)]
    def bench(name: str) -> str:  # a bench is a module of bench/ or a package of modules
        return ".".join(name.split(".")[:3])

    bad += [(m, t) for m, targets in graph.items() for t in targets
            if m.startswith("p2pkv.bench.") and t.startswith("p2pkv.bench.")
            and t != "p2pkv.bench.report" and bench(m) != bench(t)]
    bad += [(m, t) for m, targets in graph.items() for t in targets
            if m.startswith("p2pkv.harness") and t.startswith("p2pkv.bench")]
    assert not bad, f"imports against the harness layering: {bad}"
