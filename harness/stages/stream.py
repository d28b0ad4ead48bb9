"""Continuous sampling: read the guest series' /proc/gvm_jiffies_stream for a while, parse it.

While the file is open, a pinned hrtimer on every online vCPU takes a reading `rate_hz` times a
second into that vCPU's ring (no IPI per reading); reading the file drains the rings. The lines:

    drain cpu=<x> now_ns=<u64>                            one per read() in the guest, first
    cpu=<n> jiffies=<u64> before_ns=<u64> after_ns=<u64>  a reading with its guest-clock interval
    <+-jiffies delta> <before_ns delta> <width_ns>        the next reading of the same CPU, as
                                                          deltas from the reading line before it
    lost=<n> cpu=<c>                                      readings dropped on CPU c (its ring was full)

(The delta lines carry a quarter of the bytes: the SSH transport was most of the sampler's guest
CPU share, benchmarks/stream_sampler.py. A series without them sends full lines only.)

Every reading after a `drain` line (up to the next one) was written before `now_ns` on CPU x's
clock: `harness.stages.coherence.measure_clock_bounds` turns that into bounds on the clock
differences between nodes. Closing the file (ending `cat`, closing the channel) stops the timers.

This module does not open anything: `read_stream` takes an already-open `LineSource` (any
iterable of text lines, e.g. `channel.makefile("r")` of an SSH exec of `stream_command()`, or the
lines of a serial console) and reads it for `duration_s`. The source must keep yielding (the guest
sends a batch of lines every ~100 ms while sampling); the window is checked after every line.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

from harness.stages.probe import parse_reading_line

STREAM_FILE = "/proc/gvm_jiffies_stream"
RATE_PARAMETER = "/sys/module/gvm_jiffies/parameters/stream_hz"
PAGE_WRITER_FILE = "/proc/gvm_jiffies_page_writer"
NS_PER_S = 1_000_000_000

_DRAIN = re.compile(r"^drain cpu=(\d+) now_ns=(\d+)$")
_LOST = re.compile(r"^lost=(\d+)(?: cpu=(\d+))?$")
_DELTA = re.compile(r"^([+-]\d+) (\d+) (\d+)$")


class LineSource(Protocol):
    """Text lines, newline or not, as they arrive; iteration ends when the source closes."""

    def __iter__(self) -> Iterator[str]:
        ...


@dataclass(frozen=True)
class Reading:
    """One vCPU's reading: jiffies read between two reads of that vCPU's guest clock."""

    vcpu: int
    node: int
    jiffies: int
    before_ns: int
    after_ns: int

    @property
    def width_ns(self) -> int:
        return self.after_ns - self.before_ns


@dataclass(frozen=True)
class Drain:
    """The guest's reader on `vcpu` saw, at `now_ns` (its clock), readings up to `newest_after_ns`
    (the largest after_ns per vCPU among the readings that this drain returned)."""

    vcpu: int
    node: int
    now_ns: int
    newest_after_ns: dict[int, int]


@dataclass
class StreamResult:
    readings: list[Reading] = field(default_factory=list)
    drains: list[Drain] = field(default_factory=list)
    lost: dict[int, int] = field(default_factory=dict)      # vCPU -> readings dropped in guest
    unparsed: list[str] = field(default_factory=list)       # lines that were none of the above
    host_elapsed_s: float = 0.0
    workloads: tuple[str, ...] = ()  # what ran meanwhile, as workloads.report names it

    def readings_per_s(self) -> dict[int, float]:
        """Readings per second of guest time, per vCPU (first reading to last)."""
        by_vcpu: dict[int, list[Reading]] = defaultdict(list)
        for reading in self.readings:
            by_vcpu[reading.vcpu].append(reading)
        rates = {}
        for vcpu, readings in sorted(by_vcpu.items()):
            span_ns = max(r.after_ns for r in readings) - min(r.before_ns for r in readings)
            rates[vcpu] = (len(readings) - 1) * NS_PER_S / span_ns if span_ns > 0 else 0.0
        return rates

    def summary(self) -> dict:
        counts = Counter(r.vcpu for r in self.readings)
        return {"readings": len(self.readings), "drains": len(self.drains),
                "host_elapsed_s": round(self.host_elapsed_s, 3),
                "per_vcpu": {vcpu: {"readings": counts[vcpu],
                                    "readings_per_s": round(rate, 1),
                                    "lost": self.lost.get(vcpu, 0)}
                             for vcpu, rate in self.readings_per_s().items()},
                "lost_total": sum(self.lost.values()), "unparsed_lines": len(self.unparsed)}

    def to_dict(self) -> dict:
        return {"readings": [asdict(r) for r in self.readings],
                "drains": [asdict(d) for d in self.drains], "lost": self.lost,
                "unparsed": self.unparsed, "host_elapsed_s": self.host_elapsed_s,
                "workloads": list(self.workloads)}


def stream_command(rate_hz: int | None = None, max_s: float | None = None) -> str:
    """The guest shell command that streams (set the rate first if given). `exec` so that Ctrl-C
    on the channel's pty ends `cat` itself, which closes the file and stops the timers; with
    `max_s`, busybox `timeout` also ends it after that long, whatever happens to the channel."""
    rate = f"echo {int(rate_hz)} > {RATE_PARAMETER} && " if rate_hz else ""
    limit = f"timeout -s INT {max(1, int(max_s + 0.999))} " if max_s else ""
    return f"{rate}exec {limit}cat {STREAM_FILE}"


def page_writer_command(period_us: int, vcpu: int | None = None) -> str:
    """Start (period_us > 0) or stop (0) the guest's jiffies-page writer."""
    target = f"{int(period_us)}" + (f" {int(vcpu)}" if vcpu is not None else "")
    return f"echo '{target}' > {PAGE_WRITER_FILE}"


