"""`sserelay.run(config)`: a relay embedded in Python, no click, real sockets.

Also the house rule that a run closes what it opens: file descriptors are counted in
/proc/self/fd before and after many runs and requests.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

import sserelay
from sserelay import MockConfig, ProxyConfig, Reason, RunResult, ServeConfig
from sserelay.errors import ConfigError, ListenError, SourceError
from sserelay.http.run import Running
from sserelay.metering.bill import ClientBill
from sserelay.metering.meter import MeterObserver
from tests.conftest import run_bounded

FD_DIR = Path("/proc/self/fd")


def open_fds() -> int:
    return len(os.listdir(FD_DIR))


async def started(
    config: sserelay.ServeConfig | sserelay.MockConfig | sserelay.ProxyConfig,
    **kwargs: Any,
) -> tuple[Running, asyncio.Task[RunResult]]:
    """Start `run(config)` in this loop; return once it listens."""
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        sserelay.run(config, on_ready=ready.set_result, handle_signals=False, **kwargs)
    )
    waits: list[asyncio.Future[Any]] = [ready, task]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what stopped it
    return ready.result(), task


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "answer.txt"
    path.write_text("one two\nthree\nfour five six\n")
    return path


def test_a_serve_runs_in_process_and_returns_its_bill(text_file: Path) -> None:
    class Seen(MeterObserver):
        def __init__(self) -> None:
            self.bills: list[ClientBill] = []

        def closed(self, bill: ClientBill) -> None:
            self.bills.append(bill)

    seen = Seen()

    async def scenario() -> RunResult:
        running, task = await started(ServeConfig(source=str(text_file), port=0), observers=[seen])
        async with httpx.AsyncClient() as client:
            response = await client.get(running.url)
        assert response.text.count("data: ") == 3
        return await asyncio.wait_for(task, 10)

    result = run_bounded(scenario())
    assert result.reason == Reason.COMPLETE and result.error is None and result.signal is None
    assert (result.bill.tokens, result.bill.events) == (6, 3)
    assert [bill.tokens for bill in seen.bills] == [6]


def test_stop_ends_a_run_as_ctrl_c_does(text_file: Path) -> None:
    async def scenario() -> RunResult:
        running, task = await started(ServeConfig(source=str(text_file), port=0, keep=True))
        async with httpx.AsyncClient() as client:
            await client.get(running.url)
        running.stop()
        return await asyncio.wait_for(task, 10)

    result = run_bounded(scenario())
    assert result.reason == "interrupted"
    assert [c.reason for c in result.bill.clients] == ["complete"]


def test_errors_before_listening_are_raised(tmp_path: Path, text_file: Path) -> None:
    with pytest.raises(SourceError, match="cannot open"):
        run_bounded(started(ServeConfig(source=str(tmp_path / "missing.txt"), port=0)))
    with pytest.raises(ConfigError) as caught:
        run_bounded(started(ProxyConfig(upstream="ftp://example.org/", port=0)))
    assert caught.value.field == "upstream"
    with pytest.raises(ListenError):
        run_bounded(started(ServeConfig(source=str(text_file), host="192.0.2.1", port=0)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"price": float("nan")}, "price"),
        ({"price": float("inf")}, "price"),
        ({"price": 1e308}, "price"),
        ({"heartbeat": float("nan")}, "heartbeat"),
        ({"rate": float("nan")}, "rate"),
        ({"delay": float("inf")}, "delay"),
        ({"port": 70000}, "port"),
        ({"max_lag": 5, "history": 10}, "max_lag"),
        ({"chunk": "para"}, "chunk"),
    ],
)
def test_configs_validate_themselves(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServeConfig(**kwargs)
    assert caught.value.field == field


@pytest.mark.parametrize("name", ["connect_timeout", "read_timeout"])
def test_proxy_timeouts_must_be_finite(name: str) -> None:
    settings: dict[str, Any] = {name: float("nan")}
    with pytest.raises(ConfigError) as caught:
        ProxyConfig(upstream="http://127.0.0.1:9/", **settings)
    assert caught.value.field == name


def test_many_serves_of_one_file_leave_no_descriptor_open(text_file: Path) -> None:
    async def one() -> None:
        running, task = await started(ServeConfig(source=str(text_file), port=0))
        async with httpx.AsyncClient() as client:
            await client.get(running.url)
        await asyncio.wait_for(task, 10)

    run_bounded(one())  # the first run imports and warms what later ones reuse
    before = open_fds()
    for _ in range(20):
        run_bounded(one())
    assert open_fds() == before


def test_many_mock_requests_leave_no_descriptor_open(text_file: Path) -> None:
    async def scenario() -> tuple[int, int]:
        running, task = await started(MockConfig(source=str(text_file), port=0))
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        url = running.url + "v1/chat/completions"
        async with httpx.AsyncClient() as client:
            await client.post(url, json=body)
            before = open_fds()
            for _ in range(20):
                response = await client.post(url, json=body)
                assert "[DONE]" in response.text
            after = open_fds()
        running.stop()
        await asyncio.wait_for(task, 10)
        return before, after

    before, after = run_bounded(scenario())
    assert after == before
