"""`/metrics`, `/usage` and the dashboard's feed of a run, in process, over real sockets.

Every figure a scrape shows is checked against the bill of the same workload; the scrape is
parsed with prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sserelay import MockConfig, ProxyConfig, ServeConfig
from sserelay.http.metrics import RunCollector, new_registry
from sserelay.http.monitor import admin_refusal, is_loopback
from sserelay.http.run import Running, RunResult
from sserelay.metering.bill import RequestFacts
from sserelay.metering.budget import Budgets
from sserelay.metering.keys import Key, KeyRing, secret_digest
from sserelay.metering.meter import Meter
from sserelay.metering.tally import Tally
from sserelay.wire.sse import SSEDecoder
from tests.conftest import run_bounded
from tests.http.test_run import started


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "answer.txt"
    path.write_text("one two\nthree\nfour five six\n")
    return path


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        s.value
        for s in found
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def chat(model: str, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def stop(running: Running, task: asyncio.Task[RunResult]) -> RunResult:
    running.stop()
    return await asyncio.wait_for(task, 10)


def test_a_scrape_after_a_known_workload_equals_the_bill(text_file: Path) -> None:
    async def scenario() -> tuple[str, dict[str, Any], RunResult]:
        config = MockConfig(source=str(text_file), port=0, price=2.5)
        running, task = await started(config)
        url = running.url + "v1/chat/completions"
        async with httpx.AsyncClient() as client:
            for model, stream in [("gpt-a", True), ("gpt-a", False), ("gpt-b", True)]:
                response = await client.post(url, json=chat(model, stream))
                assert response.status_code == 200
            # A client that leaves mid-stream is billed what it got, and so is its series.
            await client.get(running.url + "healthz")
            scrape = await client.get(running.url + "metrics")
            usage = (await client.get(running.url + "usage")).json()
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
        return scrape.text, usage, await stop(running, task)

    text, usage, result = run_bounded(scenario())
    bill = result.bill
    found = samples(text)
    assert total(found, "sserelay_tokens_total", kind="output", source="metered") == bill.tokens
    for model, figures in bill.by_model.items():
        tokens = total(found, "sserelay_tokens_total", model=model, source="metered")
        assert tokens == figures["tokens"]
        assert total(found, "sserelay_requests_total", model=model) == figures["requests"]
        assert total(found, "sserelay_events_total", model=model) == figures["events"]
        assert total(found, "sserelay_bytes_total", model=model) == figures["bytes"]
        assert total(found, "sserelay_cost_total", model=model) == pytest.approx(figures["cost"])
    assert total(found, "sserelay_requests_total", reason="complete", status="200") == 3
    # The mock reports usage as the API does: input and output, as reported.
    reported = sum(c.upstream_usage.output_tokens or 0 for c in bill.clients if c.upstream_usage)
    assert total(found, "sserelay_tokens_total", kind="output", source="reported") == reported
    assert total(found, "sserelay_time_to_first_token_seconds_count") == 3
    assert total(found, "sserelay_stream_duration_seconds_count") == 3
    assert total(found, "sserelay_clients") == 0
    assert total(found, "sserelay_info", mode="mock", tokenizer="whitespace") == 1
    assert total(found, "process_open_fds") > 0

    assert usage["totals"]["tokens"] == bill.tokens and usage["totals"]["requests"] == 3
    assert usage["totals"]["cost"] == pytest.approx(bill.cost)
    assert {m: f["tokens"] for m, f in usage["by_model"].items()} == {
        m: f["tokens"] for m, f in bill.by_model.items()
    }
    assert usage["by_reason"] == {"complete": 3} and usage["spend"] is None
    assert usage["mode"] == "mock" and usage["by_key"] == {}


def test_a_proxy_answers_metrics_and_usage_itself_and_times_the_upstream_close(
    text_file: Path,
) -> None:
    async def scenario() -> tuple[str, RunResult]:
        upstream, upstream_task = await started(MockConfig(source=str(text_file), port=0, rate=20))
        proxy, proxy_task = await started(ProxyConfig(upstream=upstream.url + "v1", port=0))
        async with httpx.AsyncClient() as client:
            async with client.stream(
                "POST", proxy.url + "chat/completions", json=chat("m")
            ) as response:
                async for line in response.aiter_lines():
                    if "three" in line:
                        break  # gone mid-stream: the proxy closes its upstream
            for path in ("metrics", "usage", "ui", "ui/events"):
                head = await client.head(proxy.url + path)
                assert head.status_code == 200, path
            metrics = ""
            for _ in range(100):  # the close is timed once the request has ended
                metrics = (await client.get(proxy.url + "metrics")).text
                if "sserelay_upstream_close_after_disconnect_seconds_count 1.0" in metrics:
                    break
                await asyncio.sleep(0.02)
        result = await stop(proxy, proxy_task)
        upstream_result = await stop(upstream, upstream_task)
        # The upstream saw the completion request and nothing else.
        assert [c.request.path for c in upstream_result.bill.clients if c.request] == [
            "/v1/chat/completions"
        ]
        return metrics, result

    text, result = run_bounded(scenario())
    found = samples(text)
    (client,) = result.bill.clients
    assert client.reason == "client_disconnected"
    assert total(found, "sserelay_upstream_close_after_disconnect_seconds_count") == 1
    assert total(found, "sserelay_upstream_close_after_disconnect_seconds_sum") < 0.5
    assert total(found, "sserelay_requests_total", reason="client_disconnected") == 1
    assert total(found, "sserelay_tokens_total", source="metered") == client.tokens


def test_two_runs_in_one_process_keep_their_own_series(text_file: Path) -> None:
    async def scenario() -> tuple[float, float]:
        one, one_task = await started(MockConfig(source=str(text_file), port=0))
        two, two_task = await started(MockConfig(source=str(text_file), port=0))
        async with httpx.AsyncClient() as client:
            await client.post(one.url + "v1/chat/completions", json=chat("m"))
            first = samples((await client.get(one.url + "metrics")).text)
            second = samples((await client.get(two.url + "metrics")).text)
        await stop(one, one_task)
        await stop(two, two_task)
        return (
            total(first, "sserelay_requests_total"),
            total(second, "sserelay_requests_total"),
        )

    assert run_bounded(scenario()) == (1, 0)


def test_the_admin_token_guards_the_figures_but_not_the_page(text_file: Path) -> None:
    async def scenario() -> dict[str, int]:
        config = MockConfig(source=str(text_file), port=0, admin_token="adm1n")
        running, task = await started(config)
        codes: dict[str, int] = {}
        async with httpx.AsyncClient() as client:
            for name, path, headers in [
                ("none", "metrics", {}),
                ("wrong", "metrics", {"authorization": "Bearer nope"}),
                ("bearer", "metrics", {"authorization": "Bearer adm1n"}),
                ("x-api-key", "usage", {"x-api-key": "adm1n"}),
                ("query", "usage?token=adm1n", {}),
                ("feed", "ui/events", {}),
                ("page", "ui", {}),
                ("post", "metrics", {}),
            ]:
                method = "POST" if name == "post" else "GET"
                response = await client.request(method, running.url + path, headers=headers)
                codes[name] = response.status_code
        await stop(running, task)
        return codes

    assert run_bounded(scenario()) == {
        "none": 401,
        "wrong": 401,
        "bearer": 200,
        "x-api-key": 200,
        "query": 200,
        "feed": 401,
        "page": 200,
        "post": 405,
    }


@pytest.mark.parametrize(
    ("client", "loopback"),
    [
        (("127.0.0.1", 5), True),
        (("127.8.9.1", 5), True),
        (("::1", 5), True),
        (("::ffff:127.0.0.1", 5), True),
        (("192.0.2.7", 5), False),
        (("2001:db8::1", 5), False),
        (("not-an-address", 5), False),
        (None, False),
    ],
)
def test_without_an_admin_token_only_loopback_clients_read_the_figures(
    client: tuple[str, int] | None, loopback: bool
) -> None:
    scope: dict[str, Any] = {"type": "http", "client": client, "headers": [], "query_string": b""}
    assert is_loopback(scope) is loopback
    refusal = admin_refusal(scope, None)
    assert (refusal is None) is loopback
    if refusal is not None:
        assert refusal.status == 403 and "--admin-token" in refusal.message


def test_usage_shows_the_ledger_spend_of_the_day(text_file: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.db"

    async def scenario() -> tuple[dict[str, Any], RunResult]:
        config = MockConfig(source=str(text_file), port=0, ledger=str(ledger), price=1.0)
        running, task = await started(config)
        async with httpx.AsyncClient() as client:
            await client.post(running.url + "v1/chat/completions", json=chat("m"))
            usage: dict[str, Any] = {}
            for _ in range(200):  # rows are written in tasks of their own; spend is cached 1 s
                usage = (await client.get(running.url + "usage")).json()
                if usage["spend"]["keys"] and usage["spend"]["keys"][0]["tokens"]:
                    break
                await asyncio.sleep(0.05)
        return usage, await stop(running, task)

    async def bounded() -> tuple[dict[str, Any], RunResult]:
        return await asyncio.wait_for(scenario(), 20)

    usage, result = asyncio.run(bounded())
    spend = usage["spend"]
    assert spend["ledger"] == str(ledger) and spend["period"] == "day"
    assert spend["since"].endswith("T00:00:00Z") and spend["error"] is None
    assert spend["keys"] == [
        {"key": None, "tokens": result.bill.tokens, "cost": pytest.approx(result.bill.cost)}
    ]


def read_feed(text: str) -> list[tuple[str, Any]]:
    return [(e.event or "", json.loads(e.data)) for e in SSEDecoder().decode(text.encode())]


def test_the_feed_says_hello_ticks_and_says_done_when_a_serve_ends(text_file: Path) -> None:
    async def scenario() -> tuple[list[tuple[str, Any]], RunResult]:
        running, task = await started(ServeConfig(source=str(text_file), port=0, rate=40))
        assert running.monitor is not None
        running.monitor.interval = 0.05
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("GET", running.url + "ui/events") as feed:
                parts = feed.aiter_text()
                first = await anext(parts)
                stream = await client.get(running.url)  # the one client: the run then ends
                assert stream.text.count("data:") == 3
                rest = [part async for part in parts]
        return read_feed(first + "".join(rest)), await asyncio.wait_for(task, 10)

    events, result = run_bounded(scenario())
    names = [name for name, _ in events]
    assert names[:2] == ["hello", "tick"] and names[-1] == "done"
    assert events[-1][1] == {"reason": "complete"}
    last_tick = [data for name, data in events if name == "tick"][-1]
    assert last_tick["usage"]["totals"]["tokens"] == result.bill.tokens == 6
    assert last_tick["sample"]["requests"] == 1
    assert last_tick["recent"][0]["tokens"] == 6
    hello = events[0][1]
    assert hello["mode"] == "serve" and isinstance(hello["samples"], list)


def test_metrics_can_be_turned_off_and_then_a_proxy_forwards_the_paths(
    text_file: Path,
) -> None:
    async def scenario() -> str:
        upstream, upstream_task = await started(MockConfig(source=str(text_file), port=0))
        proxy, proxy_task = await started(ProxyConfig(upstream=upstream.url, port=0, metrics=False))
        assert proxy.monitor is None
        async with httpx.AsyncClient() as client:
            forwarded = await client.get(proxy.url + "metrics")  # the upstream's own
        await stop(proxy, proxy_task)
        await stop(upstream, upstream_task)
        return forwarded.text

    found = samples(run_bounded(scenario()))
    assert total(found, "sserelay_info", mode="mock") == 1
    assert total(found, "sserelay_info", mode="proxy") == 0


# --------------------------------------------------------------------------- no sockets


def collected(tally: Tally, **kwargs: Any) -> list[Sample]:
    from prometheus_client.exposition import generate_latest

    registry = new_registry(RunCollector(tally, mode="proxy", tokenizer="x", **kwargs))
    return samples(generate_latest(registry).decode())


def test_ten_thousand_model_names_keep_the_series_count_bounded() -> None:
    meter = Meter()
    tally = Tally(meter)
    meter.subscribe(tally)

    def series() -> int:
        return len([s for s in collected(tally) if s.name.startswith("sserelay_")])

    for i in range(150):  # past the cap of 100 models
        client = meter.open_client("p", RequestFacts("POST", "/", f"model-{i}", 200), key="k")
        client.record(1, 1, 1)
        meter.close(client, "complete")
    bounded = series()
    for i in range(150, 10_000):
        client = meter.open_client("p", RequestFacts("POST", "/", f"model-{i}", 200), key="k")
        client.record(1, 1, 1)
        meter.close(client, "complete")
    found = collected(tally)
    assert series() == bounded
    assert len({s.labels["model"] for s in found if "model" in s.labels}) == 101
    assert total(found, "sserelay_tokens_total", model="other") == 10_000 - 100


def test_budget_remaining_comes_from_the_budgets_hook() -> None:
    ring = KeyRing(
        (
            Key("alice", secret_digest("a" * 24), budget_tokens=50),
            Key("bob", secret_digest("b" * 24), budget_cost=2.5),
            Key("carol", secret_digest("c" * 24)),
        )
    )
    found = collected(Tally(Meter()), budgets=Budgets(ring).status)
    assert total(found, "sserelay_budget_remaining", key="alice") == 50
    assert total(found, "sserelay_budget_remaining_cost", key="bob") == 2.5
    assert not [s for s in found if s.labels.get("key") == "carol"]
