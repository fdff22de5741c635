"""Write stamped lines at a fixed rate to stdout: the live source of the latency
and fan-out figures.

    python bench/producer.py --rate 1000 --count 2000 | <server reading stdin>

Each line is `SEQ MONOTONIC_NS`, stamped just before its own write(2), one
write per line so the pipe never batches what the producer did not. It waits
for one line on stdin (the bench's "clients are connected"; EOF instead calls
the run off) and paces against absolute deadlines, so a late wake-up does not
drift the rate. A separate process, so the client's work never delays a write.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, required=True, help="lines per second")
    parser.add_argument("--count", type=int, required=True, help="lines to write")
    parser.add_argument("--no-wait", action="store_true", help="start at once")
    args = parser.parse_args()
    if not args.no_wait and not sys.stdin.buffer.readline():
        return  # the gate closed without a "go": the run was called off
    period_ns = int(1e9 / args.rate)
    out = sys.stdout.fileno()
    start = time.monotonic_ns()
    try:
        for seq in range(args.count):
            delay = start + seq * period_ns - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            os.write(out, f"{seq} {time.monotonic_ns()}\n".encode())
    except BrokenPipeError:  # the server went away: nothing left to feed
        pass


if __name__ == "__main__":
    main()
