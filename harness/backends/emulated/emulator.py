"""The QEMU on this machine that emulates the hosts, and whether it has the SVM interrupt-injection
fix of host_patches/emulator-qemu. Without it (Debian's 7.2 as shipped) QEMU can deliver an
interrupt that the hosts' KVM injected into the GiantVM guest a second time, whatever the guest's
IF; the guest then dies of a double fault that neither its kernel nor the host series caused, so
a run on such an emulator says so before it starts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from harness.errors import SetupError

DEFAULT_EMULATOR = "qemu-system-x86_64"  # looked up on PATH: Debian's qemu-system-x86
FIX_TAG = "gvm-svm-fix"  # the package version host_patches/emulator-qemu/build gives its QEMU
VERSION_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Emulator:
    binary: str
    version: str  # the first line of `--version`

    @property
    def has_injection_fix(self) -> bool:
        return FIX_TAG in self.version

    def warning(self) -> str | None:
        """What a run on this emulator must tell its user, if anything."""
        if self.has_injection_fix:
            return None
        return (f"the hosts' emulator {self.binary} ({self.version}) lacks the SVM "
                "interrupt-injection fix: a guest double fault in this run may be the emulator's "
                "fault, not the kernel's; build a fixed one with host_patches/emulator-qemu/build "
                "and name it as emulated_hosts.emulator (docs/emulated-hosts.md)")


def probe_emulator(binary: str) -> Emulator:
    """Its `--version`; an emulator that is missing or does not answer is the harness's problem."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                timeout=VERSION_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SetupError(f"the hosts' emulator {binary} is not installed; run ./gvm setup, or set "
                        "emulated_hosts.emulator to a QEMU built by "
                        "host_patches/emulator-qemu/build") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"'{binary} --version' did not answer within {VERSION_TIMEOUT_S:.0f} s") \
            from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise SetupError(f"'{binary} --version' failed (exit {result.returncode}): "
                        f"{(result.stderr or result.stdout).strip()[-300:]}")
    return Emulator(binary, lines[0].strip())
