"""Who may use an endpoint, and from which pages: the token, the client cap, CORS.

One `Access` serves the stream, the mock and the proxy alike. A client presents its secret
the way its SDK does: `Authorization: Bearer …` (OpenAI and most), `x-api-key` (Anthropic),
`x-goog-api-key` or `?key=` (Gemini), `?token=` (a browser's EventSource, which cannot send
headers). It is compared in constant time, and never forwarded anywhere.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from starlette.types import Scope

from sserelay.http.asgi import header_values, query_values
from sserelay.metering.budget import Allowance, Budgets
from sserelay.metering.keys import Key, KeyRing
from sserelay.metering.reason import Reason

#: Headers that may carry a client's secret, as SDKs send them (lower case).
SECRET_HEADERS = (b"authorization", b"x-api-key", b"x-goog-api-key")
#: Query parameters that may carry it (an EventSource cannot send headers).
SECRET_PARAMS = ("token", "key")
#: Retry-After (seconds) of a request refused while the shared budget store is unreachable.
UNREACHABLE_RETRY = 2


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not served: its HTTP status, its bill reason (None for a refusal
    that bills nothing, such as a full house), a one-line message, and headers to send
    (`WWW-Authenticate`, `Retry-After`)."""

    status: int
    reason: Reason | None
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


class AmbiguousCredentials(ValueError):
    """The request carries two different secrets (or one header twice): refused, never
    guessed at, so a proxy in between cannot smuggle a second identity."""


def presented_secret(scope: Scope) -> str | None:
    """The secret a request presents, if any; AmbiguousCredentials if it presents two."""
    found: list[str] = []
    for name in SECRET_HEADERS:
        values = header_values(scope, name)
        if len(values) > 1:
            raise AmbiguousCredentials(f"the request has {len(values)} {name.decode()} headers")
        if values:
            value = values[0].strip()
            if name == b"authorization":
                scheme, _, value = value.partition(" ")
                # RFC 7235 §2.1: the scheme is case-insensitive; only Bearer carries a secret.
                if scheme.lower() != "bearer":
                    continue
                value = value.strip()
            if value:
                found.append(value)
    for param in SECRET_PARAMS:
        given = query_values(scope, param)
        if len(given) > 1:
            raise AmbiguousCredentials(f"the request has {len(given)} {param} parameters")
        if given and given[0]:
            found.append(given[0])
    if len(set(found)) > 1:
        raise AmbiguousCredentials("the request presents two different credentials")
    return found[0] if found else None


class Keys:
    """Who may use a relay and how much (`--keys`, and `--auth-token` as one anonymous key
    without limits): the key a request presents, and its budgets and rate limits.

    `record_refusals`: a request refused by the policy (unknown key, a model the key may
    not use, a spent budget, a rate limit) is a row of the bill and the ledger, with 0
    tokens and its reason; true with a keys file."""

    def __init__(self, ring: KeyRing, budgets: Budgets, *, record_refusals: bool) -> None:
        self.ring = ring
        self.budgets = budgets
        self.record_refusals = record_refusals

    def identify(self, scope: Scope) -> Key | Refusal:
        """The key the request presents, or why it is refused (401, or 400 for two; 503,
        billing nothing, for a key with a budget or rate limit while their shared store is
        unreachable: budgets fail closed, and waiting helps)."""
        try:
            given = presented_secret(scope)
        except AmbiguousCredentials as exc:
            return Refusal(400, Reason.UNAUTHORIZED, f"bad request: {exc}")
        key = None if given is None else self.ring.find(given)
        if key is None:
            what = "no key" if given is None else "an unknown key"
            return Refusal(
                401,
                Reason.UNAUTHORIZED,
                f"unauthorized: the request presents {what} (send Authorization: Bearer "
                "KEY, x-api-key: KEY, or ?token=KEY)",
                ((b"www-authenticate", b"Bearer"),),
            )
        if key.limited and not self.budgets.store.reachable:
            return Refusal(
                503,
                None,
                f"key {key.name!r} has a budget or a rate limit and the shared budget store "
                "is unreachable; retry later",
                ((b"retry-after", str(UNREACHABLE_RETRY).encode()),),
            )
        return key

    def admit(self, key: Key, model: str | None) -> Refusal | None:
        """None if `key` may start a request for `model` now, else why not (403, 429)."""
        admission = self.budgets.admit(key, model, time.time())
        if admission.ok:
            return None
        headers: tuple[tuple[bytes, bytes], ...] = ()
        if admission.retry_after is not None:
            headers = ((b"retry-after", str(admission.retry_after).encode()),)
        reason = Reason(str(admission.reason))
        return Refusal(admission.status, reason, admission.message, headers)

    def allowance(self, key: Key) -> Allowance | None:
        """The budget one stream of `key` takes from (None: the key has no budget)."""
        if key.budget_tokens is None and key.budget_cost is None and not key.tokens_per_minute:
            return None
        return self.budgets.allowance(key, time.time())


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use an endpoint. `token`: clients must present it (else 401); `max_clients`:
    more at once get 503; `cors_origin`: the origin (or `*`) whose pages may call it."""

    token: str | None = None
    max_clients: int | None = None
    cors_origin: str | None = None

    def authorize(self, scope: Scope) -> Refusal | None:
        """None if the request may go on, else why not."""
        if self.token is None:
            return None
        try:
            given = presented_secret(scope)
        except AmbiguousCredentials as exc:
            return Refusal(400, Reason.UNAUTHORIZED, f"bad request: {exc}")
        # Compared in constant time: the token is a secret.
        if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        return Refusal(
            401,
            Reason.UNAUTHORIZED,
            "unauthorized: send Authorization: Bearer TOKEN (or ?token=TOKEN)",
            ((b"www-authenticate", b"Bearer"),),
        )

    def over_capacity(self, open_clients: int) -> Refusal | None:
        if self.max_clients is not None and open_clients >= self.max_clients:
            return Refusal(503, None, f"too many clients (at most {self.max_clients})")
        return None

    @property
    def cors_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """What every response carries for a cross-origin page."""
        if not self.cors_origin:
            return ()
        headers = [(b"access-control-allow-origin", self.cors_origin.encode("latin-1"))]
        if self.cors_origin != "*":
            headers.append((b"vary", b"Origin"))
        return tuple(headers)

    def preflight_headers(self, methods: str) -> list[tuple[bytes, bytes]]:
        """The answer to a CORS preflight (OPTIONS) for a route that takes `methods`."""
        if not self.cors_origin:
            return [(b"allow", f"{methods}, OPTIONS".encode())]
        return [
            *self.cors_headers,
            (b"access-control-allow-methods", methods.encode()),
            (
                b"access-control-allow-headers",
                b"Authorization, Content-Type, Last-Event-ID, Cache-Control, X-Api-Key, "
                b"X-Goog-Api-Key, Anthropic-Version, Anthropic-Beta, X-Request-Id, "
                b"OpenAI-Organization, OpenAI-Project, X-Stainless-Lang, "
                b"X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, "
                b"X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count, "
                b"X-Stainless-Timeout, Anthropic-Dangerous-Direct-Browser-Access",
            ),
            (b"access-control-expose-headers", b"X-Request-Id, Retry-After"),
            (b"access-control-max-age", b"600"),
        ]
