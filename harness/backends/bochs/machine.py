"""A Bochs-emulated x86 machine on this one: Bochs 2.7 emulates VMX with EPT, VPID and
unrestricted guest, which QEMU/TCG does not, so kvm-intel accepts its CPU and a KVM host kernel
(Linux-DSM for GiantVM) can run on a machine without VT-x.

Bochs has no -kernel option: the kernel, the initramfs and the command line go onto an isolinux
ISO (xorriso), booted from Bochs' ATAPI CD-ROM. COM1 (the kernel's ttyS0) is written to a file, so
readiness is a marker on that log, as with QEMU's kernel console. Debian's Bochs has no headless
display, so the RFB display waits for nobody (`timeout=0`), and it starts in its debugger unless
given an rc file holding `c` (shared/docs/local-stack-notes.md). Bochs runs in its own session
with a pid file; `stop` ends the whole group.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.errors import BootError
from harness.transport.console_log import MarkerTimeout, wait_for_marker
from harness.transport.local_process import LocalProcess, run_captured

CPU_MODEL = "corei7_haswell_4770"  # Haswell: VMX with EPT, VPID, unrestricted guest
BIOS = Path("/usr/share/bochs/BIOS-bochs-latest")
VGA_BIOS = Path("/usr/share/vgabios/vgabios.bin")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
SERIAL_LOG = "bochs-serial.log"
SLIRP_CONFIG = "bochs-slirp.conf"
BOCHS_LOG = "bochs.log"


@dataclass(frozen=True)
class BochsMachine:
    """The emulated machine. `ips` is Bochs' instructions per emulated second. With the
    `slowdown` clock Bochs never lets emulated time run ahead of the wall clock, so the jiffies
    rate checks mean what they say; with `none` an idle guest's clock races (a `sleep 30` took
    under a second). With `ssh_port`, an e1000 on Bochs' slirp (10.0.2.0/24, the network the
    harness's initramfs configures) forwards that port to the machine's sshd."""

    memory_mb: int = 1024
    cpus: int = 1
    ips: int = 50_000_000
    clock_sync: str = "slowdown"  # keeps guest time at most wall time; `none` races ahead idle
    ssh_port: int | None = None  # forward 127.0.0.1:ssh_port here to the machine's port 22


def bochsrc(machine: BochsMachine, iso: Path, run_dir: Path) -> str:
    """Bochs' configuration: CD-ROM boot of `iso`, COM1 into the run folder, no sound or USB."""
    nic = machine.ssh_port is not None
    return "\n".join([
        f"plugin_ctrl: unmapped=true, biosdev=true, speaker=false, e1000={str(nic).lower()}, "
        "ne2k=false, parallel=false, sb16=false, es1370=false, gameport=false, usb_uhci=false",
        "config_interface: textconfig",
        'display_library: rfb, options="timeout=0"',  # it takes the first free port from 5900
        f"romimage: file={BIOS}",
        f"vgaromimage: file={VGA_BIOS}",
        # count=N would make N packages, which 4.9's smpboot refuses (kernel BUG in common.c)
        f"cpu: model={CPU_MODEL}, count=1:{machine.cpus}:1, ips={machine.ips}, "
        "reset_on_triple_fault=1, ignore_bad_msrs=1",
        f"memory: guest={machine.memory_mb}, host={machine.memory_mb}",
        "pci: enabled=1, chipset=i440fx",
        "ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14",
        f"ata0-master: type=cdrom, path={iso}, status=inserted",
        "boot: cdrom",
        f"com1: enabled=1, mode=file, dev={run_dir / SERIAL_LOG}",
        f"clock: sync={machine.clock_sync}, time0=local",
        *([f"e1000: enabled=1, mac=52:54:00:12:34:56, ethmod=slirp, "
           f"script={run_dir / SLIRP_CONFIG}"] if nic else []),
        f"log: {run_dir / BOCHS_LOG}",
        "panic: action=fatal",
        "error: action=report",
        "info: action=report",
        "debug: action=ignore",
        "",
    ])


def slirp_config(ssh_port: int) -> str:
    """Bochs' slirp (its `script` file): the default 10.0.2.0/24 and the SSH forward, on
    loopback only."""
    return f"# slirp config\nhostfwd = tcp:127.0.0.1:{ssh_port}-:22\n"  # line 1 is mandatory


