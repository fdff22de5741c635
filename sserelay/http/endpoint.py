"""One life cycle for every endpoint: the stream (`serve`), the mock (`serve --as`), the proxy.

An Endpoint bills each client (a stream, or a request) on its own row of the Meter, from the
moment it is let in to its end, and knows when the run is over:

- `interrupt()` (Ctrl-C, SIGTERM) completes `stop`, a future every open stream races against
  (relay_frames(stop=...)): each ends now, cleanly, billed exactly; no task is cancelled
  mid-write. From then on new requests are refused with 503, and once the last open one has
  ended the run is `finished`, with reason `interrupted`.
- `once` ends the run with the first billed request (its reason and error are the run's).
- A subclass says when else the run ends (`_ended`): the stream ends with its last client.

Refusals and errors are answered in the error shape of the API the request was for
(`api`, see providers/errors.py), plain text for the bare stream (`api` None).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.types import Scope, Send

from sserelay.http.access import Access, Keys, Refusal
from sserelay.http.asgi import header, peer, send_json, send_response
from sserelay.http.limits import RequestLimits
from sserelay.metering.bill import ClientBill, RequestFacts
from sserelay.metering.keys import Key
from sserelay.metering.meter import ClientMeter, Meter, is_valid_request_id
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import Tokenizer, tokenizer_for
from sserelay.providers.errors import error_body, stream_error_event
from sserelay.streaming.gate import BudgetGate

#: How a request ended: its reason and its error message, if any.
Outcome = tuple[Reason, "str | None"]
#: The most a run takes to end after a signal, with clients that do not read: an
#: interrupted stream gets this long to take its last bytes, then its connection is reset.
SHUTDOWN_GRACE = 2.0


class Endpoint:
    """The life cycle the stream, mock and proxy endpoints share (see the module docstring)."""

    def __init__(
        self,
        meter: Meter,
        *,
        access: Access | None = None,
        once: bool = False,
        keys: Keys | None = None,
    ) -> None:
        self.meter = meter
        self.access = access or Access()
        #: who may use the relay and how much, with keys (--keys, --auth-token)
        self.keys = keys
        #: the longest request body read (--max-body-bytes; a longer one is a 413)
        self.max_body = RequestLimits().body_bytes
        self.once = once
        self.finished = asyncio.Event()
        self.reason: Reason | None = None
        self.error: str | None = None
        #: Done once the run is stopping: every open stream ends now.
        self.stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Clients being served now.
        self.open = 0
        self._claimed = False

    @property
    def stopping(self) -> bool:
        return self.stop.done()

    @property
    def closed(self) -> bool:
        """Whether a new request is refused: shutting down, or (`once`) the one request taken."""
        return self.stopping or (self.once and self._claimed)

    def closed_message(self) -> str:
        if self.stopping:
            return "shutting down"
        return "already served its one request (--once)"

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: end every open stream now, then finish."""
        if not self.stop.done():
            self.stop.set_result(None)
        self._interrupted()
        if not self.open:
            self._finish(Reason.INTERRUPTED)

    def redact(self, text: str) -> str:
        """`text` with every secret the endpoint knows masked (a client's error, a receipt)."""
        return text

    def _interrupted(self) -> None:
        """What else a subclass stops on interrupt (the hub's reader)."""

    def _finish(self, reason: Reason, error: str | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.error = error
        self.finished.set()

    def refusal(self, scope: Scope) -> Refusal | None:
        """Why a new request is not served, if it is not: shutting down, its credentials,
        too many clients."""
        return self.identify(scope)[1]

    def identify(self, scope: Scope) -> tuple[Key | None, Refusal | None]:
        """The key a new request presents (None without keys) and why it is not served, if
        it is not: shutting down, its credentials, too many clients."""
        if self.closed:
            return None, Refusal(503, None, self.closed_message(), ((b"retry-after", b"1"),))
        key = None
        if self.keys is not None:
            found = self.keys.identify(scope)
            if isinstance(found, Refusal):
                return None, found
            key = found
        else:
            refused = self.access.authorize(scope)
            if refused is not None:
                return None, refused
        return key, self.access.over_capacity(self.open)

    def admit(self, key: Key | None, model: str | None) -> Refusal | None:
        """Why `key` may not start a request for `model` now (403, 429), if it may not."""
        if self.keys is None or key is None:
            return None
        return self.keys.admit(key, model)

    async def refuse(
        self,
        scope: Scope,
        send: Send,
        refusal: Refusal,
        api: str | None,
        *,
        request: RequestFacts | None = None,
        key: Key | None = None,
    ) -> None:
        """Answer `refusal` in `api`'s error shape; with keys, a refusal by the policy is a
        row of the bill (0 tokens, its reason), so the ledger keeps it too."""
        if self.keys is not None and self.keys.record_refusals and refusal.reason is not None:
            client = self.meter.open_client(
                peer(scope), request, key=None if key is None else key.name
            )
            self.meter.close(client, refusal.reason, refusal.message)
        headers = (*refusal.headers, *self.access.cors_headers)
        code = None if refusal.reason is None else str(refusal.reason)
        await answer_error(send, refusal.status, refusal.message, api, code=code, headers=headers)

    def budget_event(self, client: ClientMeter, api: str | None, *, sse: bool = True) -> bytes:
        """The error event that ends a client's stream when its key's budget is spent."""
        return stream_error_event(api, budget_message(client), "budget_exhausted", sse=sse)

    def gate(self, client: ClientMeter, api: str | None, *, sse: bool = True) -> BudgetGate | None:
        """The budget gate of a client whose key has a budget (None: nothing to check); its
        stream ends with an error event in `api`'s streaming shape (`sse` false: a line of
        NDJSON) saying that the budget is spent, or that its shared store is lost."""
        if client.allowance is None:
            return None
        price = self.meter.pricing.output_price(client.model)
        unavailable = stream_error_event(
            api, unavailable_message(client), "budget_unavailable", sse=sse
        )
        return BudgetGate(
            client.allowance,
            client,
            price_per_token=price,
            error_event=self.budget_event(client, api, sse=sse),
            unavailable_event=unavailable,
        )

    async def serve_client(
        self,
        scope: Scope,
        handle: Callable[[ClientMeter], Awaitable[Outcome]],
        *,
        request: RequestFacts | None = None,
        unforeseen: Outcome,
        key: Key | None = None,
    ) -> ClientBill:
        """Run `handle` for one client as a row of the bill. `unforeseen` is the outcome if
        something escapes `handle`: the client is still billed, and `once` still ends,
        rather than waiting for a request that is gone."""
        self._claimed = True
        given = header(scope, b"x-request-id")
        request_id = given if given is not None and is_valid_request_id(given) else None
        client = self.meter.open_client(
            peer(scope), request, request_id=request_id, key=None if key is None else key.name
        )
        if key is not None and self.keys is not None:
            client.allowance = self.keys.allowance(key)
        self.open += 1
        outcome = unforeseen
        try:
            outcome = await handle(client)
        except asyncio.CancelledError:
            outcome = Reason.INTERRUPTED, None  # the server's own last-resort cancel
            raise
        finally:
            self.open -= 1
            if client.allowance is not None:
                # The input is charged once reported (a cost budget may be passed by it,
                # which then stops the key's next request), and the stream's use settled.
                cost = self.meter.pricing.input_cost(client.upstream_usage, client.model)
                if cost:
                    client.allowance.charge_input(cost)
                client.allowance.close()
            reason, error = outcome
            bill = self.meter.close(client, reason, None if error is None else self.redact(error))
            self._ended(bill)
        return bill

    def _ended(self, bill: ClientBill) -> None:
        """A client has ended (and is closed on the meter): does the run end with it?"""
        if self.stopping:
            if not self.open:
                self._finish(Reason.INTERRUPTED)
        elif self.once:
            self._finish(bill.reason, bill.error)


async def resolve_tokenizer(name: str, model: str | None) -> tuple[Tokenizer, bool]:
    """The tokenizer of a request for `model` under `--tokenizer NAME` (see tokenizer_for);
    the first request that needs a vocabulary loads it in a thread, off the event loop."""
    try:
        return tokenizer_for(name, model, load=False)
    except LookupError:
        return await asyncio.to_thread(tokenizer_for, name, model)


def budget_message(client: ClientMeter) -> str:
    """Why a client's stream was cut, naming its key and budget (one line, no secret)."""
    allowance = client.allowance
    if allowance is None:
        return "budget exhausted"
    key = allowance.key
    budgets = []
    if key.budget_tokens is not None:
        budgets.append(f"{key.budget_tokens} tokens")
    if key.budget_cost is not None:
        budgets.append(f"a cost of {key.budget_cost:g}")
    period = "" if key.period.value == "total" else f" {key.period.value}"
    # Not "has spent it": a stream is also cut when what is left is less than its next event.
    return (
        f"budget exhausted: the next event would take key {key.name!r} past its{period} "
        f"budget of {' and '.join(budgets) or 'tokens'}"
    )


def unavailable_message(client: ClientMeter) -> str:
    """Why a client's stream was cut while the shared budget store (Redis) is lost."""
    name = "" if client.allowance is None else f"key {client.allowance.key.name!r}: "
    return (
        f"budget unavailable: {name}the shared budget store is unreachable and this stream "
        "has used what was reserved for it; retry later"
    )


def request_id_header(client: ClientMeter) -> tuple[bytes, bytes]:
    """`x-request-id`: the id of the client's row in the bill and the ledger."""
    return (b"x-request-id", client.request_id.encode())


async def answer_error(
    send: Send,
    status: int,
    message: str,
    api: str | None,
    *,
    code: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """An error response in `api`'s shape (its SDK then says why), or plain text (`api`
    None: the bare stream, curl, a browser)."""
    if api is None:
        body = f"sserelay: {message}\n".encode()
        await send_response(send, status, body, b"text/plain; charset=utf-8", headers)
        return
    await send_json(
        send, status, error_body(api, f"sserelay: {message}", status=status, code=code), headers
    )
