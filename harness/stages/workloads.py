"""Work the guest does while the stream samples, so a verdict covers jiffies under stress and
says which stress (config `probe.workloads`, named in the verdict's context with what each did):

- cpu-hog: a busy loop pinned to every vCPU, so the vCPU that does the tick competes for its CPU;
- page-writer: the guest series' kthread storing into jiffies_64's own 4 KB page every 1 ms
  (/proc/gvm_jiffies_page_writer); under GiantVM the page then moves to the writer's node, the
  Ivy-fault case that models/README.md shows loses ticks without the page-install rule;
- tick-mover: the guest series' kthread handing the do_timer duty (the CPU that advances
  jiffies) to the next online vCPU every 20 ms (/proc/gvm_jiffies_tick_mover), so every vCPU, and
  under GiantVM every node, takes turns at the tick: a tick lost or doubled at a handover fails
  "ticks counted". An idle vCPU drops the duty at its next idle entry, even while the stream's
  timers fire, so only busy vCPUs do the tick for a whole period: with cpu-hog every vCPU does.
  The verdict names the vCPUs that kept the duty a period after their turn. (CPU hotplug moves
  the duty only when the timekeeper goes offline, and vCPU 0, which holds it from boot, cannot.)
- nanosleep: a loop of 100 us sleeps (busybox `usleep`, a clock_nanosleep each) pinned to every
  vCPU: hrtimers armed and fired thousands of times a second beside the tick's own.

Each ends by itself `seconds` after it started (busybox `timeout`, or the kthread's own limit), so
a lost connection never leaves it running; `stop_commands` ends it sooner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.stages.probe import CommandRunner
from harness.stages.stream import PAGE_WRITER_FILE, page_writer_command

PAGE_WRITER_PERIOD_US = 1000
TICK_MOVER_FILE = "/proc/gvm_jiffies_tick_mover"
TICK_MOVER_PERIOD_US = 20_000  # 50 handovers a second: a busy vCPU keeps it ~5 ticks at HZ 250
NANOSLEEP_US = 100
BUSY_LOOP = "while :; do :; done"
SLEEP_LOOP = f"while :; do usleep {NANOSLEEP_US}; done"
HOG_PIDS = "/tmp/gvm-cpu-hog.pids"  # busybox has no pkill: the loops are stopped by pid
SLEEPER_PIDS = "/tmp/gvm-nanosleep.pids"


def _pinned_loops(loop: str, pids: str, vcpus: int, limit: int) -> str:
    return (f"for c in $(seq 0 {vcpus - 1}); do timeout {limit} taskset -c $c "
            f"sh -c '{loop}' >/dev/null 2>&1 </dev/null & echo $! >> {pids}; done")


def _stop_pids(pids: str) -> str:
    return f"kill $(cat {pids} 2>/dev/null) 2>/dev/null; rm -f {pids}; true"


def _needs(path: str, what: str) -> str:
    """A clear error where the guest kernel lacks the series' file the workload drives."""
    return (f"test -w {path} || {{ echo 'the guest kernel has no {path}: {what} needs the "
            f"guest series with patch 0003 (guest_patches/)' >&2; exit 1; }}; ")


def tick_mover_command(period_us: int, seconds: int = 0) -> str:
    """Start (period_us > 0, for at most `seconds` when given) or stop (0) the tick mover."""
    target = f"{int(period_us)}" + (f" {int(seconds)}" if seconds else "")
    return f"echo '{target}' > {TICK_MOVER_FILE}"


def start_commands(workloads: tuple[str, ...], vcpus: int, seconds: float) -> list[str]:
    commands = []
    limit = max(1, int(seconds + 0.999))
    if "cpu-hog" in workloads:
        commands.append(_pinned_loops(BUSY_LOOP, HOG_PIDS, vcpus, limit))
    if "page-writer" in workloads:
        commands.append(_needs(PAGE_WRITER_FILE, "page-writer")
                        + page_writer_command(PAGE_WRITER_PERIOD_US))
    if "tick-mover" in workloads:
        commands.append(_needs(TICK_MOVER_FILE, "tick-mover")
                        + tick_mover_command(TICK_MOVER_PERIOD_US, limit))
    if "nanosleep" in workloads:
        commands.append(_pinned_loops(SLEEP_LOOP, SLEEPER_PIDS, vcpus, limit))
    return commands


def stop_commands(workloads: tuple[str, ...]) -> list[str]:
    commands = []
    if "cpu-hog" in workloads:
        commands.append(_stop_pids(HOG_PIDS))
    if "page-writer" in workloads:
        commands.append(page_writer_command(0))
    if "tick-mover" in workloads:
        commands.append(tick_mover_command(0))
    if "nanosleep" in workloads:
        commands.append(_stop_pids(SLEEPER_PIDS))
    return commands


def _count(field: str, text: str) -> int | None:
    match = re.search(rf"\b{field}=(\d+)", text)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TickMoverState:
    """The mover's counts since its start, per vCPU: its turns (took) and the turns after which
    it still held the duty a period later (kept)."""
    moves: int
    took: dict[int, int]
    kept: dict[int, int]

    @classmethod
    def parse(cls, text: str) -> TickMoverState | None:
        """None where the file lacks the counts (a guest series older than took= and kept=)."""
        moves = _count("moves", text)
        took, kept = _per_vcpu("took", text), _per_vcpu("kept", text)
        if moves is None or took is None or kept is None:
            return None
        return cls(moves, took, kept)

    def kept_by(self) -> tuple[int, ...]:
        return tuple(vcpu for vcpu, turns in sorted(self.kept.items()) if turns)


def _per_vcpu(field: str, text: str) -> dict[int, int] | None:
    match = re.search(rf"\b{field}=((?:\d+:\d+,?)+)", text)
    if not match:
        return None
    pairs = (pair.split(":") for pair in match.group(1).rstrip(",").split(","))
    return {int(vcpu): int(turns) for vcpu, turns in pairs}


def _describe_mover(text: str) -> str:
    state = TickMoverState.parse(text)
    if state is None:
        moves = _count("moves", text)
        return f"tick-mover ({moves if moves is not None else '?'} handovers)"
    kept_by = ",".join(str(vcpu) for vcpu in state.kept_by()) or "none"
    return f"tick-mover ({state.moves} handovers, kept a period by vCPUs {kept_by})"


def report(workloads: tuple[str, ...], runner: CommandRunner) -> tuple[str, ...]:
    """Each workload's name, with what it did where the guest counts it (read before the stop:
    the page writer's count is since boot, the mover's since its start)."""
    described = []
    for name in workloads:
        if name == "tick-mover":
            described.append(_describe_mover(runner.run(f"cat {TICK_MOVER_FILE}").output))
        elif name == "page-writer":
            writes = _count("writes", runner.run(f"cat {PAGE_WRITER_FILE}").output)
            described.append(f"page-writer ({writes if writes is not None else '?'} writes)")
        else:
            described.append(name)
    return tuple(described)
