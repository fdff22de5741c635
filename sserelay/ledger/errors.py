"""The ledger's errors, a branch of the one hierarchy in `sserelay.errors`.

SSERelayError
└── LedgerError            a ledger could not be opened, read or used as asked
"""

from __future__ import annotations

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
