"""Is jiffies coherent? Checks that tell a stale copy apart from a late tick. Pure functions over
readings that carry a guest-clock interval (anything with vcpu, node, jiffies, before_ns and
after_ns: a stream `Reading`, or a round probe's `JiffiesSample`), each returning a `CheckResult`.

Two different things make a vCPU's jiffies look "behind" its clock:
- *lag*: the tick that advances jiffies has not run yet (the vCPU that does it is off the host
  CPU, a GiantVM round is in flight). Every vCPU sees the same late value; nothing is incoherent.
- a *stale read*: a vCPU reads an older value than one another vCPU already read. This is what a
  stale DSM copy of jiffies does, and what a coherent memory never does.

`check_stale_reads` judges the second (linearizability of one variable), `check_lag` only reports
the first (judged against a generous bound, so a frozen timekeeper still fails),
`check_tick_count` says whether every tick was counted exactly once, and `check_monotonic` that no
vCPU ever sees jiffies go back.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from harness.stages.verdict import CheckResult

NS_PER_S = 1_000_000_000


class ReadingLike(Protocol):
    @property
    def vcpu(self) -> int: ...
    @property
    def node(self) -> int: ...
    @property
    def jiffies(self) -> int: ...
    @property
    def before_ns(self) -> int: ...
    @property
    def after_ns(self) -> int: ...


class DrainLike(Protocol):
    @property
    def node(self) -> int: ...
    @property
    def now_ns(self) -> int: ...
    @property
    def newest_after_ns(self) -> dict[int, int]: ...


def _describe(r: ReadingLike) -> str:
    return (f"vCPU {r.vcpu} (node {r.node}) read {r.jiffies} in "
            f"[{r.before_ns / NS_PER_S:.6f}, {r.after_ns / NS_PER_S:.6f}] s")


# ---------------------------------------------------------------------------------------------
# clocks of different nodes

@dataclass(frozen=True)
class ClockBounds:
    """`ahead[(a, b)]`: an upper bound, in ns, on how far node b's guest clock is ahead of node
    a's (clock_b - clock_a). A reading on node a that ended at after_ns is certainly over, in real
    time, before a reading on node b that began at before_ns if before_ns - after_ns > ahead[(a, b)].
    Within a node it is 0 (one clock). A pair that is missing has no known bound: readings across
    it are not compared, and the stale-read check says so."""

    ahead: dict[tuple[int, int], int]

    @classmethod
    def one_clock(cls, nodes: Iterable[int]) -> "ClockBounds":
        """Every node reads the same clock (one QEMU, whatever the config calls its nodes)."""
        nodes = list(nodes)
        return cls({(a, b): 0 for a in nodes for b in nodes})

    def bound(self, a: int, b: int) -> int | None:
        return 0 if a == b else self.ahead.get((a, b))


def measure_clock_bounds(readings: Sequence[ReadingLike],
                         drains: Sequence[DrainLike] = ()) -> ClockBounds:
    """Bounds on the differences between the nodes' guest clocks, measured from causality in the
    data, not assumed.

    The stream's reader, running on some vCPU x of node b, loads the ring heads and then reads its
    clock (`drain cpu=x now_ns=T`); every reading it then returns was written before that, so a
    reading of node a with end `after_ns` happened, in real time, before the reader's clock said
    T. With clock_n = real time + d_n: after_ns - d_a <= T - d_b, so

        d_b - d_a <= T - after_ns        for every reading of node a drained on node b.

    The smallest T - after_ns over all drains (the freshest reading a drain saw) is the bound: it
    is about one sampling period plus how long the reader took, and it only shrinks as the
    observation goes on. Same-node pairs are one clock (bound 0); a pair whose direction no drain
    covered (the reader never ran on that node) gets no bound. Round-probe samples have no drains:
    pass `ClockBounds.one_clock(...)` for one QEMU, or only same-node pairs are compared.
    """
    ahead: dict[tuple[int, int], int] = {}
    node_of = {r.vcpu: r.node for r in readings}
    for drain in drains:
        for vcpu, newest_after in drain.newest_after_ns.items():
            a = node_of.get(vcpu)
            if a is None or a == drain.node:
                continue
            gap = drain.now_ns - newest_after
            key = (a, drain.node)
            ahead[key] = min(ahead.get(key, gap), gap)
    return ClockBounds(ahead)


# ---------------------------------------------------------------------------------------------
# stale reads

def check_stale_reads(readings: Sequence[ReadingLike], hz: int, transport: str,
                      clocks: ClockBounds | None = None, node_bound_ticks: int = 1) -> CheckResult:
    """Linearizability of jiffies: a reading whose interval lies wholly after another reading's
    interval, on any vCPU, may not be lower by more than a bound: 0 ticks when both are on one
    node (one copy of the memory), `node_bound_ticks` (the contract's one round) between nodes,
    where "wholly after" also allows for the measured clock difference between the two nodes
    (`ClockBounds`, see `measure_clock_bounds`).

    A reading's interval is [before_ns, after_ns]: jiffies was read somewhere inside it, so a vCPU
    descheduled between its reads gets a wide interval that overlaps more readings and is compared
    with fewer; it cannot look stale because its clock was read late.

    For each reading the largest jiffies of every node's readings that ended before it began
    (a prefix maximum over readings sorted by end, found by bisection) is the only comparison that
    matters: O(n log n) per pair of nodes.
    """
    if not readings:
        return CheckResult("stale reads", transport, False, 0.0, "", "no readings")
    clocks = clocks or ClockBounds({})
    nodes = sorted({r.node for r in readings})
    by_end: dict[int, list[ReadingLike]] = {}
    ends: dict[int, list[int]] = {}
    prefix: dict[int, list[int]] = {}          # index of the max-jiffies reading so far
    for node in nodes:
        ordered = sorted((r for r in readings if r.node == node), key=lambda r: r.after_ns)
        best: list[int] = []
        for index, reading in enumerate(ordered):
            if not best or reading.jiffies > ordered[best[-1]].jiffies:
                best.append(index)
            else:
                best.append(best[-1])
        by_end[node], ends[node], prefix[node] = ordered, [r.after_ns for r in ordered], best

    unjudged = sorted((a, b) for a in nodes for b in nodes if clocks.bound(a, b) is None)
    worst_excess, worst_pair = -math.inf, None
    stale: list[tuple[ReadingLike, ReadingLike, int]] = []
    for later in readings:
        for node in nodes:
            bound_ns = clocks.bound(node, later.node)
            if bound_ns is None:
                continue
            # earlier readings of `node` certainly over before `later` began
            count = bisect.bisect_left(ends[node], later.before_ns - bound_ns)
            if count == 0:
                continue
            earlier = by_end[node][prefix[node][count - 1]]
            allowed = 0 if node == later.node else node_bound_ticks
            excess = earlier.jiffies - later.jiffies - allowed
            if excess > worst_excess:
                worst_excess, worst_pair = excess, (earlier, later)
            if excess > 0:
                stale.append((earlier, later, earlier.jiffies - later.jiffies))

    limit = ("0 ticks in a node" + (f", {node_bound_ticks} between nodes" if len(nodes) > 1
                                      else ""))
    if worst_pair is None:
        return CheckResult("stale reads", transport, True, 0.0, limit,
                           "no two readings were ordered in time" + _unjudged(unjudged, clocks))
    if not stale:
        return CheckResult("stale reads", transport, True, 0.0, limit,
                           f"no reading was below one wholly before it ({len(readings)} readings)"
                           + _clock_note(clocks, nodes) + _unjudged(unjudged, clocks))
    earlier, later, ticks = max(stale, key=lambda item: (item[2], -item[1].before_ns))
    stale_vcpus = sorted({item[1].vcpu for item in stale})
    first, last = min(s[1].before_ns for s in stale), max(s[1].after_ns for s in stale)
    detail = (f"{_describe(later)}, {ticks} tick(s) below {_describe(earlier)} whose interval "
              f"lies wholly before it; {len(stale)} stale reading(s) on vCPU(s) "
              f"{', '.join(map(str, stale_vcpus))} between {first / NS_PER_S:.3f} and "
              f"{last / NS_PER_S:.3f} s" + _clock_note(clocks, nodes)
              + _unjudged(unjudged, clocks))
    return CheckResult("stale reads", transport, False, float(ticks), limit, detail)


def _clock_note(clocks: ClockBounds, nodes: list[int]) -> str:
    pairs = [(a, b) for a in nodes for b in nodes if a != b and clocks.bound(a, b) is not None]
    if not pairs:
        return ""
    return "; clock bounds (node b ahead of node a by at most): " + ", ".join(
        f"{b} vs {a} {clocks.bound(a, b) / 1e6:+.3f} ms" for a, b in pairs)


def _unjudged(pairs: list[tuple[int, int]], clocks: ClockBounds) -> str:
    if not pairs:
        return ""
    return ("; NOT compared (no measured clock bound): " +
            ", ".join(f"node {a} before node {b}" for a, b in pairs))


# ---------------------------------------------------------------------------------------------
# monotonic per vCPU

def check_monotonic(readings: Sequence[ReadingLike], transport: str) -> CheckResult:
    """On each vCPU, jiffies never decreases: no reading is below one of the same vCPU whose
    interval ended before it began (its own clock orders them; overlapping intervals are not
    ordered)."""
    by_vcpu: dict[int, list[ReadingLike]] = defaultdict(list)
    for reading in readings:
        by_vcpu[reading.vcpu].append(reading)
    worst, detail = 0, "jiffies never decreased on any vCPU"
    for vcpu, series in sorted(by_vcpu.items()):
        series.sort(key=lambda r: r.after_ns)
        ends = [r.after_ns for r in series]
        best: list[int] = []
        for index, reading in enumerate(series):
            best.append(index if not best or reading.jiffies > series[best[-1]].jiffies
                        else best[-1])
        for later in series:
            count = bisect.bisect_left(ends, later.before_ns)
            if count == 0:
                continue
            earlier = series[best[count - 1]]
            step = later.jiffies - earlier.jiffies
            if step < worst:
                worst = step
                detail = f"vCPU {vcpu} went back: {_describe(earlier)}, then {_describe(later)}"
    return CheckResult("monotonic per vCPU", transport, worst >= 0, float(worst),
                       "no step below 0", detail)


# ---------------------------------------------------------------------------------------------
# lag: how far jiffies is behind the guest clock

def _phase_low(r: ReadingLike, hz: int) -> float:
    """jiffies minus the guest clock in ticks, at the latest moment the read can have happened:
    a lower bound of the reading's offset."""
    return r.jiffies - r.after_ns * hz / NS_PER_S


def _phase_high(r: ReadingLike, hz: int) -> float:
    return r.jiffies - r.before_ns * hz / NS_PER_S


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class LagStats:
    p50: float
    p99: float
    max: float
    count: int


def lag_ticks(readings: Sequence[ReadingLike], hz: int) -> list[tuple[ReadingLike, float]]:
    """Each reading's lag in ticks: how far its jiffies is behind a timekeeper that advanced
    jiffies right at every tick boundary.

    That ideal is jiffies = floor(clock * HZ + c); c is estimated as the largest lower-bound offset
    seen (jiffies - after_ns * HZ, maximised over all readings: the reading taken closest after a
    prompt tick). A reading's lag is then c - (jiffies - before_ns * HZ), taking the read as early
    as its interval allows (the most favourable), at least 0. A prompt timekeeper gives lags in
    [0, 1); lost ticks add to the lag from where they were lost on; a frozen timekeeper makes it
    grow without bound.
    """
    if not readings:
        return []
    c = max(_phase_low(r, hz) for r in readings)
    return [(r, max(0.0, c - _phase_high(r, hz))) for r in readings]


def lag_stats(readings: Sequence[ReadingLike], hz: int) -> dict[str, dict[int, LagStats]]:
    """p50/p99/max lag per vCPU and per node."""
    lags = lag_ticks(readings, hz)
    out: dict[str, dict[int, LagStats]] = {"vcpu": {}, "node": {}}
    for key, attribute in (("vcpu", "vcpu"), ("node", "node")):
        grouped: dict[int, list[float]] = defaultdict(list)
        for reading, lag in lags:
            grouped[getattr(reading, attribute)].append(lag)
        for ident, values in sorted(grouped.items()):
            out[key][ident] = LagStats(round(_percentile(values, 0.5), 3),
                                       round(_percentile(values, 0.99), 3),
                                       round(max(values), 3), len(values))
    return out


def check_lag(readings: Sequence[ReadingLike], hz: int, transport: str,
              max_lag_ticks: float) -> CheckResult:
    """Always reports the measured lag (p50/p99/max per node and per vCPU); fails only beyond a
    generous bound, so a host that keeps vCPUs off the CPU passes and a frozen timekeeper fails."""
    if not readings:
        return CheckResult("lag", transport, False, 0.0, f"<= {max_lag_ticks} ticks", "no readings")
    stats = lag_stats(readings, hz)
    worst = max(s.max for s in stats["node"].values())
    parts = [f"node {n}: p50 {s.p50:.2f} p99 {s.p99:.2f} max {s.max:.2f}"
             for n, s in stats["node"].items()]
    parts += [f"vCPU {v}: p50 {s.p50:.2f} p99 {s.p99:.2f} max {s.max:.2f}"
              for v, s in stats["vcpu"].items()]
    if worst > max_lag_ticks:
        reading, lag = max(lag_ticks(readings, hz), key=lambda item: item[1])
        parts.insert(0, f"largest: {_describe(reading)}, {lag:.1f} ticks behind the clock")
    return CheckResult("lag", transport, worst <= max_lag_ticks, round(worst, 2),
                       f"<= {max_lag_ticks:g} ticks", "; ".join(parts))


# ---------------------------------------------------------------------------------------------
# every tick counted exactly once

@dataclass(frozen=True)
class TickCount:
    ticks: int                 # jiffies advance between the two reference readings
    expected: float            # elapsed guest time between them x HZ
    difference: float          # ticks - expected, after the lag correction at both ends
    uncertainty_start: float   # how far the start estimate can be low, in ticks
    uncertainty_end: float
    slack: float

    @property
    def candidates(self) -> range:
        """Whole numbers of extra (positive) or missing (negative) ticks the data allows."""
        low = math.ceil(self.difference - self.uncertainty_start - self.slack)
        high = math.floor(self.difference + self.uncertainty_end + self.slack)
        return range(low, high + 1)


def _phase_uncertainty(window: Sequence[ReadingLike], hz: int) -> float:
    """How far below the true tick phase the best lower-bound offset of `window` can be, in ticks:
    the largest gap between the tick phases at which narrow readings (under 0.1 tick wide) were
    taken, plus 0.1 (some reading lands at most that gap after every tick boundary)."""
    narrow = sorted((r.before_ns * hz / NS_PER_S) % 1.0 for r in window
                    if (r.after_ns - r.before_ns) * hz / NS_PER_S < 0.1)
    if len(narrow) < 2:
        return 1.0
    gaps = [b - a for a, b in zip(narrow, narrow[1:])] + [narrow[0] + 1.0 - narrow[-1]]
    return min(1.0, max(gaps) + 0.1)


def tick_count(readings: Sequence[ReadingLike], hz: int, window_s: float = 1.0,
               slack_ticks: float = 0.25) -> TickCount | None:
    """The jiffies advance over the observation against the elapsed guest time x HZ.

    At each end (the first and last `window_s`, at most a tenth of the observation) the reading
    with the largest lower-bound offset (jiffies - after_ns x HZ) is the one least behind its tick:
    taking the difference of those two offsets removes the lag at both ends. A healthy guest gives
    a difference within each end's phase uncertainty (`_phase_uncertainty`, small when readings
    are dense) plus `slack_ticks` (the timekeeper's own delay varying between the ends); a lost
    tick gives about -1, a doubled one +1.
    """
    if len(readings) < 2:
        return None
    start_ns = min(r.before_ns for r in readings)
    end_ns = max(r.after_ns for r in readings)
    window_ns = min(window_s * NS_PER_S, (end_ns - start_ns) / 10)
    head = [r for r in readings if r.before_ns <= start_ns + window_ns]
    tail = [r for r in readings if r.after_ns >= end_ns - window_ns]
    first = max(head, key=lambda r: _phase_low(r, hz))
    last = max(tail, key=lambda r: _phase_low(r, hz))
    ticks = last.jiffies - first.jiffies
    expected = (last.after_ns - first.after_ns) * hz / NS_PER_S
    return TickCount(ticks, expected, ticks - expected, _phase_uncertainty(head, hz),
                     _phase_uncertainty(tail, hz), slack_ticks)


def check_tick_count(readings: Sequence[ReadingLike], hz: int, transport: str,
                     window_s: float = 1.0, slack_ticks: float = 0.25) -> CheckResult:
    limit = "0 ticks lost or doubled"
    count = tick_count(readings, hz, window_s, slack_ticks)
    if count is None:
        return CheckResult("ticks counted", transport, False, 0.0, limit, "fewer than 2 readings")
    candidates = list(count.candidates)
    described = (f"jiffies advanced {count.ticks} in {count.expected / hz:.3f} s of guest time, "
                 f"{count.expected:.2f} expected at HZ={hz} (difference {count.difference:+.2f}, "
                 f"ends known to -{count.uncertainty_start:.2f}/+{count.uncertainty_end:.2f} "
                 f"ticks, slack {count.slack:g})")
    if 0 in candidates:
        return CheckResult("ticks counted", transport, True, round(count.difference, 2), limit,
                           described + ("" if len(candidates) == 1 else
                                        f"; too few readings to rule out {candidates}"))
    nearest = min(candidates, key=abs) if candidates else round(count.difference)
    what = (f"{-nearest} tick(s) lost" if nearest < 0 else f"{nearest} tick(s) doubled")
    return CheckResult("ticks counted", transport, False, round(count.difference, 2), limit,
                       f"{what}: {described}")


# ---------------------------------------------------------------------------------------------

def check_coherence(readings: Sequence[ReadingLike], hz: int, transport: str, max_lag_ticks: float,
                    clocks: ClockBounds | None = None, node_bound_ticks: int = 1
                    ) -> list[CheckResult]:
    """The four checks in the order a verdict lists them."""
    return [check_stale_reads(readings, hz, transport, clocks, node_bound_ticks),
            check_monotonic(readings, transport),
            check_tick_count(readings, hz, transport),
            check_lag(readings, hz, transport, max_lag_ticks)]
