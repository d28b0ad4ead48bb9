"""Sample jiffies as every vCPU sees it, over any transport that can run a shell command.

With the guest series' probe, one read of /proc/gvm_jiffies has every CPU read its clock, jiffies
and its clock again at once: `cpu=<n> jiffies=<u64> before_ns=<u64> after_ns=<u64>`, a reading with
the guest-clock interval it was taken in. Without it, each CPU is visited with `taskset -c N`
reading /proc/timer_list, whose header carries the reading CPU's clock ("now at N nsecs") and whose
first `jiffies:` line is the global jiffies as that CPU reads it; that one timestamp is both ends of
the interval. Both print the same line format, so one parser serves both. Lines of the older probe
(`cpu=<n> jiffies=<u64> ktime_ns=<u64>`, one timestamp taken after jiffies) are read the same way.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Protocol

from harness.transport.exec import CommandResult
from harness.errors import ProbeError

KERNEL_PROBE = "/proc/gvm_jiffies"
_LINE = re.compile(r"^cpu=(\d+) jiffies=(\d+) "
                   r"(?:before_ns=(\d+) after_ns=(\d+)|ktime_ns=(\d+))$")
LINE_FORMAT = "cpu=<n> jiffies=<n> before_ns=<n> after_ns=<n>"


class CommandRunner(Protocol):
    def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        ...


@dataclass(frozen=True)
class JiffiesSample:
    """One vCPU's reading in one round. The guest read its clock (before_ns), jiffies, and its
    clock again (after_ns); guest_ns is the interval's midpoint (the one timestamp the older checks
    use). Built without an interval, before_ns and after_ns are both guest_ns."""

    transport: str
    method: str
    round: int
    vcpu: int
    node: int
    jiffies: int
    guest_ns: int
    host_ns: int
    before_ns: int | None = None
    after_ns: int | None = None

    def __post_init__(self) -> None:
        if self.before_ns is None:
            object.__setattr__(self, "before_ns", self.guest_ns)
        if self.after_ns is None:
            object.__setattr__(self, "after_ns", self.guest_ns)

    def to_dict(self) -> dict:
        return asdict(self)


class ProbeRow(NamedTuple):
    vcpu: int
    jiffies: int
    before_ns: int
    after_ns: int

    @property
    def guest_ns(self) -> int:
        return (self.before_ns + self.after_ns) // 2


def parse_reading_line(line: str) -> ProbeRow | None:
    """One `cpu=... jiffies=...` line (either probe format), or None if it is not one."""
    match = _LINE.match(line.strip())
    if not match:
        return None
    vcpu, jiffies, before, after, single = match.groups()
    if single is not None:
        before = after = single
    return ProbeRow(int(vcpu), int(jiffies), int(before), int(after))


def fallback_command(vcpus: int) -> str:
    """One shell command that visits every vCPU with taskset; prints the kernel probe's format."""
    awk = ("'/^now at/ {now=$3} /^jiffies:/ "
           "{print \"jiffies=\" $2 \" before_ns=\" now \" after_ns=\" now; exit}'")
    return (f"for c in $(seq 0 {vcpus - 1}); do printf 'cpu=%s ' $c; "
            f"taskset -c $c awk {awk} /proc/timer_list; done")


def parse_probe_output(text: str, expected_vcpus: int) -> list[ProbeRow]:
    """(vcpu, jiffies, before_ns, after_ns) per line; every vCPU exactly once, else ProbeError."""
    rows = []
    for line in text.splitlines():
        row = parse_reading_line(line)
        if row is None:
            raise ProbeError(f"unexpected probe line {line!r}; expected '{LINE_FORMAT}'")
        rows.append(row)
    seen = sorted(row.vcpu for row in rows)
    if seen != list(range(expected_vcpus)):
        raise ProbeError(f"the probe returned vCPUs {seen}, expected 0..{expected_vcpus - 1} "
                         "once each (are all vCPUs online?)")
    return rows


class JiffiesProbe:
    def __init__(self, runner: CommandRunner, transport: str, vcpus: int, vcpus_per_node: int):
        self.runner = runner
        self.transport = transport
        self.vcpus = vcpus
        self.vcpus_per_node = vcpus_per_node
        has_kernel_probe = runner.run(f"test -r {KERNEL_PROBE}").exit_status == 0
        self.method = "kernel-probe" if has_kernel_probe else "taskset-timer_list"
        self.command = f"cat {KERNEL_PROBE}" if has_kernel_probe else fallback_command(vcpus)

    def sample(self, rounds: int, interval_s: float,
               on_round: Callable[[int], None] = lambda done: None) -> list[JiffiesSample]:
        """`rounds` readings of every vCPU, `interval_s` apart; `on_round(done)` after each."""
        samples = []
        for round_index in range(rounds):
            before = time.monotonic_ns()
            result = self.runner.run(self.command)
            after = time.monotonic_ns()
            if result.exit_status != 0:
                raise ProbeError(f"`{self.command}` over {self.transport} exited with "
                                 f"{result.exit_status}: {result.output[-300:]}")
            for row in parse_probe_output(result.output, self.vcpus):
                samples.append(JiffiesSample(
                    transport=self.transport, method=self.method, round=round_index,
                    vcpu=row.vcpu, node=row.vcpu // self.vcpus_per_node, jiffies=row.jiffies,
                    guest_ns=row.guest_ns, host_ns=(before + after) // 2,
                    before_ns=row.before_ns, after_ns=row.after_ns))
            on_round(round_index + 1)
            if round_index + 1 < rounds:
                time.sleep(interval_s)
        return samples
