"""The README's copy-paste commands are the ones CI runs and the files they name exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_demo_command_names_a_bundled_example() -> None:
    demo_command = readme_commands()[0]
    assert "examples/demo.sh" in demo_command
    assert (ROOT / "examples" / "demo.sh").stat().st_mode & 0o111
    assert "examples/tokens.txt" in (ROOT / "examples" / "demo.sh").read_text()
