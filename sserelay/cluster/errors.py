"""The cluster's errors, a branch of the one hierarchy in `sserelay.errors`.

SSERelayError
└── RedisUnavailable       Redis (--redis) could not be reached or used when the run started
"""

from __future__ import annotations

from ..errors import SSERelayError


class RedisUnavailable(SSERelayError):
    """Redis could not be reached, or refused what the run needs, before it listened. The
    message is one line (fit after `sserelay: error: `), the URL's password masked. Once a
    run is listening, Redis failing is not an error: see connection.py."""
