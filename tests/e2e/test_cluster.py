"""Several instances on one real Redis (issue 16): the real CLI, real sockets, real Redis.

A publisher (`serve - --topic`) fed line by line on its stdin and followers (`serve
--follow`) on the same topic: every client of every instance gets the same events with the
same ids; a client of a follower killed with -9 resumes on another with `Last-Event-ID`
and gets every later event exactly once; a dead publisher leaves the followers' clients
connected (heartbeats) until another one continues the ids; Redis stopped and started
again mid-stream loses no event for the followers.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sserelay import SSEDecoder, count_tokens
from tests.conftest import Relay, usage_report, wait_until
from tests.services import PostgresServer, RedisServer, free_port

Event = tuple[str | None, str]


class Client:
    """An SSE client in a thread: every event it gets, in order, and every comment."""

    def __init__(self, url: str, last_event_id: str | None = None) -> None:
        self.events: list[Event] = []
        self.comments = 0
        self.status: int | None = None
        self.ended = threading.Event()  # the response ended (cleanly or not)
        self.error: BaseException | None = None
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        self._thread = threading.Thread(target=self._run, args=(url, headers), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        decoder = SSEDecoder()
        try:
            timeout = httpx.Timeout(10.0, read=30.0)
            with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
                self.status = response.status_code
                for chunk in response.iter_raw():
                    self.comments += chunk.count(b": ping")
                    self.events += [(e.id, e.data) for e in decoder.decode(chunk)]
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        wait_until(lambda: len(self.events) >= count or self.ended.is_set(), timeout)
        assert len(self.events) >= count, (self.events, self.error)
        return self.events[:count]

    def finish(self, timeout: float = 10.0) -> list[Event]:
        assert self.ended.wait(timeout), "the response did not end"
        return self.events


def lines(start: int, stop: int) -> str:
    return "".join(f"line {n}\n" for n in range(start, stop))


def data(events: list[Event]) -> list[str]:
    return [text for _, text in events]


def ids_rise(events: list[Event]) -> bool:
    ids = [tuple(int(part) for part in (i or "").split("-")) for i, _ in events]
    return all(a < b for a, b in pairwise(ids))


def follower(relay: Any, redis: RedisServer, *args: str) -> Relay:
    started: Relay = relay("serve", "--redis", redis.url, "--follow", "news", "--json", *args)
    return started


def publisher(relay: Any, redis: RedisServer, *args: str) -> Relay:
    started: Relay = relay("serve", "-", "--redis", redis.url, "--topic", "news", "--json", *args)
    return started


def test_three_instances_serve_every_client_the_same_events_with_the_same_ids(
    relay: Any, redis_server: RedisServer
) -> None:
    one, two = follower(relay, redis_server), follower(relay, redis_server)
    source = publisher(relay, redis_server)
    clients = [Client(instance.url) for instance in (source, one, two)]
    wait_until(lambda: all(c.status == 200 for c in clients))
    source.feed(lines(0, 50))
    for client in clients:
        client.wait_for(50)
    source.feed(lines(50, 100))
    source.stdin.close()  # the end of the source: published, every client's response ends
    got = [client.finish() for client in clients]
    assert data(got[0]) == [f"line {n}" for n in range(100)] and ids_rise(got[0])
    assert got[0] == got[1] == got[2]
    bill = source.bill()  # the publisher exits once the end is out and its client is done
    assert bill["reason"] == "complete" and bill["events"] == 100
    # A resume after the end of the topic, on a follower: 204, as on one instance.
    done = httpx.get(one.url, headers={"Last-Event-ID": got[0][-1][0] or ""})
    assert done.status_code == 204
    for instance in (one, two):
        instance.signal(signal.SIGTERM)
        assert instance.bill()["events"] == 100


def test_a_follower_killed_mid_stream_its_client_resumes_on_another_exactly_once(
    relay: Any, redis_server: RedisServer
) -> None:
    one, two = follower(relay, redis_server), follower(relay, redis_server)
    source = publisher(relay, redis_server)
    witness, client = Client(source.url), Client(one.url)
    wait_until(lambda: witness.status == client.status == 200)
    source.feed(lines(0, 30))
    before = client.wait_for(30)
    one.proc.kill()  # -9: no goodbye
    one.wait()
    client.finish()
    source.feed(lines(30, 60))  # published while the client is away
    resumed = Client(two.url, last_event_id=before[-1][0])
    resumed.wait_for(30)
    source.feed(lines(60, 80))
    source.stdin.close()
    after = resumed.finish()
    everything = witness.finish()
    # Event by event: no gap, no duplicate, the same ids.
    assert before + after == everything
    assert data(everything) == [f"line {n}" for n in range(80)]
    source.bill()
    two.signal(signal.SIGTERM)
    two.bill()


def test_a_dead_publisher_leaves_the_clients_waiting_until_another_continues_the_ids(
    relay: Any, redis_server: RedisServer
) -> None:
    one = follower(relay, redis_server, "--heartbeat", "0.2")
    first = publisher(relay, redis_server)
    client = Client(one.url)
    wait_until(lambda: client.status == 200)
    first.feed(lines(0, 10))
    client.wait_for(10)
    first.proc.kill()
    first.wait()
    pings = client.comments
    wait_until(lambda: client.comments >= pings + 2)  # kept alive, still connected
    assert not client.ended.is_set()
    second = publisher(relay, redis_server)
    second.feed(lines(10, 20))
    second.stdin.close()
    got = client.finish()
    assert data(got) == [f"line {n}" for n in range(20)] and ids_rise(got)
    second.bill()
    one.signal(signal.SIGTERM)
    one.bill()


def test_redis_stopped_and_started_again_mid_stream_loses_no_event_for_followers(
    relay: Any, redis_server: RedisServer
) -> None:
    one, two = follower(relay, redis_server), follower(relay, redis_server)
    source = publisher(relay, redis_server)
    clients = [Client(one.url), Client(two.url)]
    wait_until(lambda: all(c.status == 200 for c in clients))
    source.feed(lines(0, 20))
    for client in clients:
        client.wait_for(20)
    redis_server.stop()
    source.feed(lines(20, 40))  # held by the publisher while Redis is away
    wait_until(lambda: "is unavailable" in source.stderr and "is unavailable" in one.stderr)
    redis_server.start()  # empty: it saved nothing
    source.feed(lines(40, 50))
    source.stdin.close()
    got = [client.finish(timeout=20) for client in clients]
    assert data(got[0]) == [f"line {n}" for n in range(50)] and ids_rise(got[0])
    assert got[0] == got[1]
    assert source.bill()["reason"] == "complete"
    wait_until(lambda: "is back" in source.stderr and "is back" in one.stderr)
    for instance in (one, two):
        instance.signal(signal.SIGTERM)
        instance.bill()
    # One line when Redis went away, one when it came back: not one per retry.
    assert source.stderr.count("is unavailable") == 1 and source.stderr.count("is back after") == 1


def test_redis_unreachable_at_start_is_one_line_and_exit_1() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    for args in (["serve", "--follow", "news"], ["proxy", "--upstream", "http://127.0.0.1:9/"]):
        result = subprocess.run(
            [sys.executable, "-m", "sserelay", *args, "--redis", url, "--no-ledger"]
            if args[0] == "proxy"
            else [sys.executable, "-m", "sserelay", *args, "--redis", url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("sserelay: error: cannot reach redis redis://:***@")
        assert result.stderr.count("\n") == 1 and "hunter2" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "x.txt", "--topic", "news"], "give --redis URL"),
        (["serve", "x.txt", "--redis", "redis://h/0", "--follow", "news"], "no SOURCE"),
        (["serve", "--redis", "redis://h/0", "--follow", "a b"], "not a topic name"),
        (["serve", "x.txt", "--redis", "redis://h/0", "--topic", "a", "--no-ids"], "--no-ids"),
        (["serve", "x.txt", "--as", "openai", "--topic", "news"], "--as answers"),
        (["serve", "x.txt", "--redis", "http://h/"], "redis://"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sserelay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# --------------------------------------------------------------------------- a shared ledger


def test_a_shared_ledger_sums_every_instance_and_a_survivor_closes_a_dead_ones_rows(
    relay: Any, redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    ledger = postgres_server.create_database("e2e_cluster")
    common = ("--ledger", ledger, "--checkpoint", "0.2")
    one, two = follower(relay, redis_server, *common), follower(relay, redis_server, *common)
    source = publisher(relay, redis_server, *common)
    clients = [Client(instance.url) for instance in (source, one, two)]
    wait_until(lambda: all(c.status == 200 for c in clients))
    source.feed(lines(0, 40))
    for client in clients:
        client.wait_for(40)
    time.sleep(0.5)  # a checkpoint of the open rows
    two.proc.kill()
    two.wait()
    # A survivor sees its heartbeat stop (in Redis) and closes its open row as crashed.
    deadline = time.monotonic() + 15

    def crashed() -> bool:
        reasons = {g["reason"] for g in usage_report(ledger, "--by", "reason")["groups"]}
        return "crashed" in reasons or time.monotonic() > deadline

    wait_until(crashed, timeout=20, interval=0.3)
    source.stdin.close()
    source_bill = source.bill()
    one.signal(signal.SIGTERM)
    one_bill = one.bill()
    report = usage_report(ledger, "--by", "reason")
    reasons = {group["reason"]: group for group in report["groups"]}
    assert reasons["crashed"]["requests"] == 1 and reasons["crashed"]["events"] == 40
    # One total for every instance: the survivors' bills and the dead one's checkpoint.
    assert report["total"]["events"] == source_bill["events"] + one_bill["events"] + 40
    assert report["total"]["requests"] == 3


# --------------------------------------------------------------------------- shared budgets

ANSWER = " ".join(f"word{n}" for n in range(100)) + "\n"
SECRET = "sk-relay-test-shared-0123456789"
BUDGET = 60


def shared_gateway(
    relay: Any, tmp_path: Path, redis: RedisServer, ledger: str, proxies: int = 2
) -> list[Relay]:
    """A mock upstream streaming the 100-word answer, and `proxies` proxies in front of it
    sharing one key (budget_tokens = BUDGET) through Redis and one ledger."""
    answer = tmp_path / "answer.txt"
    answer.write_text(ANSWER)
    keys = tmp_path / "keys.toml"
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    keys.write_text(f'[keys.alice]\nsecret_sha256 = "{digest}"\nbudget_tokens = {BUDGET}\n')
    upstream: Relay = relay(
        "serve", str(answer), "--as", "openai", "--chunk", "word", "--rate", "400", "--no-ledger",
    )  # fmt: skip
    args = ["--keys", str(keys), "--ledger", ledger, "--redis", redis.url, "--json"]
    return [relay("proxy", "--upstream", upstream.url + "v1", *args) for _ in range(proxies)]


def stream_through(url: str) -> tuple[str, str]:
    """One streamed chat completion with the openai SDK: (how it ended, the text received)."""
    received: list[str] = []
    client = openai.OpenAI(base_url=url, api_key=SECRET, max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "count"}], stream=True
        )
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    except openai.RateLimitError as exc:  # refused before it started: the budget is spent
        assert "budget" in exc.message
        return "refused", ""
    except openai.APIError as exc:  # cut mid-stream by the budget
        assert "budget" in str(exc) and "alice" in str(exc)
        return "cut", "".join(received)
    finally:
        client.close()
    return "complete", "".join(received)


def test_two_proxies_sharing_a_key_never_let_it_pass_its_budget(
    relay: Any, tmp_path: Path, redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    ledger = postgres_server.create_database("e2e_shared_budget")
    proxies = shared_gateway(relay, tmp_path, redis_server, ledger)
    urls = [proxies[n % 2].url for n in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent streams through both
        outcomes = list(pool.map(stream_through, urls))
    delivered = sum(count_tokens(text) for _, text in outcomes)
    assert delivered <= BUDGET
    assert {how for how, _ in outcomes} <= {"cut", "refused"}  # 100 words each: none fits
    assert any(how == "cut" for how, _ in outcomes)
    bills = []
    for proxy in proxies:
        proxy.signal(signal.SIGTERM)
        bills.append(proxy.bill())
    rows = usage_report(ledger, "--by", "key")["groups"]
    alice = next(row for row in rows if row["key"] == "alice")
    # The ledger's sum for the key: what the clients received, within the budget.
    assert alice["tokens"] == delivered == sum(bill["tokens"] for bill in bills)
    assert alice["tokens"] <= BUDGET
    # What every instance spent together, as Redis keeps it.
    status = subprocess.run(
        [sys.executable, "-m", "sserelay", "keys", "status", "--keys", str(tmp_path / "keys.toml"),
         "--ledger", ledger, "--redis", redis_server.url, "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    (row,) = json.loads(status.stdout)["keys"]
    assert (row["spent_tokens"], row["remaining_tokens"]) == (delivered, BUDGET - delivered)


def test_budgets_fail_closed_while_redis_is_away(
    relay: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    (proxy,) = shared_gateway(relay, tmp_path, redis_server, str(tmp_path / "u.db"), proxies=1)
    redis_server.stop()
    wait_until(lambda: "is unavailable" in proxy.stderr, timeout=10)
    client = openai.OpenAI(base_url=proxy.url, api_key=SECRET, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "2"
    assert "budget store is unreachable" in refused.value.message
    redis_server.start()
    wait_until(lambda: "is back" in proxy.stderr, timeout=10)
    assert stream_through(proxy.url)[0] == "cut"  # served again, and held to its budget
    client.close()
    proxy.signal(signal.SIGTERM)
    assert [c["reason"] for c in proxy.bill()["clients"]] == ["budget_exhausted"]
