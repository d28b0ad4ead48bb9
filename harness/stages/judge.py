"""The jiffies verdict: the coherence checks (stages/coherence.py) over every transport's round
probe and over the continuous stream, plus the tick rate against this machine's clock where the
guest's clock follows it. Pure functions, so synthetic readings prove each check fails when it
should.

Which clocks can be compared: inside one QEMU every vCPU reads the same guest clock, whatever the
config calls its nodes (`one_clock`); between GiantVM nodes the bounds come from the stream's
drain lines (measured, not assumed), and the round probe compares readings of one node only.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Sequence

from harness.config import CheckConfig
from harness.stages.coherence import ClockBounds, check_coherence, measure_clock_bounds
from harness.stages.probe import JiffiesSample
from harness.stages.stream import StreamResult
from harness.stages.verdict import CheckResult, Verdict

NS_PER_S = 1_000_000_000
STREAM = "ssh-stream"
TICKS_COUNTED = "ticks counted"
ATOMIC_INC_ENABLED = "ATOMIC_INC: enabled"


def clocks_for(readings: Sequence, drains: Sequence, one_clock: bool) -> ClockBounds:
    nodes = {reading.node for reading in readings}
    return ClockBounds.one_clock(nodes) if one_clock else measure_clock_bounds(readings, drains)


def check_samples(samples: list[JiffiesSample], hz: int, limits: CheckConfig,
                  one_clock: bool = True, count_ticks: bool = True) -> Verdict:
    """Every transport's round-probe samples, judged on their own. `count_ticks=False` where
    the stream counts them: a few rounds know their ends only to about a tick, every tick of
    the stream to a fraction of one."""
    by_transport: dict[str, list[JiffiesSample]] = defaultdict(list)
    for sample in samples:
        by_transport[sample.transport].append(sample)
    checks: list[CheckResult] = []
    for transport, group in sorted(by_transport.items()):
        checks += [check for check in check_coherence(
            group, hz, transport, limits.max_lag_s * hz, clocks_for(group, (), one_clock),
            limits.node_bound_ticks) if count_ticks or check.name != TICKS_COUNTED]
        if limits.rate_vs_host_clock:
            checks.append(check_rate_host_clock(group, transport, hz, limits.rate_tolerance))
    return Verdict(tuple(checks))


def check_stream(stream: StreamResult, hz: int, limits: CheckConfig,
                 one_clock: bool = True) -> list[CheckResult]:
    """The continuous stream: every tick on every vCPU for the whole observation."""
    if not stream.readings:
        return [CheckResult("stream readings", STREAM, False, 0.0, "at least one reading",
                            f"the stream gave no reading ({len(stream.unparsed)} unparsed lines)")]
    return check_coherence(stream.readings, hz, STREAM, limits.max_lag_s * hz,
                           clocks_for(stream.readings, stream.drains, one_clock),
                           limits.node_bound_ticks)


def check_rate_host_clock(samples: list[JiffiesSample], transport: str, hz: int,
                          tolerance: float) -> CheckResult:
    """jiffies per second of this machine's time, between the first and the last round."""
    rounds: dict[int, list[JiffiesSample]] = defaultdict(list)
    for sample in samples:
        rounds[sample.round].append(sample)
    first, last = rounds[min(rounds)], rounds[max(rounds)]
    elapsed_ns = statistics.mean(s.host_ns for s in last) - statistics.mean(s.host_ns for s in first)
    ticks = statistics.mean(s.jiffies for s in last) - statistics.mean(s.jiffies for s in first)
    rate = ticks * NS_PER_S / elapsed_ns if elapsed_ns > 0 else 0.0
    low, high = hz * (1 - tolerance), hz * (1 + tolerance)
    return CheckResult("rate vs host clock", transport, low <= rate <= high, round(rate, 2),
                       f"{low:.1f}..{high:.1f} ticks/s",
                       f"{ticks:.0f} ticks in {elapsed_ns / NS_PER_S:.2f}s of host time")


def check_atomic_inc_stayed_on(lines: Sequence[str], mode: str | None) -> list[CheckResult]:
    """With a host kvm of ours set to a method (`mode`) and a guest that switched ATOMIC_INC
    on, every tick must have gone through the protocol: a guest that turned it off (a round
    that failed, or returned 0 before its value was stored) keeps jiffies coherent by page
    faults, and a PASS of the coherence checks would then say nothing about ATOMIC_INC. Not a
    check where the guest never switched it on (its command line, or no DSM to ask)."""
    if mode is None or not lines or lines[0] != ATOMIC_INC_ENABLED:
        return []
    turned_off = [line for line in lines[1:] if "disabled" in line]
    return [CheckResult("ATOMIC_INC stayed on", "console", not turned_off,
                        float(len(turned_off)), "no 'ATOMIC_INC: disabled' after enabled",
                        turned_off[0] if turned_off else f"method {mode}: every tick used it")]
