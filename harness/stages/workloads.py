"""Work the guest does while the stream samples, so a verdict covers jiffies under stress and
says which stress (config `probe.workloads`, named in the verdict's context):

- cpu-hog: a busy loop pinned to every vCPU, so the vCPU that does the tick competes for its CPU;
- page-writer: the guest series' kthread storing into jiffies_64's own 4 KB page every 1 ms
  (/proc/gvm_jiffies_page_writer); under GiantVM the page then moves to the writer's node, the
  Ivy-fault case that models/README.md shows loses ticks without the page-install rule.

Each workload ends by itself `seconds` after it started (busybox `timeout`), so a lost connection
never leaves it running; `stop_commands` ends it sooner.
"""

from __future__ import annotations

from harness.stages.stream import page_writer_command

PAGE_WRITER_PERIOD_US = 1000
BUSY_LOOP = "while :; do :; done"
HOG_PIDS = "/tmp/gvm-cpu-hog.pids"  # busybox has no pkill: the hogs are stopped by pid


def start_commands(workloads: tuple[str, ...], vcpus: int, seconds: float) -> list[str]:
    commands = []
    limit = max(1, int(seconds + 0.999))
    if "cpu-hog" in workloads:
        commands.append(f"for c in $(seq 0 {vcpus - 1}); do timeout {limit} taskset -c $c "
                        f"sh -c '{BUSY_LOOP}' >/dev/null 2>&1 </dev/null & "
                        f"echo $! >> {HOG_PIDS}; done")
    if "page-writer" in workloads:
        commands.append(page_writer_command(PAGE_WRITER_PERIOD_US))
    return commands


def stop_commands(workloads: tuple[str, ...]) -> list[str]:
    commands = []
    if "cpu-hog" in workloads:
        commands.append(f"kill $(cat {HOG_PIDS} 2>/dev/null) 2>/dev/null; rm -f {HOG_PIDS}; true")
    if "page-writer" in workloads:
        commands.append(page_writer_command(0))
    return commands
