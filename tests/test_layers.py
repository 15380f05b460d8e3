"""The package's import graph, read with ``ast`` (module-level and function-level imports alike):
no module imports another that imports it back, and each layer imports only layers to its left."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "appliance"

# Each layer may import only the layers to its left (and itself).
LAYERS = ("contract", "home", "runtime", "data", "training", "export", "quality", "serving", "engine", "cli")
# The one edge still against the order: open_engine, the contract's factory, names the in-process
# engine. It goes when the factory moves to the engine layer; nothing else may join it.
KNOWN = {("appliance.contract.api", "appliance.engine.local")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The appliance modules a file imports anywhere in it (``from pkg import mod`` names the module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for block in [n for n in ast.walk(tree) if _type_checking_only(n)]:
        block.body = []  # imports for annotations only: never run, so no cycle at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {name for name in found if name in known and name != module_name(path)}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def graph(allowed: set[tuple[str, str]] = KNOWN) -> dict[str, set[str]]:
    """module -> the appliance modules it imports (less the ``allowed`` edges)."""
    mods = modules()
    known = set(mods)
    return {name: {t for t in imported(path, known) if (name, t) not in allowed} for name, path in mods.items()}


def layer(module: str) -> int | None:
    """The layer index of ``appliance.<layer>.…``; None for the package root (outside the layers)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_is_read():
    edges = graph(allowed=set())
    assert "appliance.home.paths" in edges["appliance.engine.pipeline"]
    assert "appliance.serving" in {".".join(m.split(".")[:2]) for m in edges}
    # function-level imports count: open_engine imports the engine inside its body
    assert "appliance.engine.local" in edges["appliance.contract.api"]


def test_known_exceptions_are_still_needed():
    edges = graph(allowed=set())
    stale = [edge for edge in KNOWN if edge[1] not in edges.get(edge[0], set())]
    assert not stale, f"remove from KNOWN, the import is gone: {stale}"


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_import_only_to_their_left():
    wrong = []
    for module, targets in graph().items():
        mine = layer(module)
        for target in sorted(targets):
            theirs = layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]})")
    assert not wrong, "layer order broken:\n" + "\n".join(wrong)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
