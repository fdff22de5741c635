"""Imports point downward only (DESIGN.md, "Layers"; STYLE.md, "Layout").

One rule per package: the folders are the layers, in the order of `LAYERS`, and a module
may import its own layer and the ones before it, never a later one. On top of that:
the pure layers import no event loop, network, HTTP stack or face; only `cli/` imports
click and rich; nothing below `http/` imports starlette or uvicorn.

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

#: The layers, lowest first. `errors` is the one hierarchy every layer raises from;
#: `secrecy` masks secrets in whatever any layer prints or records.
LAYERS = (
    "errors",
    "secrecy",
    "wire",
    "metering",
    "providers",
    "sources",
    "record",
    "streaming",
    "ledger",
    # Redis: the topic bus and the shared budget store. Above the hub and the budget policy
    # it serves (streaming, metering), below the run that builds it (http).
    "cluster",
    "http",
    "cli",
)
#: Sans-IO layers: testable without sockets, an event loop or a terminal.
PURE_LAYERS = ("errors", "secrecy", "wire", "metering", "providers")
#: What the pure layers may never import: an event loop, the network, the HTTP stack, the face.
IO_MODULES = {"asyncio", "httpx", "starlette", "uvicorn", "click", "rich", "socket", "threading"}
#: Only the HTTP layer (and the CLI above it) may speak ASGI frameworks.
HTTP_STACK = {"starlette", "uvicorn"}


def module_names() -> list[str]:
    """Every module of the package, as dotted names (`sserelay`, `sserelay.wire.sse`, ...)."""
    names = []
    for path in sorted(SOURCE.rglob("*.py")):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def layer_of(module: str) -> str | None:
    """The layer a module of the package belongs to (None for `sserelay` and `__main__`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def imports_of_source(source: str, module: str, is_package: bool = False) -> set[str]:
    """The absolute names of everything `source` (the text of `module`) imports.

    `from a import b` yields `a`, and `a.b` too, since `b` may be a submodule; a relative
    import is resolved against the package `module` lives in."""
    is_package = is_package or module == PACKAGE
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
    relative = Path(*module.split(".")[1:])
    path = SOURCE / relative / "__init__.py"
    if not path.exists():
        path = (SOURCE / relative).with_suffix(".py")
    is_package = path.name == "__init__.py"
    return frozenset(imports_of_source(path.read_text(encoding="utf-8"), module, is_package))


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


def in_layers(*layers: str) -> list[str]:
    return [m for m in module_names() if layer_of(m) in layers]


# --------------------------------------------------------------------------- the reader itself


def test_import_reader_sees_every_kind_of_import() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os.path, json as j\n"
        "from . import cli\n"
        "from sserelay.metering.meter import Bill\n"
        "from .. import elsewhere\n"
        "def later():\n"
        "    import asyncio\n"
        "    from rich.console import Console\n"
        "if TYPE_CHECKING:\n"
        "    from click import Context\n"
    )
    found = imports_of_source(source, "sserelay.sub.mod")
    assert {"os.path", "json", "asyncio", "rich.console", "click"} <= found
    assert {"sserelay.sub", "sserelay.sub.cli", "sserelay.metering.meter", "sserelay"} <= found
    assert "sserelay.elsewhere" in found
    assert "__future__" not in found
    assert imports_of_source("from . import x\n", PACKAGE, True) == {"sserelay", "sserelay.x"}


def test_the_checks_below_are_not_vacuous() -> None:
    names = module_names()
    for layer in LAYERS[1:]:
        if (SOURCE / layer).is_dir():
            assert any(layer_of(m) == layer for m in names), f"no module in {layer}/"
    assert sum((SOURCE / layer).is_dir() for layer in LAYERS) >= 8
    assert "sserelay.wire.sse" in names and "sserelay.metering.meter" in names
    assert "click" in roots(imports_of("sserelay.cli.commands"))
    assert "rich" in roots(imports_of("sserelay.cli.display"))
    assert "asyncio" in roots(imports_of("sserelay.streaming.stream"))
    assert "starlette" in roots(imports_of("sserelay.http.asgi"))
    assert "sserelay.cli" in imports_of("sserelay.__main__")
    # a later layer imported from an earlier one would be caught
    assert layer_of("sserelay.http.asgi") == "http" and layer_of("sserelay") is None


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("module", [m for m in module_names() if layer_of(m)])
def test_imports_point_downward(module: str) -> None:
    here = LAYERS.index(layer_of(module) or "")
    for imported in sorted(internal_imports(module)):
        layer = layer_of(imported)
        if layer is not None:
            assert LAYERS.index(layer) <= here, f"{module} imports {imported} (a later layer)"


@pytest.mark.parametrize("module", in_layers(*PURE_LAYERS))
def test_pure_layers_import_no_io(module: str) -> None:
    assert roots(imports_of(module)) & IO_MODULES == set()


@pytest.mark.parametrize("module", in_layers(*PURE_LAYERS))
def test_pure_layers_reach_no_io_through_the_package(module: str) -> None:
    # a pure module may use another package module only if that one is pure too
    for reached in sorted(internal_closure(module)):
        assert roots(imports_of(reached)) & IO_MODULES == set(), f"{module} reaches {reached}"


@pytest.mark.parametrize("module", module_names())
def test_only_the_cli_imports_click_and_rich(module: str) -> None:
    if layer_of(module) != "cli":
        assert roots(imports_of(module)) & {"click", "rich"} == set()


@pytest.mark.parametrize("module", module_names())
def test_nothing_below_http_imports_the_http_stack(module: str) -> None:
    if layer_of(module) not in ("http", "cli"):
        assert roots(imports_of(module)) & HTTP_STACK == set()


@pytest.mark.parametrize("module", module_names())
def test_nothing_imports_the_cli(module: str) -> None:
    # the CLI is the top layer: nothing in the package may depend on it, except the
    # `python -m sserelay` entry point, whose whole job is to run it
    if layer_of(module) != "cli" and module != "sserelay.__main__":
        assert not any(layer_of(m) == "cli" for m in internal_imports(module))
