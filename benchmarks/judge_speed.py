"""Benchmark: how long the coherence checks take on a long stream: a minute of 4 vCPUs at 1000
readings per second (240 000 readings, the model guest of tests/unit/stages/test_coherence.py),
each check timed on its own, --repeat times, median. A run judges 20-30 s at 500/s, a fraction
of this. Prints a table; asserts nothing.

Usage: .venv/bin/python benchmarks/judge_speed.py [--seconds 60] [--rate 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.stages.coherence import (
    ClockBounds,
    check_lag,
    check_monotonic,
    check_stale_reads,
    check_tick_count,
)
from tests.unit.stages.test_coherence import HZ, Guest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    readings = Guest(seconds=args.seconds, rate=args.rate, jitter_ns=100_000).readings()
    clocks = ClockBounds.one_clock([0, 1])
    checks = {"stale reads": lambda: check_stale_reads(readings, HZ, "s", clocks),
              "monotonic per vCPU": lambda: check_monotonic(readings, "s"),
              "ticks counted": lambda: check_tick_count(readings, HZ, "s"),
              "lag": lambda: check_lag(readings, HZ, "s", 50)}
    print(f"{len(readings)} readings ({args.seconds:g} s x 4 vCPUs x {args.rate}/s), "
          f"load average {os.getloadavg()[0]:.1f}")
    total = 0.0
    for name, check in checks.items():
        times = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            result = check()
            times.append(time.perf_counter() - began)
        total += statistics.median(times)
        print(f"  {name:20s} {statistics.median(times):6.2f} s  "
              f"({'PASS' if result.passed else 'FAIL'})")
    print(f"  {'all four':20s} {total:6.2f} s")


if __name__ == "__main__":
    main()
