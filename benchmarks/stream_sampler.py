"""Benchmark: the continuous sampler (/proc/gvm_jiffies_stream) against the round probe, on a
guest that is already up (`./gvm --config C up`).

1. The stream over one SSH channel for --seconds: readings per second per vCPU, lost readings,
   and the coherence checks on what came.
2. The sampler's guest CPU share: the guest's busy fraction (1 - idle time / wall time, per vCPU,
   from /proc/stat and /proc/uptime over --busy-seconds) with the stream running minus the same
   without it; --repeat rounds, median. Where it goes, each line adding a part: the timers alone
   (the file held open by `sleep`, never read: the rings fill in 4096 readings, 8 s at 500/s, so
   keep --busy-seconds under 6), the drain formatted and read by `cat` into /dev/null in the
   guest, and read over SSH as a run reads it (dropbear and the NIC count too). With NO_HZ the
   idle column is the CPU's measured idle sleep (ktime), so the sampler's short interrupts show up
   in it, which tick sampling would miss.
3. The round probe (`cat /proc/gvm_jiffies` over SSH, one exec per round) for comparison: rounds,
   i.e. readings per vCPU, per second.

Usage: .venv/bin/python benchmarks/stream_sampler.py --config C [--run DIR] [--rate 500]
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import guest_session  # noqa: E402
from harness.stages.coherence import (ClockBounds, check_coherence,  # noqa: E402
                                      measure_clock_bounds)
from harness.backends.registry import load_config  # noqa: E402
from harness.config import DEFAULT_CONFIG  # noqa: E402
from harness.stages.probe import JiffiesProbe  # noqa: E402
from harness.stages.stream import STREAM_FILE, read_stream, stream_command  # noqa: E402
from harness.run_folder import RunFolder  # noqa: E402

BUSY = ("cat /proc/uptime; grep '^cpu[0-9]' /proc/stat; sleep {seconds}; cat /proc/uptime; "
        "grep '^cpu[0-9]' /proc/stat")
USER_HZ = 100
# Where the sampler's CPU goes: each adds one part to the one before. None: the run's own way.
VARIANTS = {
    "timers only (stream open, never read)": f"timeout {{seconds}} sleep {{seconds}} < {STREAM_FILE}",
    "timers + drain to /dev/null in the guest": f"timeout -s INT {{seconds}} cat {STREAM_FILE} >/dev/null",
    "timers + drain + SSH (as a run reads it)": None,
}


def stream_over_ssh(ssh, seconds: float, rate: int | None, vcpus_per_node: int):
    with ssh.lines(stream_command(rate, seconds + 10)) as lines:
        return read_stream(lines, seconds, vcpus_per_node)


def sample(ssh, command: str | None, seconds: float, rate: int | None, vcpus_per_node: int,
           box: dict) -> None:
    """One variant for `seconds`: a guest command, or (None) the stream over SSH into box["r"]."""
    if command is None:
        box["r"] = stream_over_ssh(ssh, seconds, rate, vcpus_per_node)
    else:
        ssh.run(command.format(seconds=int(seconds)), seconds + 30)


def busy(ssh, seconds: float) -> dict[int, float]:
    """Per vCPU: the fraction of wall time it was not idle, over `seconds`."""
    lines = ssh.run(BUSY.format(seconds=seconds), timeout_s=seconds + 60).check("busy").splitlines()
    half = len(lines) // 2
    first, second = lines[:half], lines[half:]
    wall = (float(second[0].split()[0]) - float(first[0].split()[0])) * USER_HZ

    def idle(block: list[str]) -> dict[int, int]:
        return {int(f[0][3:]): int(f[4]) + int(f[5]) for f in (line.split() for line in block[1:])}

    before, after = idle(first), idle(second)
    return {cpu: 1 - (after[cpu] - before[cpu]) / wall for cpu in before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--rate", type=int, default=None, help="stream_hz (default: the guest's)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--busy-seconds", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    config = load_config(args.config)
    run = RunFolder(args.run.resolve()) if args.run else \
        RunFolder.newest_with(config.run_root, guest_session.SESSION_FILE)
    session = guest_session.attach_session(config, run, forwards=False)
    ssh = session.open_ssh(60)
    vcpus, per_node, hz = session.record.vcpus, session.record.vcpus_per_node, session.record.hz
    print(f"guest: {vcpus} vCPUs, HZ={hz}, accel {session.guest.accelerator}, run {run.path}")
    stream_hz = ssh.run("cat /sys/module/gvm_jiffies/parameters/stream_hz").output.strip()
    print(f"stream_hz before: {stream_hz}")

    # 1. the stream alone
    result = stream_over_ssh(ssh, args.seconds, args.rate, per_node)
    summary = result.summary()
    print(f"\nstream for {result.host_elapsed_s:.1f} s host time: {summary['readings']} readings, "
          f"{summary['drains']} drains, lost {summary['lost_total']}, "
          f"unparsed {summary['unparsed_lines']}")
    for vcpu, row in summary["per_vcpu"].items():
        print(f"  vCPU {vcpu}: {row['readings_per_s']:8.1f} readings/s of guest time, "
              f"{row['readings'] / result.host_elapsed_s:8.1f}/s of host time, lost {row['lost']}")
    widths = sorted(r.width_ns for r in result.readings)
    print(f"  interval width: p50 {widths[len(widths) // 2] / 1e3:.1f} us, "
          f"p99 {widths[int(len(widths) * 0.99)] / 1e3:.1f} us, max {widths[-1] / 1e3:.1f} us")
    clocks = measure_clock_bounds(result.readings, result.drains)
    print(f"  drain clock bounds (ns): {clocks.ahead}")
    one = ClockBounds.one_clock({r.node for r in result.readings})
    for check in check_coherence(result.readings, hz, "ssh-stream", hz, one):
        print(f"  {check.name:20s} {'PASS' if check.passed else 'FAIL'} {check.measured:g} "
              f"({check.limit}): {check.detail[:300]}")

    # 2. CPU share: busy fraction with the stream minus without, and where it goes
    shares: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for index in range(args.repeat):
        without = busy(ssh, args.busy_seconds)
        print(f"\npair {index + 1}: busy without stream "
              f"{ {c: round(v * 100, 2) for c, v in sorted(without.items())} } %")
        for name, command in VARIANTS.items():
            box: dict = {}
            thread = threading.Thread(target=sample, args=(
                ssh, command, args.busy_seconds + 4, args.rate, per_node, box))
            thread.start()
            time.sleep(2)
            with_stream = busy(ssh, args.busy_seconds)
            thread.join()
            share = statistics.mean(with_stream.values()) - statistics.mean(without.values())
            shares[name].append(share)
            rates = box["r"].readings_per_s() if "r" in box else {}
            print(f"  {name}: busy {statistics.mean(with_stream.values()) * 100:.2f} %, "
                  f"share {share * 100:.2f} % of the guest"
                  + (f"; stream {({c: round(r) for c, r in rates.items()})} readings/s"
                     if rates else ""))
    print("\nsampler guest CPU share, median of each (all):")
    for name, values in shares.items():
        print(f"  {name:45s} {statistics.median(values) * 100:6.2f} %  "
              f"({', '.join(f'{v * 100:.2f}' for v in values)})")

    # 3. the round probe
    probe = JiffiesProbe(ssh, "ssh", vcpus, per_node)
    began = time.monotonic()
    probe.sample(args.rounds, 0)
    elapsed = time.monotonic() - began
    print(f"\nround probe ({probe.method}): {args.rounds} rounds back to back in {elapsed:.2f} s = "
          f"{args.rounds / elapsed:.1f} readings/s per vCPU (config interval "
          f"{config.probe.interval_s} s: {1 / config.probe.interval_s:.1f}/s)")
    ssh.close()


if __name__ == "__main__":
    main()
