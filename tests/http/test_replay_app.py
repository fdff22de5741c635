"""`serve CASSETTE --as recorded` (sserelay.http.replay_app) and `--as PROVIDER` over a cassette,
in process with real sockets: recorded statuses, headers and bytes, cut answers cut again,
recorded timing, and errors in the shape of the API a request was for."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import sserelay
from sserelay import MockConfig, Reason, RunResult
from sserelay.http.run import Running
from sserelay.record.format import Block, Chunk, Exchange, Part, body_sha256, end_line, file_line
from tests.conftest import run_bounded

SSE = (("content-type", "text/event-stream"), ("x-request-id", "req_1"))
JSON = (("content-type", "application/json"),)
#: Timing tolerance on a loaded 2-core machine (measured replays are within a few ms).
TOLERANCE_S = 0.050


def write_cassette(path: Path, *exchanges: tuple[Exchange, list[Part], str | None]) -> Path:
    """A cassette of `exchanges`: each with its parts and its end (None: none recorded)."""
    text = file_line()
    for exchange, parts, end in exchanges:
        text += exchange.opening_line() + "".join(part.line(exchange.number) for part in parts)
        if end is not None:
            last = parts[-1].t if parts else 0.0
            text += end_line(exchange.number, last + 0.01, end)
    path.write_text(text)
    return path


def chat(number: int, body: bytes = b"{}", path: str = "/v1/chat/completions") -> Exchange:
    return Exchange(number, "POST", path, body_sha256(body), 200, SSE)


def chunk(text: str) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})


async def started(config: MockConfig) -> tuple[Running, asyncio.Task[RunResult]]:
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        sserelay.run(config, on_ready=ready.set_result, handle_signals=False)
    )
    waits: list[asyncio.Future[Any]] = [ready, task]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    return ready.result(), task


def replaying(path: Path, **options: Any) -> MockConfig:
    return MockConfig(source=str(path), port=0, provider="recorded", **options)


def test_each_request_gets_its_recorded_status_headers_and_bytes(tmp_path: Path) -> None:
    refused = Exchange(2, "POST", "/v1/messages", body_sha256(b'{"a": 1}'), 401, JSON)
    error = b'{"type": "error", "error": {"type": "authentication_error", "message": "no"}}'
    cassette = write_cassette(
        tmp_path / "c.jsonl",
        (chat(1), [Block(0.0, chunk("Hi")), Block(0.0, chunk(" there")), Block(0.1, "[DONE]")],
         "complete"),
        (refused, [Chunk(0.0, error)], "complete"),
    )  # fmt: skip

    async def scenario() -> tuple[list[httpx.Response], RunResult]:
        running, task = await started(replaying(cassette))
        async with httpx.AsyncClient(base_url=running.url) as client:
            responses = [
                await client.post("v1/messages", content=b'{"a":1}'),
                await client.post("v1/chat/completions", json={}),
                await client.post("v1/messages", json={"other": True}),  # nothing left
                await client.get("healthz"),
            ]
        running.stop()
        return responses, await asyncio.wait_for(task, 5)

    (refusal, stream, unmatched, health), result = run_bounded(scenario())
    assert (refusal.status_code, refusal.content) == (401, error)
    assert stream.status_code == 200 and stream.headers["x-request-id"] == "req_1"
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.text == f"data: {chunk('Hi')}\n\ndata: {chunk(' there')}\n\ndata: [DONE]\n\n"
    assert unmatched.status_code == 404
    digest = body_sha256(b'{"other": true}')
    assert unmatched.json() == {  # in the shape of the API the path is for: Anthropic's
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": f"sserelay: no recorded exchange for POST /v1/messages (body sha256 "
            f"{digest})",
        },
    }
    assert health.text == "ok\n"
    rows = [
        (c.request.status if c.request else None, c.reason, c.tokens) for c in result.bill.clients
    ]
    assert rows == [(401, Reason.COMPLETE, 0), (200, Reason.COMPLETE, 2)]
    assert [c.events for c in result.bill.clients] == [0, 3]


@pytest.mark.parametrize("end", ["cut", None])
def test_an_answer_cut_when_it_was_recorded_is_cut_again(tmp_path: Path, end: str | None) -> None:
    parts: list[Part] = [Block(0.0, chunk("half")), Block(0.01, chunk(" an answer"))]
    cassette = write_cassette(tmp_path / "c.jsonl", (chat(1), parts, end))

    async def scenario() -> tuple[bytes, BaseException | None, RunResult]:
        running, task = await started(replaying(cassette, once=True))
        got = b""
        error: BaseException | None = None
        async with httpx.AsyncClient() as client:
            try:
                async with client.stream("POST", running.url + "v1/chat/completions") as response:
                    async for data in response.aiter_raw():
                        got += data
            except httpx.HTTPError as exc:
                error = exc
        return got, error, await asyncio.wait_for(task, 5)

    got, error, result = run_bounded(scenario())
    assert got == b"".join(part.wire() for part in parts)
    assert isinstance(error, httpx.RemoteProtocolError)  # the chunked body never ended
    assert result.reason == Reason.UPSTREAM_ERROR
    assert result.error == "recorded exchange 1 was cut short"


def test_realtime_replays_each_write_at_its_recorded_time(tmp_path: Path) -> None:
    times = [0.05, 0.25, 0.30, 0.55]
    parts: list[Part] = [Block(t, chunk(str(t))) for t in times]
    cassette = write_cassette(tmp_path / "c.jsonl", (chat(1), parts, "complete"))

    async def scenario() -> tuple[list[float], float]:
        running, task = await started(replaying(cassette, realtime=True, once=True))
        arrivals = []
        async with httpx.AsyncClient() as client:
            start = time.monotonic()
            async with client.stream("POST", running.url + "v1/chat/completions") as response:
                async for _ in response.aiter_raw():
                    arrivals.append(time.monotonic() - start)
            ended = time.monotonic() - start
        await asyncio.wait_for(task, 5)
        return arrivals, ended

    arrivals, ended = run_bounded(scenario())
    assert len(arrivals) == len(times)
    errors = [abs(a - t) for a, t in zip(arrivals, times, strict=True)]
    assert max(errors) <= TOLERANCE_S, arrivals
    print(f"replay timing error: max {max(errors) * 1000:.1f} ms over {len(errors)} writes")
    # The recorded answer stayed open 10 ms after its last write: so did this one.
    assert ended >= times[-1] + 0.01


def test_the_mock_gives_a_recorded_error_back_in_its_provider_s_shape(tmp_path: Path) -> None:
    limited = Exchange(1, "POST", "/v1/chat/completions", None, 429, JSON)
    error = b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}'
    cassette = write_cassette(
        tmp_path / "c.jsonl",
        (limited, [Chunk(0.0, error)], "complete"),
        (chat(2), [Block(0.0, chunk("fine")), Block(0.0, "[DONE]")], "complete"),
    )

    async def scenario() -> list[httpx.Response]:
        running, task = await started(MockConfig(source=str(cassette), port=0, provider="openai"))
        asked = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=running.url) as client:
            responses = [await client.post("v1/chat/completions", json=asked) for _ in range(3)]
        running.stop()
        await asyncio.wait_for(task, 5)
        return responses

    limited_answer, answer, unmatched = run_bounded(scenario())
    assert limited_answer.status_code == 429
    assert limited_answer.json()["error"]["message"] == "slow down"
    assert limited_answer.json()["error"]["type"] == "rate_limit_error"
    assert answer.json()["choices"][0]["message"]["content"] == "fine"
    assert unmatched.status_code == 404
    assert unmatched.json()["error"]["code"] == "no_recorded_exchange"