class StreamParser:
    """Line by line; keeps what it has seen. Unknown lines (a kernel message on a serial console)
    are kept in `unparsed`, not fatal: the checks count what is there."""

    def __init__(self, vcpus_per_node: int):
        self.vcpus_per_node = max(1, vcpus_per_node)
        self.result = StreamResult()
        self._drain: tuple[int, int] | None = None
        self._newest: dict[int, int] = {}
        self._last: Reading | None = None  # what the next delta line is relative to

    def node(self, vcpu: int) -> int:
        return vcpu // self.vcpus_per_node

    def feed(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        row = parse_reading_line(line)
        if row is not None:
            self._add(Reading(row.vcpu, self.node(row.vcpu), row.jiffies, row.before_ns,
                              row.after_ns))
            return
        match = _DELTA.match(line)
        if match and self._last is not None:
            last = self._last
            before = last.before_ns + int(match.group(2))
            self._add(Reading(last.vcpu, last.node, last.jiffies + int(match.group(1)), before,
                              before + int(match.group(3))))
            return
        match = _DRAIN.match(line)
        if match:
            self._close_drain()
            self._drain = (int(match.group(1)), int(match.group(2)))
            return
        match = _LOST.match(line)
        if match:
            vcpu = int(match.group(2)) if match.group(2) is not None else -1
            self.result.lost[vcpu] = self.result.lost.get(vcpu, 0) + int(match.group(1))
            return
        self.result.unparsed.append(line)

    def _add(self, reading: Reading) -> None:
        self.result.readings.append(reading)
        self._last = reading
        if self._drain is not None:
            self._newest[reading.vcpu] = max(self._newest.get(reading.vcpu, 0), reading.after_ns)

    def _close_drain(self) -> None:
        if self._drain is not None and self._newest:
            vcpu, now_ns = self._drain
            self.result.drains.append(Drain(vcpu, self.node(vcpu), now_ns, dict(self._newest)))
        self._drain = None
        self._newest = {}
        self._last = None

    def finish(self) -> StreamResult:
        self._close_drain()
        return self.result


def parse_stream(lines: Iterable[str], vcpus_per_node: int) -> StreamResult:
    parser = StreamParser(vcpus_per_node)
    for line in lines:
        parser.feed(line)
    return parser.finish()


def read_stream(source: LineSource, duration_s: float, vcpus_per_node: int,
                clock: Callable[[], float] = time.monotonic) -> StreamResult:
    """Read `source` until `duration_s` of host time has passed (or it ends), parse as it goes.
    Closing the source afterwards is the caller's job (that is what stops the guest's timers)."""
    parser = StreamParser(vcpus_per_node)
    start = clock()
    for line in source:
        parser.feed(line)
        if clock() - start >= duration_s:
            break
    result = parser.finish()
    result.host_elapsed_s = clock() - start
    return result