def isolinux_cfg(cmdline: str) -> str:
    return "\n".join(["DEFAULT linux", "PROMPT 0", "TIMEOUT 0", "LABEL linux",
                      "  KERNEL /bzImage", "  INITRD /initrd", f"  APPEND {cmdline}", ""])


def build_iso(kernel: Path, initrd: Path, cmdline: str, out: Path) -> Path:
    """An El Torito (no emulation) isolinux CD holding the kernel and initramfs."""
    for needed, package in ((ISOLINUX_BIN, "isolinux"), (LDLINUX_C32, "syslinux-common")):
        if not needed.is_file():
            raise BootError(f"{needed} is missing; run ./gvm setup (package {package})")
    with tempfile.TemporaryDirectory(prefix="gvm-iso-") as staging:
        root = Path(staging)
        for source, name in ((ISOLINUX_BIN, "isolinux.bin"), (LDLINUX_C32, "ldlinux.c32"),
                             (kernel, "bzImage"), (initrd, "initrd")):
            (root / name).write_bytes(source.read_bytes())
        (root / "isolinux.cfg").write_text(isolinux_cfg(cmdline))
        run_captured(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(out), "-b", "isolinux.bin",
                      "-c", "boot.cat", "-no-emul-boot", "-boot-load-size", "4",
                      "-boot-info-table", str(root)], timeout=120)
    return out


@dataclass(frozen=True)
class BochsLauncher:
    kernel: Path
    initrd: Path
    cmdline: str
    run_dir: Path
    machine: BochsMachine = BochsMachine()
    bochs_binary: str = "bochs"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / SERIAL_LOG

    @property
    def kernel_cmdline(self) -> str:
        """With several CPUs, Linux-DSM 4.9 once hung after `RAPL PMU` on Bochs' HPET; `nohpet`
        booted every time (measured for issue 7)."""
        return f"{self.cmdline} nohpet".strip() if self.machine.cpus > 1 else self.cmdline

    def command_lines(self) -> list[list[str]]:
        return [[self.bochs_binary, "-q", "-f", str(self.run_dir / "bochsrc"),
                 "-rc", str(self.run_dir / "bochs-continue")]]

    def start(self) -> BochsProcess:
        iso = build_iso(self.kernel, self.initrd, self.kernel_cmdline,
                        self.run_dir / "bochs-boot.iso")
        (self.run_dir / "bochsrc").write_text(bochsrc(self.machine, iso, self.run_dir))
        if self.machine.ssh_port is not None:
            (self.run_dir / SLIRP_CONFIG).write_text(slirp_config(self.machine.ssh_port))
        (self.run_dir / "bochs-continue").write_text("c\n")
        for stale in (self.serial_log, self.run_dir / BOCHS_LOG):
            stale.unlink(missing_ok=True)
        (command,) = self.command_lines()
        try:
            process = LocalProcess.start(command, self.run_dir / "bochs.stdout", cwd=self.run_dir)
        except FileNotFoundError:
            raise BootError(f"{self.bochs_binary} is not installed; run ./gvm setup "
                            "(packages bochs, bochsbios, vgabios)") from None
        (self.run_dir / "bochs.pid").write_text(f"{process.pid}\n")
        return BochsProcess(self.serial_log, replace(process, log=self.run_dir / BOCHS_LOG))


@dataclass
class BochsProcess:
    """A running Bochs (its log is bochs.log); `wait_for` follows its COM1 log."""

    serial_log: Path
    process: LocalProcess
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_status(self) -> int | None:
        return self.process.exit_status()

    def wait_for(self, marker: str, timeout_s: float) -> float:
        """Seconds from the start until `marker` is on COM1; fail fast if Bochs exits."""
        def check() -> None:
            status = self.exit_status()
            if status is not None:
                raise BootError(f"Bochs exited with {status} before '{marker}': "
                                f"{self.log_tail()}")

        try:
            wait_for_marker(self.serial_log, marker, timeout_s, check)
        except MarkerTimeout as timeout:
            raise BootError(f"no '{marker}' on Bochs' COM1 ({self.serial_log}) within "
                            f"{timeout_s:.0f}s; last lines: {timeout.tail}") from None
        return time.monotonic() - self.started

    def log_tail(self, lines: int = 10) -> str:
        return self.process.log_tail(lines)

    def stop(self) -> None:
        """TERM the whole session, then KILL what is left; safe to call twice."""
        self.process.stop()
