"""The answers of budgets (pure): may a request start (`Admission`, and its `Refusal`
reason, the bill's and the ledger's), what a key may still spend (`Remaining`), and one row
of `sserelay keys status` (`KeyStatus`). The policy that gives them is in budget.py."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from sserelay.metering.keys import Key, Period


class Refusal(StrEnum):
    """Why a request was refused; the values are the bill's and the ledger's reasons."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BUDGET_EXHAUSTED = "budget_exhausted"
    RATE_LIMITED = "rate_limited"


_STATUS = {
    Refusal.UNAUTHORIZED: 401,
    Refusal.FORBIDDEN: 403,
    Refusal.BUDGET_EXHAUSTED: 429,
    Refusal.RATE_LIMITED: 429,
}


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to "may this request start?": `ok`, or a `reason` with what to tell the client.

    `status` is the HTTP status (200 when ok). `retry_after` is whole seconds for a
    `Retry-After` header, at least 1; None when waiting will not help (401, 403, or a "total"
    budget that is spent). `message` is one line that names the key and says why.
    """

    key: Key | None
    reason: Refusal | None = None
    retry_after: int | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def status(self) -> int:
        return 200 if self.reason is None else _STATUS[self.reason]


class Remaining(NamedTuple):
    """What a key may still spend this period; None in a dimension it does not cap. Never < 0."""

    tokens: int | None
    cost: float | None


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One row of `sserelay keys status` (and the figures behind `/metrics`)."""

    name: str
    period: Period
    budget_tokens: int | None
    budget_cost: float | None
    spent_tokens: int
    spent_cost: float
    remaining_tokens: int | None
    remaining_cost: float | None
    resets_at: float | None
    tokens_per_minute: int | None
    tokens_last_minute: int | None
