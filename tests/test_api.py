"""The public API of `sserelay` (STYLE.md, "Layout": a sorted `__all__`, and a test for it)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sserelay

ROOT = Path(__file__).resolve().parent.parent

#: DESIGN.md, "The core contract": what `sserelay` exports at least.
CORE_API = {
    "Bill",
    "ClientDisconnected",
    "Event",
    "Meter",
    "NoFlushError",
    "SSEDecoder",
    "count_tokens",
    "encode_event",
    "stream_sse",
}

# PEP 440, Appendix B: the canonical form of a public version identifier.
PEP_440 = re.compile(
    r"([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
    r"((a|b|rc)(0|[1-9][0-9]*))?(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?"
)


def test_all_is_sorted_and_unique() -> None:
    assert sserelay.__all__ == sorted(sserelay.__all__)
    assert len(set(sserelay.__all__)) == len(sserelay.__all__)


@pytest.mark.parametrize("name", sserelay.__all__)
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from sserelay import {name}", namespace)
    assert namespace[name] is getattr(sserelay, name)


def test_all_has_the_core_api() -> None:
    assert set(sserelay.__all__) >= CORE_API


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from sserelay import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(sserelay.__all__)


def test_version_is_pep_440() -> None:
    assert isinstance(sserelay.__version__, str)
    assert PEP_440.fullmatch(sserelay.__version__), sserelay.__version__


def test_version_lives_in_one_place() -> None:
    # hatch reads the version from sserelay/__init__.py (pyproject: dynamic = ["version"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" in pyproject["project"]["dynamic"]
    assert "version" not in pyproject["project"]
    source = ROOT / pyproject["tool"]["hatch"]["version"]["path"]
    assert source == ROOT / "sserelay" / "__init__.py"
    literals = [
        node.value.value
        for node in ast.parse(source.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign)
        and [ast.unparse(target) for target in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [sserelay.__version__]


def test_python_m_sserelay_version_prints_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sserelay", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sserelay.__version__ in result.stdout.split()  # e.g. "sserelay, version 0.1.0"
    assert result.stdout.count("\n") == 1
