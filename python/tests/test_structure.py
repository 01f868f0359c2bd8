"""The SDK's layout rules: API paths in one module, in-container code apart from the
client SDK, and (see test_import_graph_is_acyclic) no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import flare

PKG = Path(flare.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_api_paths_live_in_one_module() -> None:
    offenders = [
        str(path.relative_to(PKG))
        for name, path in _modules().items()
        if name != "flare._api" and "/v1/" in path.read_text()
    ]
    assert offenders == [], f"spell API paths with flare._api, not literally: {offenders}"


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _imports(module: str, path: Path, known: set[str], top_level_only: bool) -> set[str]:
    """The flare modules ``module`` imports: at import time (module level, outside
    ``if TYPE_CHECKING:``), or (``top_level_only=False``) anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                found.add(base)
                for alias in node.names:
                    found.add(f"{base}.{alias.name}")  # a submodule, when it is one
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try,)):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif not top_level_only:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child])
                    else:
                        for sub in ast.walk(child):
                            if isinstance(sub, ast.stmt):
                                visit([sub])

    visit(tree.body)
    if not top_level_only:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                visit([node])
    return {m for m in found if m in known and m != module}


def _graph(top_level_only: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known, top_level_only) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_import_graph_is_acyclic() -> None:
    graph = _graph()
    assert "flare.function" in graph["flare.app"]  # the graph sees relative imports
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_in_container_code_stays_apart_from_the_client_sdk() -> None:
    """flare._runtime (the runner, on every cold start) imports, even lazily, nothing of
    the SDK but flare.exception and its own modules."""
    graph = _graph(top_level_only=False)
    allowed = {"flare", "flare.exception"}
    for name, deps in graph.items():
        if name.startswith("flare._runtime"):
            bad = {d for d in deps if d not in allowed and not d.startswith("flare._runtime")}
            assert not bad, f"{name} imports {sorted(bad)}"


# The client machinery: HTTP transport, the embedded server, uploads, mounts, environment
# capture, pickling, calling functions and streaming logs. Containers import the user's module, hence flare.app, flare.function
# and flare.image: those import it lazily (in the functions that publish or call), so a
# container's start does not pay for it.
CLIENT_MACHINERY = {"flare._transport", "flare._server", "flare._blobs", "flare._mount", "flare._localenv",
                    "flare._serialization", "flare.cli", "flare._invocation", "flare._map", "flare.function_call",
                    "flare._output"}


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_modules_imported_in_containers_leave_the_client_machinery_lazy() -> None:
    graph = _graph()
    for name in ("flare", "flare.app", "flare.function", "flare.image", "flare._runtime.runner"):
        heavy = _closure(graph, name) & CLIENT_MACHINERY
        assert not heavy, f"importing {name} imports {sorted(heavy)} at import time"
