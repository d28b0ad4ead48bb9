"""Benchmark: the continuous sampler (/proc/gvm_jiffies_stream) against the round probe, on a
guest that is already up (`./gvm --config C up`).

1. The stream over one SSH channel for --seconds: readings per second per vCPU, lost readings,
   and the coherence checks on what came.
2. The sampler's guest CPU share: the guest's busy fraction (1 - idle time / wall time, per vCPU,
   from /proc/stat and /proc/uptime over --busy-seconds) with the stream running (read over SSH,
   as a run would: hrtimer interrupts, the reader `cat` and dropbear all count) minus the same
   without it; --repeat pairs, median. With NO_HZ the idle column is the CPU's measured idle sleep
   (ktime), so the sampler's short interrupts show up in it, which tick sampling would miss.
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
from harness.config import DEFAULT_CONFIG, load_config  # noqa: E402
from harness.stages.probe import JiffiesProbe  # noqa: E402
from harness.stages.stream import read_stream, stream_command  # noqa: E402
from harness.run_folder import RunFolder  # noqa: E402

BUSY = ("cat /proc/uptime; grep '^cpu[0-9]' /proc/stat; sleep {seconds}; cat /proc/uptime; "
        "grep '^cpu[0-9]' /proc/stat")
USER_HZ = 100


def stream_over_ssh(ssh, seconds: float, rate: int | None, vcpus_per_node: int):
    with ssh.lines(stream_command(rate, seconds + 10)) as lines:
        return read_stream(lines, seconds, vcpus_per_node)


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
    parser.add_argument("--busy-seconds", type=float, default=10)
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

    # 2. CPU share: busy fraction with the stream minus without
    shares: list[float] = []
    for index in range(args.repeat):
        without = busy(ssh, args.busy_seconds)
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(
            r=stream_over_ssh(ssh, args.busy_seconds + 4, args.rate, per_node)))
        thread.start()
        time.sleep(2)
        with_stream = busy(ssh, args.busy_seconds)
        thread.join()
        share = statistics.mean(with_stream.values()) - statistics.mean(without.values())
        shares.append(share)
        rates = box["r"].readings_per_s() if "r" in box else {}
        print(f"\npair {index + 1}: busy without stream "
              f"{ {c: round(v * 100, 2) for c, v in sorted(without.items())} } %, with "
              f"{ {c: round(v * 100, 2) for c, v in sorted(with_stream.items())} } %: "
              f"share {share * 100:.2f} % of the guest; stream meanwhile "
              f"{ {c: round(r) for c, r in rates.items()} } readings/s")
    print(f"\nsampler guest CPU share (median of {len(shares)}): "
          f"{statistics.median(shares) * 100:.2f} %  (all: "
          f"{', '.join(f'{s * 100:.2f}' for s in shares)})")

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
