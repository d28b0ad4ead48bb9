"""Sample jiffies as every vCPU sees it, over any transport that can run a shell command.

With the guest series' probe, one read of /proc/gvm_jiffies has every CPU read jiffies and its
clock at once. Without it, each CPU is visited with `taskset -c N` reading /proc/timer_list, whose
header carries the reading CPU's clock ("now at N nsecs") and whose first `jiffies:` line is the
global jiffies as that CPU reads it. Both print the same line format, so one parser serves both.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from harness.transport.exec import CommandResult
from harness.errors import ProbeError

KERNEL_PROBE = "/proc/gvm_jiffies"
_LINE = re.compile(r"^cpu=(\d+) jiffies=(\d+) ktime_ns=(\d+)$")


class CommandRunner(Protocol):
    def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        ...


@dataclass(frozen=True)
class JiffiesSample:
    transport: str
    method: str
    round: int
    vcpu: int
    node: int
    jiffies: int
    guest_ns: int
    host_ns: int

    def to_dict(self) -> dict:
        return asdict(self)


def fallback_command(vcpus: int) -> str:
    """One shell command that visits every vCPU with taskset; prints the kernel probe's format."""
    awk = ("'/^now at/ {now=$3} /^jiffies:/ {print \"jiffies=\" $2 \" ktime_ns=\" now; exit}'")
    return (f"for c in $(seq 0 {vcpus - 1}); do printf 'cpu=%s ' $c; "
            f"taskset -c $c awk {awk} /proc/timer_list; done")


def parse_probe_output(text: str, expected_vcpus: int) -> list[tuple[int, int, int]]:
    """(vcpu, jiffies, guest_ns) per line; every vCPU exactly once, else ProbeError."""
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            raise ProbeError(f"unexpected probe line {line!r}; expected "
                             "'cpu=<n> jiffies=<n> ktime_ns=<n>'")
        rows.append((int(match.group(1)), int(match.group(2)), int(match.group(3))))
    seen = sorted(vcpu for vcpu, _, _ in rows)
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

    def sample(self, rounds: int, interval_s: float) -> list[JiffiesSample]:
        samples = []
        for round_index in range(rounds):
            before = time.monotonic_ns()
            result = self.runner.run(self.command)
            after = time.monotonic_ns()
            if result.exit_status != 0:
                raise ProbeError(f"`{self.command}` over {self.transport} exited with "
                                 f"{result.exit_status}: {result.output[-300:]}")
            for vcpu, jiffies, guest_ns in parse_probe_output(result.output, self.vcpus):
                samples.append(JiffiesSample(
                    transport=self.transport, method=self.method, round=round_index, vcpu=vcpu,
                    node=vcpu // self.vcpus_per_node, jiffies=jiffies, guest_ns=guest_ns,
                    host_ns=(before + after) // 2))
            if round_index + 1 < rounds:
                time.sleep(interval_s)
        return samples
