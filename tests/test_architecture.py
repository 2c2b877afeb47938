"""The import graph of mv_interp, read with ``ast`` (no import is executed).

Layering rules (``docs/architecture.md``): no import cycle, counting imports inside functions
too (a lazy import only hides a cycle); no module imports another module's ``_private`` name;
nobody reaches into the nnsight wrapper's ``_module``; no ``inspect.signature`` sniffing of
adapter methods (the adapter contract in ``adapters/base.py`` declares what generic code may call).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mv_interp"
PACKAGE = "mv_interp"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in module ``name``
    that runs (at import time or inside a function)."""
    out = []
    skip = _type_checking_only(TREES[name])
    for node in ast.walk(TREES[name]):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node)
            if not target.startswith(PACKAGE):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                # ``from . import analysis`` imports a module; ``from .x import f`` a name of module x
                out.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in _imports(name):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exports its modules; ``from .pkg import x`` inside the package
    # would otherwise make every package a cycle with its own __init__. Edges *into* a
    # package __init__ count as edges into the modules it re-exports, which are already there.
    return {v: {w for w in ws if not (_is_package(w) and v.startswith(w + "."))} for v, ws in graph.items()}


# No known violations: the tests fail on any cycle and any cross-module private import.
KNOWN_CYCLES: list[list[str]] = []
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def test_parser_sees_the_package():
    assert "mv_interp.adapters.base" in MODULES and "mv_interp.types" in MODULES
    assert "mv_interp.adapters.base" in _edges()["mv_interp.adapters.dust3r"]


def test_no_import_cycle():
    cycles = [c for c in _cycles(_without_package_inits(_edges())) if c not in KNOWN_CYCLES]
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_no_private_name_imported_from_another_module():
    bad = []
    for name in MODULES:
        for target, imported, line in _imports(name):
            leaf = imported if imported is not None else target.rsplit(".", 1)[-1]
            if leaf.startswith("_") and not leaf.startswith("__") and target != name \
                    and (name, leaf) not in KNOWN_PRIVATE_IMPORTS:
                if imported is None and target.rsplit(".", 1)[-1].startswith("_"):
                    # importing a private *module* (``_cli``, ``_compat``) of one's own package is fine
                    if target.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] or target.rsplit(".", 1)[0] == name:
                        continue
                bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {leaf} from {target}")
    assert not bad, "\n".join(bad)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_nobody_unwraps_the_nnsight_model_by_hand():
    bad = []
    for name, tree in TREES.items():
        for call in _calls(tree):
            f = call.func
            if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and len(call.args) >= 2:
                arg = call.args[1]
                if isinstance(arg, ast.Constant) and arg.value == "_module":
                    bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{call.lineno}: {f.id}(…, '_module') "
                               "— use mv_interp.types.as_module / is_traced")
    assert not bad, "\n".join(bad)


def test_no_signature_sniffing():
    bad = []
    for name, tree in TREES.items():
        for call in _calls(tree):
            f = call.func
            if isinstance(f, ast.Attribute) and f.attr == "signature" and isinstance(f.value, ast.Name) \
                    and f.value.id == "inspect":
                bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{call.lineno}: inspect.signature — declare "
                           "what generic code needs on MultiViewModel instead")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("rule", ["cycle", "private"])
def test_the_checks_can_fail(rule):
    """The checks above find what they look for (on a made-up graph / import)."""
    if rule == "cycle":
        assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    else:
        tree = ast.parse("from .scoring import _as_views\n")
        node = tree.body[0]
        assert _resolve("mv_interp.heads.figures", node) == "mv_interp.heads.scoring"
