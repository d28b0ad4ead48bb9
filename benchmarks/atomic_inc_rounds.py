"""Benchmark: ATOMIC_INC round latency and rounds per second on the emulated GiantVM cluster.

Boots the cluster of the config (`up`), then reads node 0's host's DSM latency samples
(host patch 0005: /sys/kernel/debug/kvm/dsm_latency, one line a sample, `KIND TYPE PEER TOTAL_US
SEND_US WAIT_US TS_MS GFN`; kind R is one KVM_HC_ATOMIC_INC from entry to return) every
`--window` seconds for `--seconds`, and prints the rounds' p50, p99 and max and the rounds per
second, then stops everything. The file keeps 8192 samples and drops new ones while nobody reads
it, hence the short windows; the first read only empties it. An idle guest ticks only now and
then (NO_HZ), so by default a `cpu-hog` keeps its vCPU busy and the tick at HZ while measured:
rounds/s is then what the protocol sustains, not how often an idle guest wakes.

Usage: GVM_EMULATED_HOST_KERNEL=... GVM_GIANTVM_QEMU=... \\
    .venv/bin/python benchmarks/atomic_inc_rounds.py [--mode send_all|local_first]
    [--config vm_configs/giantvm-emulated-2node.yaml] [--seconds 30] [--window 4]
    [--workload cpu-hog|none] [--emulator PATH]
Prints a table; asserts nothing. The figures depend on the load of this machine (printed too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import suite  # noqa: E402
from harness.backends.emulated.config import EmulatedHostsConfig  # noqa: E402
from harness.backends.giantvm.config import giantvm_of  # noqa: E402
from harness.backends.registry import load_config  # noqa: E402
from harness.progress import Progress  # noqa: E402
from harness.run_folder import RunFolder  # noqa: E402
from harness.stages.workloads import start_commands  # noqa: E402
from harness.guest_session import FATAL_CONSOLE  # noqa: E402
from harness.transport.console_log import read_log  # noqa: E402
from harness.transport.remote_host import RemoteHost, RemoteHostSpec  # noqa: E402

DEBUGFS = "/sys/kernel/debug"
READ_SAMPLES = (f"grep -qs ' {DEBUGFS} ' /proc/mounts || mount -t debugfs none {DEBUGFS}; "
                f"dd if={DEBUGFS}/kvm/dsm_latency bs=4M count=1 2>/dev/null")


def percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def round_samples(text: str) -> list[tuple[int, int]]:
    """(total µs, timestamp ms) of every round sample in one read."""
    rounds = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 8 and fields[0] == "R":
            rounds.append((int(fields[3]), int(fields[6])))
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path,
                        default=Path(__file__).resolve().parent.parent / "vm_configs" /
                        "giantvm-emulated-2node.yaml")
    parser.add_argument("--mode", choices=("send_all", "local_first"), default="send_all")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--workload", choices=("cpu-hog", "none"), default="cpu-hog")
    parser.add_argument("--emulator", help="the QEMU that emulates the hosts (default: the "
                        "config's emulated_hosts.emulator)")
    args = parser.parse_args()
    config = load_config(args.config)
    config = config.with_section(replace(giantvm_of(config), atomic_inc_mode=args.mode))
    if args.emulator:
        config = config.with_section(replace(config.section(EmulatedHostsConfig),
                                             emulator=args.emulator))
    run = RunFolder.create(config.run_root, f"bench-{config.name}")
    progress = Progress()
    session = suite.up(config, run, progress)
    try:
        guest = session.guest
        record = guest.hosts[0][0]
        spec = RemoteHostSpec(record.name, "127.0.0.1", port=record.ssh_port,
                              key_file=Path(guest.client_key),
                              known_hosts=Path(guest.known_hosts))
        rounds: list[tuple[int, int]] = []
        workloads = () if args.workload == "none" else (args.workload,)
        ssh = session.open_ssh()
        for command in start_commands(workloads, session.record.vcpus, args.seconds + 10):
            ssh.run(command).check(command)
        load_before = os.getloadavg()[0]
        with RemoteHost(spec) as host:
            host.run(READ_SAMPLES, check=True, as_root=True)
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                time.sleep(args.window)
                rounds += round_samples(host.run(READ_SAMPLES, check=True, as_root=True).stdout)
        load_after = os.getloadavg()[0]
        death = FATAL_CONSOLE.search(read_log(session.kernel_console_log))
    finally:
        session.close()
    if death:
        print(f"the guest died while measured ('{death.group(0).strip()}', see "
              f"{session.kernel_console_log}); {len(rounds)} rounds were sampled before that")
        return 1
    if not rounds:
        print(f"no round samples in {args.seconds:.0f}s: did the guest say 'ATOMIC_INC: enabled'?")
        return 1
    totals = [total for total, _ in rounds]
    stamps = [stamp for _, stamp in rounds]
    span_s = max((max(stamps) - min(stamps)) / 1000, 1e-3)
    emulated = config.section(EmulatedHostsConfig)
    print(f"kernel {emulated.kernel if emulated else '?'}, emulator "
          f"{emulated.emulator if emulated else '?'}, method {args.mode}, guest workload "
          f"{args.workload}, host load {load_before:.1f} -> {load_after:.1f}")
    print("rounds  rounds/s  p50_ms  p99_ms  max_ms")
    print(f"{len(rounds):6d}  {len(rounds) / span_s:8.1f}  {percentile(totals, 0.5) / 1000:6.2f}  "
          f"{percentile(totals, 0.99) / 1000:6.2f}  {max(totals) / 1000:6.2f}")
    print(f"run folder: {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
