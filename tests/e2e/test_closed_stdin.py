"""`sserelay serve <&-`: stdin closed is an input error in one line, exit 5 (issue 10, item 8).

fd 0 is really closed, by a shell's `<&-` as a user would (stdin=DEVNULL is an open,
empty stdin: another case).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

EXIT_INPUT_ERROR = 5


@pytest.mark.parametrize("args", [[], ["-"], ["--as", "openai"]], ids=["serve", "-", "--as"])
def test_serve_with_stdin_closed_is_a_one_line_input_error(args: list[str]) -> None:
    argv = [sys.executable, "-m", "sserelay", "serve", *args, "--port", "0"]
    result = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" <&-', "sh", *argv],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert result.stderr.splitlines() == [
        "sserelay: error: cannot read stdin: it is closed (give a SOURCE, or pipe one in)"
    ]
    assert result.stdout == ""
