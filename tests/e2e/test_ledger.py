"""The usage ledger end to end (issue 13): the real CLI, real SDK, real SQLite and PostgreSQL.

After a clean run the ledger's rows sum exactly to the printed bill; `kill -9` mid-stream
loses at most a checkpoint, and the next sserelay on the ledger closes the dead rows as
`crashed`; a ledger that cannot be opened stops the start with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import EXAMPLE, Relay, usage_report, wait_until
from tests.services import PostgresServer

REQUESTS = 50


def mock_and_proxy(relay: Any, ledger: str, *args: str) -> tuple[Relay, Relay]:
    mock: Relay = relay("serve", str(EXAMPLE), "--as", "openai", "--no-ledger", "--quiet")
    proxy: Relay = relay(
        "proxy", "--upstream", mock.url + "v1", "--ledger", ledger, "--json", *args
    )
    return mock, proxy


def sdk_requests(url: str, count: int) -> list[str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    texts = []
    for n in range(count):
        stream = client.chat.completions.create(
            model=f"gpt-4o-mini-{n % 3}",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        texts.append(
            "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        )
    client.close()
    return texts


def check_usage_equals_bill(report: dict[str, Any], bill: dict[str, Any]) -> None:
    total = report["total"]
    assert total["requests"] == REQUESTS == bill.get("clients_total", len(bill["clients"]))
    assert (total["tokens"], total["events"], total["bytes"]) == (
        bill["tokens"],
        bill["events"],
        bill["bytes"],
    )


def test_a_proxy_ledger_sums_exactly_to_the_bill(relay: Any, tmp_path: Path) -> None:
    ledger = str(tmp_path / "usage.db")
    _, proxy = mock_and_proxy(relay, ledger)
    assert f"(usage ledger: {ledger})" in proxy.stderr
    texts = sdk_requests(proxy.url, REQUESTS)
    assert all(text for text in texts)
    wait_until(lambda: proxy.stderr.count(" · complete") >= REQUESTS)
    proxy.signal(signal.SIGINT)
    bill = proxy.bill()
    assert bill["ledger"] == ledger
    check_usage_equals_bill(usage_report(ledger), bill)
    by_model = usage_report(ledger, "--by", "model")
    assert {group["model"] for group in by_model["groups"]} == {
        f"gpt-4o-mini-{n}" for n in range(3)
    }


def test_a_client_request_id_is_the_row_id(relay: Any, tmp_path: Path) -> None:
    ledger = str(tmp_path / "usage.jsonl")
    mock: Relay = relay("serve", str(EXAMPLE), "--as", "openai", "--ledger", ledger, "--json")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    mine = httpx.post(
        mock.url + "v1/chat/completions", json=body, headers={"x-request-id": "trace-42"}
    )
    made = httpx.post(mock.url + "v1/chat/completions", json=body)
    assert mine.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"].startswith("req_")
    mock.signal(signal.SIGTERM)
    bill = mock.bill()
    assert [c["request_id"] for c in bill["clients"]] == ["trace-42", made.headers["x-request-id"]]
    rows = [json.loads(line) for line in Path(ledger).read_text().splitlines()]
    assert {"trace-42", made.headers["x-request-id"]} <= {r.get("row", {}).get("id") for r in rows}


def kill_mid_stream_then_recover(relay: Any, ledger: str) -> None:
    """A proxy streaming a slow answer is killed (-9); the next run on the ledger finds its
    row open, closes it as `crashed` with its last checkpoint, and bills its own exactly."""
    mock: Relay = relay(
        "serve", str(EXAMPLE), "--as", "openai", "--rate", "50", "--no-ledger", "--quiet"
    )
    first: Relay = relay(
        "proxy", "--upstream", mock.url + "v1", "--ledger", ledger, "--checkpoint", "0.2"
    )
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", first.url + "chat/completions", json=body) as response,
    ):
        received = b""
        chunks = response.iter_raw()  # held: a dropped generator would close the response
        for chunk in chunks:
            received += chunk
            if received.count(b"\n\n") >= 10:
                break
        time.sleep(0.5)  # at least one checkpoint since
        first.proc.kill()
        first.wait()
    second: Relay = relay("proxy", "--upstream", mock.url + "v1", "--ledger", ledger, "--json")
    answer = httpx.post(second.url + "chat/completions", json={**body, "stream": False})
    assert answer.status_code == 200
    second.signal(signal.SIGTERM)
    bill = second.bill()
    report = usage_report(ledger, "--by", "reason")
    reasons = {group["reason"]: group for group in report["groups"]}
    assert set(reasons) == {"crashed", "complete"}
    crashed = reasons["crashed"]
    assert crashed["requests"] == 1
    # What the dead run had checkpointed: something, at most what its client received.
    assert 0 < crashed["bytes"] <= len(received) + 4096
    assert (reasons["complete"]["tokens"], reasons["complete"]["bytes"]) == (
        bill["tokens"],
        bill["bytes"],
    )


def test_kill_9_mid_stream_then_recovery_on_sqlite(relay: Any, tmp_path: Path) -> None:
    kill_mid_stream_then_recover(relay, str(tmp_path / "usage.db"))


def test_kill_9_mid_stream_then_recovery_on_postgres(
    relay: Any, postgres_server: PostgresServer
) -> None:
    kill_mid_stream_then_recover(relay, postgres_server.create_database("e2e_crash"))


def test_a_postgres_ledger_sums_exactly_to_the_bill(
    relay: Any, postgres_server: PostgresServer
) -> None:
    ledger = postgres_server.create_database("e2e_exact")
    _, proxy = mock_and_proxy(relay, ledger)
    sdk_requests(proxy.url, REQUESTS)
    wait_until(lambda: proxy.stderr.count(" · complete") >= REQUESTS)
    proxy.signal(signal.SIGTERM)
    bill = proxy.bill()
    check_usage_equals_bill(usage_report(ledger), bill)


@pytest.mark.parametrize("kind", ["unwritable", "corrupt", "refused"])
def test_a_ledger_that_cannot_be_opened_stops_the_start(tmp_path: Path, kind: str) -> None:
    if kind == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        target = str(blocker / "usage.db")
    elif kind == "corrupt":
        corrupt = tmp_path / "usage.db"
        corrupt.write_bytes(b"this is not a database" * 100)
        target = str(corrupt)
    else:
        target = "postgresql://nobody@127.0.0.1:9/none?connect_timeout=2"
    argv = [sys.executable, "-m", "sserelay", "serve", str(EXAMPLE), "--as", "openai"]
    result = subprocess.run(
        [*argv, "--ledger", target, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sserelay: error: "), result.stderr
    assert "serving on" not in result.stderr


def test_past_a_hundred_requests_the_bill_keeps_sums_not_rows(relay: Any, tmp_path: Path) -> None:
    ledger = str(tmp_path / "usage.db")
    mock: Relay = relay("serve", str(EXAMPLE), "--as", "openai", "--ledger", ledger, "--json")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        for _ in range(120):
            assert client.post(mock.url + "v1/chat/completions", json=body).status_code == 200
    mock.signal(signal.SIGTERM)
    bill = mock.bill()
    assert bill["clients"] == [] and bill["clients_total"] == 120
    assert bill["by_model"]["m"]["requests"] == 120
    assert usage_report(ledger)["total"]["tokens"] == bill["tokens"]


def test_a_postgres_lost_for_good_leaves_its_rows_in_a_fallback_file_and_exit_1(
    relay: Any, postgres_server: PostgresServer
) -> None:
    ledger = postgres_server.create_database("e2e_lost")
    mock: Relay = relay("serve", str(EXAMPLE), "--as", "openai", "--ledger", ledger, "--json")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        postgres_server.stop()
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                assert client.post(mock.url + "v1/chat/completions", json=body).status_code == 200
        mock.signal(signal.SIGTERM)
        bill = mock.bill(timeout=60)
    finally:
        postgres_server.start()
    assert mock.proc.returncode == 1
    assert bill["tokens"] > 0
    warning = next(line for line in mock.stderr_lines if "could not be stored" in line)
    fallback = Path(warning.rsplit("they are in ", 1)[1].strip())
    report = usage_report(str(fallback))
    assert report["total"]["requests"] == 3
    assert report["total"]["tokens"] == bill["tokens"]
    assert "password" not in mock.stderr


def test_usage_prints_a_table_with_a_totals_row_and_csv(relay: Any, tmp_path: Path) -> None:
    ledger = str(tmp_path / "usage.db")
    mock: Relay = relay("serve", str(EXAMPLE), "--as", "openai", "--ledger", ledger, "--json")
    for model in ("a", "b", "b"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        httpx.post(mock.url + "v1/chat/completions", json=body, timeout=10)
    mock.signal(signal.SIGTERM)
    bill = mock.bill()
    table = subprocess.run(
        [sys.executable, "-m", "sserelay", "usage", "--ledger", ledger, "--by", "model"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={name: value for name, value in os.environ.items() if name != "COLUMNS"},
    ).stdout
    assert "TOTAL" in table and f"{bill['tokens']:,}" in table
    # Piped, the table is not fitted to 80 columns: no header is cut to "outp…".
    assert "output_tokens" in table and "cached_tokens" in table and "…" not in table
    csv = subprocess.run(
        [sys.executable, "-m", "sserelay", "usage", "--ledger", ledger, "--by", "model", "--csv"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert csv[0].startswith("row,model,requests,tokens")
    assert [line.split(",")[:3] for line in csv[1:]] == [
        ["group", "a", "1"],
        ["group", "b", "2"],
        ["total", "", "3"],
    ]
    since = usage_report(ledger, "--since", "1h")
    assert since["total"]["requests"] == 3
    assert usage_report(ledger, "--until", "2000-01-01")["total"]["requests"] == 0
