"""Choose TCG or KVM by booting, not by looking at /dev/kvm.

A /dev/kvm that exists can still fail a normal guest (nested setups: MSR assertions with
`-cpu host`, emulation failures), so KVM is chosen only after a short real boot reaches the kernel's
banner on the serial port. The answer is a property of the machine as booted, so it is cached per
boot id: a reboot, or another machine, probes again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from harness.errors import BootError

KVM_PROBE_TIMEOUT_S = 20.0
KERNEL_BANNER = b"Linux version"


def kvm_boots(qemu_binary: str, kernel: Path, log_path: Path) -> bool:
    """Boot `kernel` without a root fs under KVM; True if its banner appears in time."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log_path.write_text("/dev/kvm is missing or not accessible\n")
        return False
    args = [qemu_binary, "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1"]
    try:
        result = subprocess.run(args, capture_output=True, timeout=KVM_PROBE_TIMEOUT_S)
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"") + (expired.stderr or b"")
    log_path.write_bytes(b"$ " + " ".join(args).encode() + b"\n" + output)
    return KERNEL_BANNER in output


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def choose_accelerator(requested: str, qemu_binary: str, kernel: Path, log_path: Path,
                       cache_dir: Path) -> str:
    if requested == "tcg":
        return "tcg"
    works = _cached_kvm_answer(qemu_binary, kernel, log_path, cache_dir)
    if works:
        return "kvm"
    if requested == "kvm":
        raise BootError(f"vm.accel is 'kvm' but a test boot under KVM failed (see {log_path}); "
                        "use 'auto' or 'tcg' on this machine")
    return "tcg"


def _cached_kvm_answer(qemu_binary: str, kernel: Path, log_path: Path, cache_dir: Path) -> bool:
    boot_id = BOOT_ID.read_text().strip() if BOOT_ID.is_file() else "unknown-boot"
    cache = cache_dir / "kvm-probe.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{boot_id}:{qemu_binary}"
    if key not in known:
        known = {key: kvm_boots(qemu_binary, kernel, log_path)}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known) + "\n")
    else:
        log_path.write_text(f"KVM {'works' if known[key] else 'failed'} in an earlier probe "
                            f"since this boot ({cache}); delete that file to probe again\n")
    return known[key]
