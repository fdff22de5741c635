"""The names sserelay gives its Redis keys, and what a topic may be called. No I/O here:
the HTTP layer checks a topic name without importing redis.

Every key of one topic (or one budget account) shares a hash tag, `{...}`: on a Redis
Cluster they live in one slot, as the scripts that touch them together require.

    sserelay:{NAME}                      the topic's stream (entries of batches of events)
    sserelay:{NAME}:state                its last id, event count and publisher (a hash)
    sserelay:{budget:KEY:START}          a key's budget in the period starting at START
    sserelay:{budget:KEY:START}:leases   the reservations on it, scored by their expiry
    sserelay:{rate:KEY}                  a key's billed tokens per second (the last minute)
    sserelay:{instances:LEDGER}          the instances writing to one ledger, by heartbeat
"""

from __future__ import annotations

import hashlib

#: A topic name: printable ASCII without spaces or braces (a hash tag holds it), this long.
TOPIC_MAX = 200


def check_topic(name: str) -> str:
    """`name` if it can name a topic, else ValueError saying why."""
    if not name:
        raise ValueError("the topic name is empty")
    if len(name) > TOPIC_MAX:
        raise ValueError(f"the topic name is longer than {TOPIC_MAX} characters")
    if not all("!" <= c <= "~" and c not in "{}" for c in name):
        raise ValueError(f"{name!r} is not a topic name: printable ASCII, no spaces or braces")
    return name


def topic_stream(name: str) -> str:
    return f"sserelay:{{{name}}}"


def topic_state(name: str) -> str:
    return f"sserelay:{{{name}}}:state"


def budget_account(key: str, start: float) -> str:
    return f"sserelay:{{budget:{key}:{int(start)}}}"


def budget_leases(key: str, start: float) -> str:
    return budget_account(key, start) + ":leases"


def rate_window(key: str) -> str:
    return f"sserelay:{{rate:{key}}}"


def instances(ledger: str) -> str:
    """The heartbeats of the instances that write to the ledger `ledger` (its display)."""
    return f"sserelay:{{instances:{hashlib.sha256(ledger.encode()).hexdigest()[:16]}}}"
