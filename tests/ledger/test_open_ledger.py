"""open_ledger() picks a backend by its target; default_ledger_path() follows XDG."""

from __future__ import annotations

from pathlib import Path

import pytest

from sserelay.errors import SSERelayError
from sserelay.ledger import (
    JSONLinesLedger,
    Ledger,
    LedgerError,
    SQLiteLedger,
    default_ledger_path,
    open_ledger,
)
from sserelay.ledger.postgres import PostgresLedger
from tests.ledger.conftest import run


@pytest.mark.parametrize(
    ("target", "kind", "display"),
    [
        ("postgresql://u:pw@h/db", PostgresLedger, "postgresql://u:***@h/db"),
        ("postgres://h/db", PostgresLedger, "postgres://h/db"),
        ("/var/lib/sserelay/usage.jsonl", JSONLinesLedger, "/var/lib/sserelay/usage.jsonl"),
        ("/var/lib/sserelay/usage.db", SQLiteLedger, "/var/lib/sserelay/usage.db"),
        ("usage.sqlite3", SQLiteLedger, "usage.sqlite3"),
        ("usage.jsonl.bak", SQLiteLedger, "usage.jsonl.bak"),
    ],
)
def test_the_target_picks_the_backend(target: str, kind: type, display: str) -> None:
    ledger = open_ledger(target, instance="a")
    assert isinstance(ledger, kind)
    assert ledger.display == display
    assert ledger.instance == "a"


def test_every_backend_is_a_ledger_to_mypy() -> None:
    ledgers: list[Ledger] = [
        open_ledger(target, instance="a") for target in ("a.db", "a.jsonl", "postgres://h/d")
    ]
    assert len({type(ledger) for ledger in ledgers}) == 3


def test_a_home_path_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_ledger("~/ledger/usage.db", instance=None).display == str(
        tmp_path / "ledger" / "usage.db"
    )


def test_an_empty_target_is_refused() -> None:
    with pytest.raises(LedgerError, match="empty"):
        open_ledger("  ", instance="a")
    assert issubclass(LedgerError, SSERelayError)


def test_the_default_path_follows_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_ledger_path() == tmp_path / "state" / "sserelay" / "usage.db"
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("XDG_STATE_HOME")
        else:
            monkeypatch.setenv("XDG_STATE_HOME", unset)
        monkeypatch.setenv("HOME", str(tmp_path))
        assert default_ledger_path() == tmp_path / ".local" / "state" / "sserelay" / "usage.db"


def test_the_default_path_is_created_on_first_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    async def scenario() -> None:
        async with open_ledger(default_ledger_path(), instance="a"):
            pass

    run(scenario())
    assert default_ledger_path().is_file()
