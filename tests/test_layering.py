"""Imports point downward only (DESIGN.md, "Layers"; STYLE.md, "Layout").

Read from the source with `ast`, so an import hidden inside a function (or under
`if TYPE_CHECKING:`) counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = "sserelay"
SOURCE = Path(__file__).resolve().parent.parent / PACKAGE

#: Modules of the pure layers (wire, metering, formats): sans-IO, testable without sockets.
PURE = [
    name
    for name in ("sse", "tokens", "meter", "chunking", "errors", "formats", "providers")
    if (SOURCE / f"{name}.py").exists()
]
#: What the pure layers may never import: an event loop, the network, the HTTP stack, the face.
IO_MODULES = {"asyncio", "httpx", "starlette", "uvicorn", "click", "rich", "socket"}


def module_names() -> list[str]:
    """Every module of the package, as dotted names (`sserelay`, `sserelay.cli`, ...)."""
    names = []
    for path in sorted(SOURCE.glob("*.py")):
        names.append(PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}")
    return names


def imports_of_source(source: str, module: str) -> set[str]:
    """The absolute names of everything `source` (the text of `module`) imports.

    `from a import b` yields `a`, and `a.b` too, since `b` may be a submodule; a relative
    import is resolved against the package `module` lives in."""
    is_package = module == PACKAGE
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


@cache
def imports_of(module: str) -> frozenset[str]:
    path = SOURCE / ("__init__.py" if module == PACKAGE else f"{module.rsplit('.', 1)[1]}.py")
    return frozenset(imports_of_source(path.read_text(encoding="utf-8"), module))


def roots(names: frozenset[str] | set[str]) -> set[str]:
    """The top-level package of each imported name."""
    return {name.split(".", 1)[0] for name in names}


def internal_imports(module: str) -> set[str]:
    """The modules of this package that `module` imports by name."""
    return set(imports_of(module)) & set(module_names())


def internal_closure(module: str) -> set[str]:
    """`module` and every package module it reaches through its own imports."""
    seen = {module}
    todo = [module]
    while todo:
        for imported in internal_imports(todo.pop()) - seen:
            seen.add(imported)
            todo.append(imported)
    return seen


# --------------------------------------------------------------------------- the reader itself


def test_import_reader_sees_every_kind_of_import() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os.path, json as j\n"
        "from . import cli\n"
        "from .meter import Bill\n"
        "from .. import elsewhere\n"
        "def later():\n"
        "    import asyncio\n"
        "    from rich.console import Console\n"
        "if TYPE_CHECKING:\n"
        "    from click import Context\n"
    )
    found = imports_of_source(source, "sserelay.sub.mod")
    assert {"os.path", "json", "asyncio", "rich.console", "click"} <= found
    assert {"sserelay.sub", "sserelay.sub.cli", "sserelay.sub.meter", "sserelay.elsewhere"} <= found
    assert "__future__" not in found
    assert imports_of_source("from . import x\n", PACKAGE) == {"sserelay", "sserelay.x"}


def test_the_checks_below_are_not_vacuous() -> None:
    assert {"sse", "tokens", "meter", "chunking", "errors"} <= set(PURE)
    assert "click" in roots(imports_of("sserelay.cli"))
    assert "rich" in roots(imports_of("sserelay.display"))
    assert "asyncio" in roots(imports_of("sserelay.stream"))
    assert "sserelay.cli" in imports_of("sserelay.__main__")


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_io(name: str) -> None:
    module = f"{PACKAGE}.{name}"
    assert roots(imports_of(module)) & IO_MODULES == set()


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_reach_no_io_through_the_package(name: str) -> None:
    # a pure module may use another package module only if that one is pure too
    for reached in sorted(internal_closure(f"{PACKAGE}.{name}")):
        assert roots(imports_of(reached)) & IO_MODULES == set(), f"{name} reaches {reached}"


@pytest.mark.parametrize("module", module_names())
def test_only_the_cli_imports_click(module: str) -> None:
    if module != "sserelay.cli":
        assert "click" not in roots(imports_of(module))


@pytest.mark.parametrize("module", module_names())
def test_only_the_cli_and_display_import_rich(module: str) -> None:
    if module not in {"sserelay.cli", "sserelay.display"}:
        assert "rich" not in roots(imports_of(module))


@pytest.mark.parametrize("module", module_names())
def test_nothing_imports_the_cli(module: str) -> None:
    # the CLI is the top layer: nothing in the package may depend on it, except the
    # `python -m sserelay` entry point, whose whole job is to run it
    if module not in {"sserelay.cli", "sserelay.__main__"}:
        assert "sserelay.cli" not in imports_of(module)
