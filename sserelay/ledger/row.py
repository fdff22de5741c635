"""`UsageRow`: one billed unit (a `serve` client stream, a proxied or mocked request).

Pure: no I/O. A row is validated once, when it is made, so every backend stores the same
shapes and a row read back compares equal to the row written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sserelay.metering.meter import MAX_REQUEST_ID

#: `usage_source`: the upstream reported the usage, or sserelay counted it itself.
USAGE_SOURCES = ("reported", "metered")


def format_timestamp(moment: datetime) -> str:
    """`2026-11-27T18:54:33.123456Z`: UTC, always six fractional digits, so that the text
    sorts as the instants do (SQLite and JSON Lines compare these strings)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # isoformat is twice as quick as strftime, and pads the year to four digits
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def parse_timestamp(text: str) -> datetime:
    """The aware UTC datetime of an ISO 8601 text that carries an offset (`Z` or `+hh:mm`).

    Raises ValueError for a text without an offset: a naive time is ambiguous in a ledger."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a UTC offset: {text!r}")
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRow:
    """What one request was billed, as a ledger stores it.

    Open while `ended_at` and `reason` are None (both are set together when it ends).
    Text that no backend could store (NUL, lone surrogates) is replaced by U+FFFD, so a
    hostile client's model name cannot stop the ledger; a request id must be printable.
    `input_tokens`, `output_tokens` and `cached_tokens` are what the upstream *reported*:
    None when it reported nothing, never 0 for "unknown". `cost` is None when unpriced.
    Datetimes must be aware; they are kept in UTC.
    """

    id: str
    instance: str
    started_at: datetime
    first_token_at: datetime | None = None
    ended_at: datetime | None = None
    client: str
    key: str | None = None
    method: str
    path: str
    model: str | None = None
    status: int | None = None
    reason: str | None = None
    tokens: int = 0
    events: int = 0
    bytes: int = 0
    tokenizer: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    usage_source: str = "metered"
    cost: float | None = None
    last_event_id: str | None = None

    def __post_init__(self) -> None:
        # What the relay takes from a client is ASCII (metering.is_valid_request_id); a row
        # read back from any ledger may hold any printable text.
        if not 0 < len(self.id) <= MAX_REQUEST_ID or not self.id.isprintable():
            raise ValueError(f"request id must be 1-{MAX_REQUEST_ID} printable characters")
        if not self.instance:
            raise ValueError("instance must not be empty")
        for name in ("started_at", "first_token_at", "ended_at"):
            moment = getattr(self, name)
            if moment is None:
                continue
            if not isinstance(moment, datetime) or moment.tzinfo is None:
                raise ValueError(f"{name} must be an aware datetime, not {moment!r}")
            # frozen: normalising to UTC here is the one write a row ever takes
            object.__setattr__(self, name, moment.astimezone(UTC))
        for name in ("client", "method", "path", "tokenizer", "instance"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            if not value.isascii() or "\0" in value:
                object.__setattr__(self, name, storable_text(value))
        for name in ("key", "model", "reason", "last_event_id"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string or None")
                if not value.isascii() or "\0" in value:
                    object.__setattr__(self, name, storable_text(value))
        for name in ("tokens", "events", "bytes"):
            _check_count(name, getattr(self, name))
        for name in ("input_tokens", "output_tokens", "cached_tokens"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.status is not None:
            _check_count("status", self.status)
            if not 100 <= self.status <= 999:
                raise ValueError(f"status must be an HTTP status, not {self.status}")
        if self.usage_source not in USAGE_SOURCES:
            raise ValueError(f"usage_source must be one of {USAGE_SOURCES}")
        if self.cost is not None:
            if isinstance(self.cost, bool) or not isinstance(self.cost, int | float):
                raise ValueError("cost must be a number or None")
            if not math.isfinite(self.cost) or self.cost < 0:
                raise ValueError(f"cost must be finite and not negative, not {self.cost}")
            object.__setattr__(self, "cost", float(self.cost))
        if (self.ended_at is None) != (self.reason is None):
            raise ValueError("ended_at and reason are set together, when the row ends")

    @property
    def is_open(self) -> bool:
        """True while the request has not ended (no `reason` yet)."""
        return self.reason is None

    @property
    def row_key(self) -> tuple[str, str, datetime]:
        """What identifies a row in every backend: (instance, id, started_at).

        `id` alone is not unique: a client may send its own `x-request-id` (and reuse it,
        on a retry or on purpose), and instances share a ledger."""
        return (self.instance, self.id, self.started_at)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every column, in column order, times as ISO 8601 UTC."""
        document: dict[str, Any] = {}
        for column in COLUMNS:
            value = getattr(self, column)
            document[column] = format_timestamp(value) if isinstance(value, datetime) else value
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> UsageRow:
        """The row `to_json()` gave. Raises ValueError on a missing or unknown column or a
        value of the wrong type, naming it."""
        missing = [column for column in COLUMNS if column not in document]
        unknown = sorted(set(document) - set(COLUMNS))
        if missing or unknown:
            raise ValueError(f"usage row: missing {missing}, unknown {unknown}")
        values = dict(document)
        for column in TIMESTAMP_COLUMNS:
            text = values[column]
            if text is not None:
                if not isinstance(text, str):
                    raise ValueError(f"{column} must be an ISO 8601 text")
                values[column] = parse_timestamp(text)
        return cls(**values)


_SURROGATE = re.compile("[\ud800-\udfff]")

#: The largest count a row holds: a signed 64-bit integer, what SQLite and PostgreSQL store.
MAX_COUNT = 2**63 - 1


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be a whole number from 0 to 2**63-1, not {value!r}")


def storable_text(text: str) -> str:
    """`text` with what no backend can store replaced by U+FFFD: NUL (PostgreSQL's text
    refuses it) and lone surrogates (not UTF-8 at all). A client's model name or path is
    hostile input; one bad row must never stop a ledger from writing the others."""
    if "\0" in text:
        text = text.replace("\0", "\ufffd")
    return _SURROGATE.sub("\ufffd", text)


#: The columns, in order: the user-facing names of `sserelay usage --json` and of the tables.
COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(UsageRow))
TIMESTAMP_COLUMNS = ("started_at", "first_token_at", "ended_at")
INTEGER_COLUMNS = (
    "status",
    "tokens",
    "events",
    "bytes",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
)
