"""Is jiffies coherent across vCPUs and nodes? Pure functions over samples, so synthetic input can
prove each check fails when it should.

A vCPU's reading is compared through its *offset*: jiffies minus the guest clock in ticks, taken on
the same CPU at the same moment. Reads on different vCPUs happen at different times (taskset, the
transport), but a coherent jiffies gives the same offset everywhere, within a tick or so.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

from harness.config import CheckConfig
from harness.stages.probe import JiffiesSample

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class CheckResult:
    name: str
    transport: str
    passed: bool
    measured: float
    limit: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    checks: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


def offset_ticks(sample: JiffiesSample, hz: int) -> float:
    return sample.jiffies - sample.guest_ns * hz / NS_PER_S


def check_samples(samples: list[JiffiesSample], hz: int, limits: CheckConfig) -> Verdict:
    by_transport: dict[str, list[JiffiesSample]] = defaultdict(list)
    for sample in samples:
        by_transport[sample.transport].append(sample)
    checks: list[CheckResult] = []
    for transport, group in sorted(by_transport.items()):
        checks += [
            check_monotonic(group, transport),
            check_vcpu_skew(group, transport, hz, limits.max_skew_ticks),
            check_rate_guest_clock(group, transport, hz, limits.rate_tolerance),
        ]
        if limits.rate_vs_host_clock:
            checks.append(check_rate_host_clock(group, transport, hz, limits.rate_tolerance))
        if len({sample.node for sample in group}) > 1:
            checks.append(check_node_skew(group, transport, hz, limits.max_node_skew_ticks))
    return Verdict(checks=tuple(checks))


def _by_vcpu(samples: list[JiffiesSample]) -> dict[int, list[JiffiesSample]]:
    grouped: dict[int, list[JiffiesSample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: (s.round, s.host_ns)):
        grouped[sample.vcpu].append(sample)
    return grouped


def _by_round(samples: list[JiffiesSample]) -> dict[int, list[JiffiesSample]]:
    grouped: dict[int, list[JiffiesSample]] = defaultdict(list)
    for sample in samples:
        grouped[sample.round].append(sample)
    return grouped


def check_monotonic(samples: list[JiffiesSample], transport: str) -> CheckResult:
    worst = 0
    detail = "jiffies never decreased on any vCPU"
    for vcpu, series in sorted(_by_vcpu(samples).items()):
        for earlier, later in zip(series, series[1:]):
            step = later.jiffies - earlier.jiffies
            if step < worst:
                worst = step
                detail = (f"vCPU {vcpu} went back from {earlier.jiffies} (round {earlier.round}) "
                          f"to {later.jiffies} (round {later.round})")
    return CheckResult("monotonic per vCPU", transport, worst >= 0, float(worst),
                       "no step below 0", detail)


def vcpu_skews(samples: list[JiffiesSample], hz: int) -> list[tuple[JiffiesSample, float]]:
    """Each sample's offset minus the median offset of its round, in ticks."""
    skews = []
    for round_samples in _by_round(samples).values():
        median = statistics.median(offset_ticks(s, hz) for s in round_samples)
        skews += [(s, offset_ticks(s, hz) - median) for s in round_samples]
    return skews


def check_vcpu_skew(samples: list[JiffiesSample], transport: str, hz: int,
                    max_ticks: int) -> CheckResult:
    sample, skew = max(vcpu_skews(samples, hz), key=lambda item: abs(item[1]))
    return CheckResult("cross-vCPU skew", transport, abs(skew) <= max_ticks, round(abs(skew), 2),
                       f"<= {max_ticks} ticks",
                       f"largest on vCPU {sample.vcpu} in round {sample.round}: {skew:+.2f} ticks")


def check_node_skew(samples: list[JiffiesSample], transport: str, hz: int,
                    max_ticks: int) -> CheckResult:
    worst = 0.0
    detail = ""
    for round_index, round_samples in sorted(_by_round(samples).items()):
        per_node: dict[int, list[float]] = defaultdict(list)
        for sample in round_samples:
            per_node[sample.node].append(offset_ticks(sample, hz))
        medians = {node: statistics.median(values) for node, values in per_node.items()}
        spread = max(medians.values()) - min(medians.values())
        if spread >= worst:
            worst = spread
            high = max(medians, key=medians.__getitem__)
            low = min(medians, key=medians.__getitem__)
            detail = f"round {round_index}: node {high} ahead of node {low} by {spread:.2f} ticks"
    return CheckResult("cross-node skew", transport, worst <= max_ticks, round(worst, 2),
                       f"<= {max_ticks} ticks", detail)


def _rate_result(name: str, transport: str, rate: float, hz: int, tolerance: float,
                 detail: str) -> CheckResult:
    low, high = hz * (1 - tolerance), hz * (1 + tolerance)
    return CheckResult(name, transport, low <= rate <= high, round(rate, 2),
                       f"{low:.1f}..{high:.1f} ticks/s", detail)


def check_rate_guest_clock(samples: list[JiffiesSample], transport: str, hz: int,
                           tolerance: float) -> CheckResult:
    worst_rate, worst_vcpu = float(hz), -1
    for vcpu, series in sorted(_by_vcpu(samples).items()):
        elapsed_ns = series[-1].guest_ns - series[0].guest_ns
        rate = (series[-1].jiffies - series[0].jiffies) * NS_PER_S / elapsed_ns \
            if elapsed_ns > 0 else 0.0
        if abs(rate - hz) >= abs(worst_rate - hz):
            worst_rate, worst_vcpu = rate, vcpu
    return _rate_result("rate vs guest clock", transport, worst_rate, hz, tolerance,
                        f"furthest from CONFIG_HZ={hz}: vCPU {worst_vcpu}")


def check_rate_host_clock(samples: list[JiffiesSample], transport: str, hz: int,
                          tolerance: float) -> CheckResult:
    rounds = _by_round(samples)
    first, last = rounds[min(rounds)], rounds[max(rounds)]
    elapsed_ns = statistics.mean(s.host_ns for s in last) - statistics.mean(s.host_ns for s in first)
    ticks = statistics.mean(s.jiffies for s in last) - statistics.mean(s.jiffies for s in first)
    rate = ticks * NS_PER_S / elapsed_ns if elapsed_ns > 0 else 0.0
    return _rate_result("rate vs host clock", transport, rate, hz, tolerance,
                        f"{ticks:.0f} ticks in {elapsed_ns / NS_PER_S:.2f}s of host time")
