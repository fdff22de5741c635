"""The proxy's express lane (http/proxy_express.py `express_lane`, streaming/stream.py ExpressLane):
an upstream read of whole canonical events is written and billed in the upstream
connection's callback. It must bill and deliver exactly what the pump's way does.
Real sockets: a mock upstream and the proxy, both in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from sserelay import MockConfig, ProxyConfig, RunResult
from sserelay.http import proxy_app
from sserelay.streaming.stream import ExpressLane
from sserelay.wire.frames import Frames
from tests.conftest import run_bounded
from tests.http.test_monitor import chat, stop
from tests.http.test_run import started

TEXT = "one two, three\nfour  five six\n\nseven 12345678901234567 eight\nnine ten\n" * 3


def relayed(text_file: Path, tokenizer: str) -> tuple[list[str], RunResult]:
    """Two streamed answers through the proxy: what the client read, and the proxy's bill."""

    async def scenario() -> tuple[list[str], RunResult]:
        upstream, upstream_task = await started(MockConfig(source=str(text_file), port=0, rate=200))
        proxy, proxy_task = await started(
            ProxyConfig(upstream=upstream.url + "v1", port=0, tokenizer=tokenizer)
        )
        bodies = []
        async with httpx.AsyncClient() as client:
            for model in ("gpt-4o", "gpt-4o-mini"):
                response = await client.post(proxy.url + "chat/completions", json=chat(model))
                bodies.append(response.text)
        result = await stop(proxy, proxy_task)
        await stop(upstream, upstream_task)
        return bodies, result

    return run_bounded(scenario())


@pytest.mark.parametrize("tokenizer", ["whitespace", "auto"])
def test_the_express_lane_bills_and_delivers_as_the_pump_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: str
) -> None:
    text_file = tmp_path / "answer.txt"
    text_file.write_text(TEXT)
    express_writes = 0
    write = ExpressLane.write

    def counted(lane: ExpressLane, item: Frames) -> None:
        nonlocal express_writes
        express_writes += 1
        write(lane, item)

    monkeypatch.setattr(ExpressLane, "write", counted)
    express_bodies, express = relayed(text_file, tokenizer)
    assert express_writes > 10  # the answers went the express way (all but what raced it)

    monkeypatch.setattr(proxy_app, "express_lane", lambda *args: None)
    pump_bodies, pump = relayed(text_file, tokenizer)

    def rows(result: RunResult) -> list[tuple[Any, ...]]:
        return [(c.tokens, c.events, c.bytes, c.reason) for c in result.bill.clients]

    assert [len(b) for b in express_bodies] == [len(b) for b in pump_bodies]
    assert [b.count("data: ") for b in express_bodies] == [b.count("data: ") for b in pump_bodies]
    assert rows(express) == rows(pump)
    assert express.bill.tokens == pump.bill.tokens > 0
