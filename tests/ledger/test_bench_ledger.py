"""bench/ledger.py runs end to end on a tiny load (the figures themselves are not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ledger.py"


def test_the_ledger_bench_runs_on_a_tiny_load(tmp_path: Path) -> None:
    results = tmp_path / "ledger.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--requests=200",
            "--batch=20",
            "--single=20",
            "--checkpoint=100",
            "--no-postgres",  # the PostgreSQL path is the tests' own server; skip its initdb
            f"--json={results}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "batched req/s" in done.stdout
    figures = json.loads(results.read_text())
    assert set(figures) == {"sqlite", "jsonl"}
    for backend in figures.values():
        assert backend["batched_requests_per_s"] > 0
        assert backend["checkpoint_ms"] > 0
