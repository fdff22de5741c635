"""man/sserelay.1 documents every option of every command and renders cleanly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import pytest

from sserelay.cli.commands import EXIT_CODES, main
from tests.conftest import require_tool

MAN_PAGE = Path(__file__).resolve().parent.parent / "man" / "sserelay.1"


def man_source() -> str:
    # roff writes a literal dash as \-
    return MAN_PAGE.read_text().replace("\\-", "-")


def all_options() -> list[tuple[str, str]]:
    found = [("sserelay", opt) for p in main.params for opt in p.opts if opt.startswith("-")]
    assert isinstance(main, click.Group)
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                found += [(name, opt) for opt in param.opts + param.secondary_opts]
    return found


@pytest.mark.parametrize(("command", "option"), all_options())
def test_every_option_is_in_the_man_page(command: str, option: str) -> None:
    assert option in man_source(), f"{command} {option} is missing from man/sserelay.1"


def test_every_command_and_exit_code_is_in_the_man_page() -> None:
    text = man_source()
    assert isinstance(main, click.Group)
    for name in main.commands:
        assert f".B {name}" in text or f'.BI "{name} ' in text
    for reason, code in EXIT_CODES.items():
        assert f".B {code}\n{reason}" in text


def test_man_renders_without_warnings() -> None:
    man = require_tool("man", package="man-db")
    result = subprocess.run(
        [man, "--warnings", "-l", str(MAN_PAGE)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"},
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""
    assert "sserelay serve" in result.stdout
