"""The import graph: no cycle anywhere, and every import follows the layers of docs/architecture.md.

Every import counts, wherever it is written: at module level, inside a function, or under
`if TYPE_CHECKING:` (a type-only import can hide a cycle just as well)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "workers", "server", "gateway")  # each may import only those before it
# Within server/, a module may import only its own layer and those below it.
SERVER_LAYERS = (
    ("server.errors", "server.ids", "server.config", "server.logs", "server.kinds", "server.metrics",
     "server.tracing"),
    ("server.store",),
    ("server.queue", "server.tenancy", "server.engine"),
    ("server.runtime",),
    ("server.ops",),
    ("server.boot",),
    ("server.cli", "server.commands", "server.process"),
)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:  # alembic's scripts import only the tables
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` imports (a `from pkg import mod` counts as importing mod)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def rank(module: str) -> tuple[int, int]:
    top = PACKAGES.index(module.split(".")[0])
    if not module.startswith("server."):
        return top, 0
    for level, prefixes in enumerate(SERVER_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return top, level
    raise AssertionError(f"{module} is in no layer of SERVER_LAYERS: add it there and to docs/architecture.md")


def test_there_is_no_import_cycle() -> None:
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_imports_follow_the_layers() -> None:
    edges = graph()
    for module in edges:
        rank(module)  # every module has a layer
    wrong = [
        f"{module} imports {target}"
        for module, targets in edges.items()
        for target in targets
        if rank(target) > rank(module)
    ]
    assert wrong == []


def test_the_checker_sees_cycles_and_wrong_way_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert rank("workers.trainer") > rank("schemas.wire")
    assert rank("server.ops.training") > rank("server.runtime") > rank("server.queue.scheduler")
    modules = project_modules()
    assert "server.queue.scheduler" in modules and "gateway.app" in modules
    assert "server.runtime" in imports_of("gateway.app", modules["gateway.app"], modules)
