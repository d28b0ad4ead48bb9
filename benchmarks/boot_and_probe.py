"""Benchmark: what the harness costs on top of the raw tools, in one run, as ratios.

1. boot → SSH ready: QEMU started by hand with the same line and polled with OpenSSH's `ssh true`,
   against the harness's boot_guest + open_ssh (initramfs, readiness checks, login included).
2. round trip: `true` over an open SSH connection, against one probe round (every vCPU's jiffies).

Usage: .venv/bin/python benchmarks/boot_and_probe.py [--config vm_configs/local.yaml] [--repeat 3]
Needs the guest kernel built (`./gvm build`). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import guest_session, suite  # noqa: E402
from harness.backends.base import BootSpec  # noqa: E402
from harness.backends.local_qemu import QemuLauncher  # noqa: E402
from harness.backends.registry import load_config  # noqa: E402
from harness.config import DEFAULT_CONFIG  # noqa: E402
from harness.progress import Progress  # noqa: E402
from harness.run_folder import RunFolder  # noqa: E402
from harness.stages import rootfs  # noqa: E402
from harness.stages.probe import JiffiesProbe  # noqa: E402
from harness.transport.local_process import free_loopback_port  # noqa: E402


def raw_boot_to_ssh(config, kernel: Path, run: RunFolder, accelerator: str) -> float:
    initramfs = rootfs.build_initramfs(run.path)
    port = free_loopback_port()
    launcher = QemuLauncher(config.vm.qemu_binary, accelerator,
                            BootSpec(kernel, initramfs.path, config.guest.cmdline,
                                     config.vm.vcpus, config.vm.memory_mb), run.path, port)
    started = time.monotonic()
    process = subprocess.Popen(launcher.command_lines()[0], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    ssh = ["ssh", "-q", "-i", str(initramfs.credentials.client_key), "-p", str(port),
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "root@127.0.0.1", "true"]
    try:
        while subprocess.run(ssh, capture_output=True).returncode != 0:
            if time.monotonic() - started > 300:
                raise SystemExit("raw boot: no SSH within 300 s")
            time.sleep(0.2)
        return time.monotonic() - started
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=30)
    args = parser.parse_args()
    config = load_config(args.config)
    progress = Progress()
    run = RunFolder.create(config.run_root, f"{config.name}-benchmark")
    kernel, hz = suite.build_guest(config, run, progress)

    raw_boots, harness_boots, raw_trips, probe_trips = [], [], [], []
    for _ in range(args.repeat):
        raw_run = RunFolder.create(config.run_root, f"{config.name}-benchmark-raw")
        harness_run = RunFolder.create(config.run_root, f"{config.name}-benchmark-harness")
        started = time.monotonic()
        session = guest_session.boot_guest(config, kernel, hz, harness_run, progress)
        try:
            ssh = session.open_ssh(300)
            harness_boots.append(time.monotonic() - started)
            probe = JiffiesProbe(ssh, "ssh", config.vm.vcpus, config.vm.vcpus_per_node)
            for _ in range(args.round_trips):
                begin = time.monotonic()
                ssh.run("true")
                raw_trips.append(time.monotonic() - begin)
                begin = time.monotonic()
                probe.sample(rounds=1, interval_s=0)
                probe_trips.append(time.monotonic() - begin)
        finally:
            session.close()
        raw_boots.append(raw_boot_to_ssh(config, kernel, raw_run, session.guest.accelerator))

    rows = [("boot → SSH ready (s)", statistics.median(raw_boots), statistics.median(harness_boots)),
            ("round trip (ms)", 1000 * statistics.median(raw_trips),
             1000 * statistics.median(probe_trips))]
    print(f"\n{'medians over ' + str(args.repeat) + ' boots':<26}{'raw':>10}{'harness':>10}{'ratio':>8}")
    for name, raw, harness in rows:
        print(f"{name:<26}{raw:>10.3f}{harness:>10.3f}{harness / raw:>8.2f}")
    print(f"probe method: {probe.method}, vCPUs: {config.vm.vcpus}, "
          f"accelerator: {session.guest.accelerator}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
