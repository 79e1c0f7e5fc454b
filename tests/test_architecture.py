"""The shape of the package, as README "Architecture" draws it, kept true.

- ``source/`` and ``target/`` never import each other; the core (the package's
  top-level modules) imports neither. Above them sit the modules that show both
  sides to a project (``SHELL``: the app config and its system checks, the admin,
  the URLs and the ASGI entry point a project plugs in, the status report and the
  management commands).
- No import cycles, counting imports inside functions.
- Modules under 500 lines, functions under 80.

Read from the source with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "changefeed_sync"
NAME = "changefeed_sync"
#: Modules that present both sides to users: they may import either.
SHELL = {"apps", "checks", "admin", "urls", "asgi", "status", "management"}
#: Former paths kept for what may name them after an upgrade (queued tasks).
COMPAT = {"delivery"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "migrations":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((NAME, *parts))] = path
    return found


MODULES = _modules()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> set[str]:
    """Modules of the package that ``module`` imports, anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, path)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # "from . import x" imports the module x when there is one.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith(NAME):
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _side(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("source", "target"):
        return parts[1]
    if len(parts) > 1 and parts[1] in SHELL | COMPAT:
        return "shell"
    # The package itself is core: it is imported before any of its modules.
    return "core"


def test_the_two_sides_never_import_each_other_and_the_core_neither() -> None:
    allowed = {
        "core": {"core"},
        "source": {"core", "source"},
        "target": {"core", "target"},
        "shell": {"core", "source", "target", "shell"},
    }
    wrong = sorted(
        f"{module} ({_side(module)}) imports {imported} ({_side(imported)})"
        for module, imported_set in GRAPH.items()
        for imported in imported_set
        if _side(imported) not in allowed[_side(module)]
    )
    assert wrong == []


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines >= MAX_MODULE_LINES:
            too_long.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length >= MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name} (line {node.lineno}): {length} lines")
    assert too_long == []


@pytest.mark.parametrize(
    ("code", "side"),
    [
        ("changefeed_sync.source.capture", "source"),
        ("changefeed_sync.target.views", "target"),
        ("changefeed_sync.registry", "core"),
        ("changefeed_sync.management.commands.changefeed_pull", "shell"),
        ("changefeed_sync", "core"),
    ],
)
def test_sides_are_told_apart(code: str, side: str) -> None:
    assert _side(code) == side


def test_the_import_reader_sees_relative_and_function_level_imports() -> None:
    """The checks above are only as good as this reader: it must see what the
    capture module imports (relative, from the package above) and what the app
    config imports inside ready()'s helpers."""
    assert "changefeed_sync.outbox" in GRAPH["changefeed_sync.source.capture"]
    assert "changefeed_sync.source.capture_pg" in GRAPH["changefeed_sync.source.capture"]
    assert "changefeed_sync.source.capture" in GRAPH["changefeed_sync.apps"]


def test_the_core_names_no_side_in_its_strings() -> None:
    """Imports by dotted path (import_string, import_module) are invisible to the
    reader above: the core's strings must not name a side's modules either, except
    the delivery backend paths of the settings (conf.py), which the source side and
    the checks resolve."""
    allowed = {"changefeed_sync.conf"}
    found = []
    for module, path in MODULES.items():
        if _side(module) != "core" or module in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for side in ("source", "target"):
                    if (
                        f"changefeed_sync.{side}." in node.value
                        or f"changefeed_sync/{side}/" in node.value
                    ):
                        found.append(f"{module} (line {node.lineno}): {node.value[:60]!r}")
    assert found == []
