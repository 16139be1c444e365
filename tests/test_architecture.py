"""Which way the imports run (docs/architecture.md), read from the code itself.

rastos (shared helpers) <- ops (the op library) <- imagebuilder, daemon, hub. Nothing below imports
what stands above it, and no modules import each other in a circle, not even through an import made
inside a function or under TYPE_CHECKING (that is how circles hide).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGES = ("rastos", "ops", "imagebuilder", "daemon", "hub")
# What each package may import of the others.
ALLOWED = {
    "rastos": set(),
    "ops": {"rastos"},
    "imagebuilder": {"rastos", "ops"},
    "daemon": {"rastos", "ops"},
    "hub": {"rastos", "ops"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((CHECKOUT / package).rglob("*.py")):
            parts = list(path.relative_to(CHECKOUT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_packages_import_only_what_stands_below_them() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in sorted(targets)
        if (ours := module.split(".")[0]) != (theirs := target.split(".")[0]) and theirs not in ALLOWED[ours]
    ]
    assert wrong == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert cycles(graph()) == []


def test_the_checks_see_a_circle_and_a_wrong_import() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert imports(CHECKOUT / "daemon/core.py", modules()) >= {"ops.steps", "daemon.jobs"}


def test_no_string_in_the_code_holds_a_lone_surrogate() -> None:
    """The image compiles its Python with Debian's python3 (3.13), whose compiler refuses a docstring
    holding a lone surrogate ("\\ud800" written unescaped in a docstring); 3.11 here accepts it."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if any(0xD800 <= ord(char) <= 0xDFFF for char in node.value):
                found.append(f"{name}:{node.lineno}")
    assert found == []


# The Python modules the image's Debian packages give it (imagebuilder/stages/bootstrap.py's
# DAEMON_PACKAGES): python3-sdbus, -systemd, -btrfsutil, -pyroute2, -aiohttp, -cryptography.
IMAGE_MODULES = {"sdbus", "systemd", "btrfsutil", "pyroute2", "aiohttp", "cryptography"}


def top_level_imports(path: Path) -> list[tuple[str, int]]:
    """What a module imports when it is loaded: its module-level imports, also under try or if, but not
    under TYPE_CHECKING and not inside a function (those run only when called)."""
    found: list[tuple[str, int]] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((alias.name.split(".")[0], node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.module.split(".")[0], node.lineno))
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return found


def test_what_the_image_runs_imports_only_what_the_image_has() -> None:
    """rastosd and rastosctl run in the image on Debian's python3 and the Python packages above, not on
    this checkout's .venv: a module-level import of anything else (rich, say) breaks them there, and
    only a booted image would tell. The image has the packages rastos, ops and daemon."""
    from imagebuilder.stages.rastos import PYTHON_PACKAGES

    allowed = set(sys.stdlib_module_names) | IMAGE_MODULES | set(PYTHON_PACKAGES) | {"__future__"}
    found = [
        f"{name}:{line} imports {module}"
        for name, path in modules().items()
        if name.split(".")[0] in PYTHON_PACKAGES
        for module, line in top_level_imports(path)
        if module not in allowed
    ]
    assert found == [], "import these inside the function that needs them, or add the image's Debian package"
