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
