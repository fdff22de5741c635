"""How many short requests per second each ledger backend keeps up with.

    python bench/ledger.py                      # SQLite, JSON Lines, and a private PostgreSQL
    python bench/ledger.py --requests 50000 --batch 200
    python bench/ledger.py --postgres postgresql://user@host/db   # an existing server
    python bench/ledger.py --no-postgres

A "request" is what the relay writes for one short stream: a start (its row) and a finish
(its final figures). `batched`: `--batch` requests start together and end together, as
under load, where the queue folds the calls that arrive during one transaction into the
next (group commit), like a checkpoint. `one by one`: each start and each finish waits for
its own transaction (an idle relay: the latency floor). `checkpoint`: one checkpoint of
`--checkpoint` open rows (default 1,000), which is one transaction. Files go to a temp
directory; the private PostgreSQL is durable (fsync and synchronous_commit on), like a real
one, and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sserelay.ledger import QueuedLedger, UsageRow, open_ledger  # noqa: E402
from sserelay.ledger.store import Write  # noqa: E402


def rows(count: int, start: datetime) -> list[UsageRow]:
    return [
        UsageRow(
            id=f"req_{n:024x}",
            instance="bench",
            started_at=start + timedelta(microseconds=n),
            client="127.0.0.1:50000",
            method="POST",
            path="/v1/chat/completions",
            model="gpt-4o-mini",
            tokenizer="o200k",
            usage_source="reported",
        )
        for n in range(count)
    ]


def ended(row: UsageRow) -> UsageRow:
    return replace(
        row,
        tokens=120,
        events=121,
        bytes=9000,
        input_tokens=40,
        output_tokens=120,
        status=200,
        cost=0.000072,
        reason="complete",
        ended_at=row.started_at + timedelta(seconds=1),
    )


def count_transactions(ledger: QueuedLedger) -> list[int]:
    batches: list[int] = []
    store = ledger._store
    write = store.write

    async def counting(batch: Sequence[Write]) -> None:
        batches.append(len(batch))
        await write(batch)

    store.write = counting  # type: ignore[method-assign]
    return batches


async def measure(
    target: str, requests: int, batch: int, single: int, checkpoint: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with open_ledger(target, instance="bench", on_warning=print) as ledger:
        batches = count_transactions(ledger)
        base = datetime.now(UTC)
        todo = rows(requests, base)
        began = time.perf_counter()
        for first in range(0, requests, batch):
            group = todo[first : first + batch]
            await asyncio.gather(*(ledger.start(row) for row in group))
            await asyncio.gather(*(ledger.finish(ended(row)) for row in group))
        elapsed = time.perf_counter() - began
        figures["batched_requests_per_s"] = requests / elapsed
        figures["rows_per_transaction"] = statistics.fmean(batches)

        todo = rows(single, base + timedelta(hours=1))
        began = time.perf_counter()
        for row in todo:
            await ledger.start(row)
            await ledger.finish(ended(row))
        figures["one_by_one_requests_per_s"] = single / (time.perf_counter() - began)

        open_rows = rows(checkpoint, base + timedelta(hours=2))
        await asyncio.gather(*(ledger.start(row) for row in open_rows))
        timings = []
        for round_ in range(5):
            figures_so_far = [replace(row, tokens=round_) for row in open_rows]
            began = time.perf_counter()
            await ledger.checkpoint(figures_so_far)
            timings.append(time.perf_counter() - began)
        figures["checkpoint_ms"] = statistics.median(timings) * 1000
        await asyncio.gather(*(ledger.finish(ended(row)) for row in open_rows))
        stored = await ledger.query()
        assert len(stored) == requests + single + checkpoint, len(stored)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="batched requests")
    parser.add_argument("--batch", type=int, default=100, help="requests starting together")
    parser.add_argument("--single", type=int, default=2_000, help="one-by-one requests")
    parser.add_argument("--checkpoint", type=int, default=1000, help="rows per checkpoint")
    parser.add_argument("--postgres", metavar="URL", help="an existing (empty) database")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    options = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    server = None
    with tempfile.TemporaryDirectory(prefix="sserelay-bench-ledger-") as workdir:
        targets = {
            "sqlite": str(Path(workdir) / "usage.db"),
            "jsonl": str(Path(workdir) / "usage.jsonl"),
        }
        if options.postgres:
            targets["postgres"] = options.postgres
        elif not options.no_postgres:
            from tests.services import ServiceUnavailable, start_postgres

            try:
                server = start_postgres(durable=True)
                targets["postgres"] = server.create_database("bench")
            except ServiceUnavailable as exc:
                results["postgres"] = {"note": str(exc)}
        try:
            for name, target in targets.items():
                results[name] = asyncio.run(
                    measure(
                        target,
                        options.requests,
                        options.batch,
                        options.single,
                        options.checkpoint,
                    )
                )
        finally:
            if server is not None:
                server.remove()

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"ledger: {options.requests} requests in batches of {options.batch}, "
        f"{options.single} one by one; {os.cpu_count()} cores, load average {load}"
    )
    header = f"{'backend':<10}{'batched req/s':>15}{'rows/tx':>9}{'1-by-1 req/s':>14}"
    print(header + f"{f'checkpoint {options.checkpoint} rows':>22}")
    for name, figures in results.items():
        if "note" in figures:
            print(f"{name:<10}  {figures['note']}")
            continue
        print(
            f"{name:<10}{figures['batched_requests_per_s']:>15,.0f}"
            f"{figures['rows_per_transaction']:>9.1f}"
            f"{figures['one_by_one_requests_per_s']:>14,.0f}"
            f"{figures['checkpoint_ms']:>19.1f} ms"
        )
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
