"""Stock QEMU on this machine: one process, TCG or KVM, serial ports and SSH forward on loopback.

ttyS0 (the kernel console) is written by QEMU straight into a file, so no boot output is lost
whatever the harness is doing; ttyS1 is a unix socket with a getty behind it. QEMU runs in its own
session (process group) with a pid file, so `stop`, `down` and Ctrl-C can always find and end it.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import BootError
from harness.backends.base import BootSpec, GuestEndpoints, unix_socket_path
from harness.transport.local_process import stop_process_group



def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class QemuLauncher:
    qemu_binary: str
    accelerator: str
    boot: BootSpec
    run_dir: Path
    ssh_port: int

    @property
    def endpoints(self) -> GuestEndpoints:
        return GuestEndpoints(kernel_console_log=self.run_dir / "console-kernel.log",
                              shell_socket=unix_socket_path(self.run_dir, "console-shell.sock"),
                              ssh_host="127.0.0.1", ssh_port=self.ssh_port)

    def command_lines(self) -> list[list[str]]:
        endpoints = self.endpoints
        # -enable-kvm rather than -accel kvm: GiantVM's QEMU 2.8 has no -accel option
        accel = ["-enable-kvm", "-cpu", "host"] if self.accelerator == "kvm" else \
            ["-accel", "tcg,thread=multi", "-cpu", "max"]
        return [[
            self.qemu_binary, "-name", "gvm-harness", *accel,
            "-machine", "q35", "-smp", str(self.boot.vcpus), "-m", str(self.boot.memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(self.boot.kernel), "-initrd", str(self.boot.initrd),
            "-append", self.boot.cmdline,
            "-serial", f"file:{endpoints.kernel_console_log}",
            "-serial", f"unix:{endpoints.shell_socket},server=on,wait=off",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "e1000,netdev=net0",
            "-pidfile", str(self.run_dir / "qemu.pid"),
        ]]

    def start(self) -> "QemuGuest":
        (command,) = self.command_lines()
        self.endpoints.shell_socket.unlink(missing_ok=True)
        log = (self.run_dir / "qemu.log").open("ab")
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise BootError(f"{self.qemu_binary} is not installed; run ./gvm setup") from None
        finally:
            log.close()
        guest = QemuGuest(endpoints=self.endpoints, accelerator=self.accelerator,
                          pid=process.pid, qemu_log=self.run_dir / "qemu.log", process=process)
        guest.wait_for_socket(self.endpoints.shell_socket, timeout_s=30.0)
        return guest


@dataclass
class QemuGuest:
    """A running QEMU; rebuilt from its pid alone when a later command (`down`) needs it."""

    endpoints: GuestEndpoints
    accelerator: str
    pid: int
    qemu_log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def exit_status(self) -> int | None:
        if self.process is not None:
            return self.process.poll()
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return -1
        return -1 if state in ("Z", "X") else None

    def wait_for_socket(self, path: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            status = self.exit_status()
            if status is not None:
                raise BootError(f"QEMU exited with {status} before it opened {path.name}: "
                                f"{self.qemu_log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BootError(f"QEMU did not create {path} within {timeout_s:.0f}s; "
                                f"see {self.qemu_log}")
            time.sleep(0.05)

    def qemu_log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.qemu_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no QEMU log)"

    def detach(self) -> None:
        """Nothing to close: a later command finds QEMU by its pid."""

    def stop(self) -> None:
        stop_process_group(self.pid, lambda: self.exit_status() is not None, self.process)
