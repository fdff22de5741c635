"""The ledger's errors, a branch of the one hierarchy in `sserelay.errors`.

SSERelayError
└── LedgerError            a ledger could not be opened, read or used as asked
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SSERelayError


class LedgerError(SSERelayError):
    """A ledger could not be opened (unwritable path, corrupt file, refusing server, newer
    schema), or was asked something it cannot do. The message is one line, fit to print
    after `sserelay: error: `, with any password masked."""


def one_line(exc: BaseException) -> str:
    """`exc` as one line: an OSError as `strerror: filename` (no `[Errno N]`), anything else
    with its whitespace (libpq's multi-line messages) collapsed."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def make_parents(path: Path) -> None:
    """Create the directories above `path`; a file in the way is named as such."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(parent))
    path.parent.mkdir(parents=True, exist_ok=True)
