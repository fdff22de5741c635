"""bench/run.py runs end to end on a tiny load. The benchmark itself is not part of the
suite; this only proves the one command still starts, measures, cleans up and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

RUN = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def run_bench(tmp_path: Path, *args: str, timeout: float = 90) -> tuple[str, dict[str, Any]]:
    """`bench/run.py ARGS`, which must succeed: its stdout and its JSON document."""
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(RUN), *args, f"--json={results}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(results.read_text())
    return done.stdout, document


def test_bench_runs_on_a_tiny_load(tmp_path: Path) -> None:
    stdout, document = run_bench(
        tmp_path,
        "--quick",
        "--only=sserelay,floor",  # no optional deps, no Go toolchain
        "--figures=throughput,latency",
        "--lines=2000",
        "--latency-lines=50",
        timeout=60,
    )
    assert "throughput, events/s" in stdout
    figures = document["figures"]
    assert set(figures) == {"throughput", "latency"}
    for name in ("sserelay", "floor"):
        assert figures["throughput"][name]["metrics"]["events_per_s"] > 0, figures
        assert figures["latency"][name]["metrics"]["p99_ms"] > 0, figures
    assert {row["metric"] for row in document["rows"]} >= {"events_per_s", "p99_ms"}


def test_bench_capacity_figures_run_on_a_tiny_load(tmp_path: Path) -> None:
    """The proxy capacity figure (sserelay and the direct floor: no nginx needed) and the
    fan-out figure in its 10k form, both with a handful of clients."""
    stdout, document = run_bench(
        tmp_path,
        "--only=sserelay,floor,direct",
        "--figures=capacity,fanout10k",
        "--streams=5",
        "--capacity-warmup=0.3",
        "--capacity-window=0.7",
        "--fanout10k-clients=20",
        "--fanout10k-seconds=0.5",
    )
    assert "N=5: added delay p99, ms" in stdout
    figures = document["figures"]
    assert set(figures) == {"capacity", "fanout10k"}
    for name in ("sserelay", "direct"):
        metrics = figures["capacity"][name]["metrics"]
        assert metrics["n5_events_per_s"] > 0, figures
        assert metrics["n5_delay_p99_ms"] > 0, figures
    assert figures["capacity"]["sserelay"]["metrics"]["n5_us_per_event"] > 0, figures
    for name in ("sserelay", "floor"):
        assert figures["fanout10k"][name]["metrics"]["delivered_pct"] > 99, figures


def test_bench_tokenizers_figure_runs_on_a_tiny_load(tmp_path: Path) -> None:
    """serve's throughput per tokenizer (o200k_base with tiktoken, pure, whitespace)."""
    stdout, document = run_bench(
        tmp_path, "--quick", "--figures=tokenizers,overheads", "--lines=2000"
    )
    assert "serve throughput (unique lines), events/s" in stdout
    figures = document["figures"]
    for name in ("o200k_base", "o200k_base pure", "whitespace"):
        assert figures["tokenizers"][name]["metrics"]["events_per_s"] > 0, figures
