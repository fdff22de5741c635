"""The JSON Lines ledger's own concerns: the record format, torn and bad lines, headers,
upgrades on read, files that cannot be written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sserelay.ledger import JSONLinesLedger, LedgerError, UsageRow
from sserelay.ledger import lines as lines_format
from tests.ledger.conftest import T0, make_row, run


def open_error(path: Path, instance: str | None = "a") -> str:
    async def scenario() -> None:
        await JSONLinesLedger(path, instance=instance).open()

    with pytest.raises(LedgerError) as caught:
        run(scenario())
    message = str(caught.value)
    assert "\n" not in message
    return message


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_record_per_line_each_in_the_file_when_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    row = make_row()
    seen: list[list[object]] = []

    async def scenario() -> None:
        async with JSONLinesLedger(path, instance="a") as ledger:
            await ledger.start(row)
            seen.append([record["type"] for record in records(path)])  # no flush needed
            await ledger.checkpoint([replace(row, tokens=2)])
            await ledger.heartbeat()
            await ledger.finish(replace(row, tokens=3, reason="complete", ended_at=T0))

    run(scenario())
    assert seen == [["meta", "heartbeat", "start"]]
    found = records(path)
    assert [record["type"] for record in found] == [
        "meta",
        "heartbeat",
        "start",
        "checkpoint",
        "heartbeat",
        "finish",
        "close",
    ]
    assert found[0] == {"type": "meta", "schema_version": 1}
    finish = found[5]
    assert finish["by"] == "a" and isinstance(finish["row"], dict)
    assert (
        finish["row"]["tokens"] == 3 and finish["row"]["ended_at"] == "2026-11-27T18:54:33.123456Z"
    )


def test_a_torn_last_line_is_ended_skipped_and_told_once(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    row = replace(make_row(), reason="complete", ended_at=T0)
    warnings: list[str] = []

    async def write(instance: str, row: UsageRow) -> None:
        async with JSONLinesLedger(path, instance=instance, on_warning=warnings.append) as ledger:
            await ledger.finish(row)

    run(write("a", row))
    with open(path, "ab") as file:
        file.write(b'{"type":"finish","at":"2026-11-2')  # killed mid-write
    later = replace(make_row("b"), reason="complete", ended_at=T0)
    run(write("b", later))

    async def read() -> list[UsageRow]:
        async with JSONLinesLedger(path, instance=None, on_warning=warnings.append) as reader:
            return await reader.query()

    assert run(read()) == [row, later]
    assert warnings[-1] == f"ledger {path}: skipped 1 unreadable lines"


def test_a_newer_file_or_another_file_is_refused_in_one_line(tmp_path: Path) -> None:
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"type": "meta", "schema_version": 9}\n')
    assert open_error(newer) == (
        f"{newer} has schema version 9, newer than this sserelay reads (1); upgrade sserelay"
    )
    other = tmp_path / "other.jsonl"
    other.write_text('{"level": "info", "msg": "some log"}\n')
    assert open_error(other) == f"{other} is not an sserelay JSON Lines ledger (no meta line)"
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x00\xff\xfe garbage")
    assert "is not an sserelay JSON Lines ledger" in open_error(binary, None)


def test_an_unwritable_or_missing_path_is_refused_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert open_error(blocker / "usage.jsonl") == (
        f"cannot open ledger {blocker}/usage.jsonl: Not a directory: {blocker}"
    )
    missing = tmp_path / "missing.jsonl"
    assert open_error(missing, None) == f"cannot open ledger {missing}: no ledger there"
    assert not missing.exists()


def test_a_full_disk_at_open_is_refused_in_one_line(tmp_path: Path) -> None:
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full here")
    path = tmp_path / "usage.jsonl"
    path.symlink_to(full)
    assert open_error(path) == f"cannot open ledger {path}: No space left on device"


def test_older_records_are_upgraded_as_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "usage.jsonl"
    old = replace(make_row(), tokens=1, reason="complete", ended_at=T0)

    async def write(row: UsageRow) -> None:
        async with JSONLinesLedger(path, instance="a") as ledger:
            await ledger.finish(row)

    run(write(old))

    def upgrade(record: dict[str, object]) -> dict[str, object]:
        if record["type"] == "finish":
            row = dict(record["row"])  # type: ignore[call-overload]
            row["tokens"] += 1000  # what version 2 would have changed
            return {**record, "row": row}
        return record

    monkeypatch.setattr(lines_format, "JSONL_VERSION", 2)
    monkeypatch.setattr(lines_format, "UPGRADES", {1: upgrade})
    new = replace(make_row(), tokens=2, reason="complete", ended_at=T0)
    run(write(new))  # a version-2 writer appends a meta line before its own records

    async def read() -> list[UsageRow]:
        async with JSONLinesLedger(path, instance=None) as reader:
            return await reader.query()

    assert [row.tokens for row in run(read())] == [1001, 2]
    assert [record for record in records(path) if record["type"] == "meta"] == [
        {"type": "meta", "schema_version": 1},
        {"type": "meta", "schema_version": 2},
    ]
