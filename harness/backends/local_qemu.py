"""Stock QEMU on this machine: one process, TCG or KVM, serial ports and SSH forward on loopback.

ttyS0 (the kernel console) is written by QEMU straight into a file, so no boot output is lost
whatever the harness is doing; ttyS1 is a unix socket with a getty behind it. QEMU runs in its own
session (process group) with a pid file, so `stop`, `down` and Ctrl-C can always find and end it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from harness.backends.accel import choose_accelerator
from harness.backends.base import (BootSpec, GuestEndpoints, HostKernelFailure, HostLog,
                                   StartSpec, unix_socket_path)
from harness.config import STOCK_LAUNCHER, ClusterConfig, HostConfig
from harness.errors import BootError
from harness.run_folder import RunFolder
from harness.transport.local_process import LocalProcess, free_loopback_port



@dataclass(frozen=True)
class QemuLauncher:
    qemu_binary: str
    accelerator: str
    boot: BootSpec
    run_dir: Path
    ssh_port: int
    host_name: str = "localhost"

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
        try:
            process = LocalProcess.start(command, self.run_dir / "qemu.log")
        except FileNotFoundError:
            raise BootError(f"{self.qemu_binary} is not installed; run ./gvm setup") from None
        guest = QemuGuest(endpoints=self.endpoints, accelerator=self.accelerator,
                          process=process, where=self.host_name)
        guest.wait_for_socket(self.endpoints.shell_socket, timeout_s=30.0)
        return guest


@dataclass(frozen=True)
class LocalQemuRecord:
    """What session.json keeps of a local QEMU: found again by its pid."""

    pid: int
    accelerator: str
    host: str
    kernel_console_log: str
    shell_socket: str
    ssh_port: int


@dataclass
class QemuGuest:
    """A running QEMU on this machine; rebuilt from its record when a later command needs it."""

    endpoints: GuestEndpoints
    accelerator: str
    process: LocalProcess
    where: str = "localhost"

    one_clock = True

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_status(self) -> int | None:
        return self.process.exit_status()

    def record(self) -> LocalQemuRecord:
        endpoints = self.endpoints
        return LocalQemuRecord(self.pid, self.accelerator, self.where,
                               str(endpoints.kernel_console_log), str(endpoints.shell_socket),
                               endpoints.ssh_port)

    def host_logs(self) -> list[HostLog]:
        return []  # this machine's kernel is not the kernel under test

    def host_counters(self) -> dict[str, dict[str, int]]:
        return {}  # no DSM

    def host_kernel_failure(self) -> HostKernelFailure | None:
        return None  # the host's kernel is not under test here

    def platform_caveat(self) -> str | None:
        return None

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
                                f"see {self.process.log}")
            time.sleep(0.05)

    def login_command(self, client_key: str) -> str | None:
        return (f"ssh -i {client_key} -p {self.endpoints.ssh_port} -o StrictHostKeyChecking=no "
                "root@127.0.0.1")

    def qemu_log_tail(self, lines: int = 10) -> str:
        return self.process.log_tail(lines)

    def detach(self) -> None:
        """QEMU is left running on purpose: a later command finds it by its pid."""
        self.process.untether()

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class LocalQemuBackend:
    """One stock QEMU on this machine, under KVM where a test boot shows it works, else TCG."""

    kind = "local-qemu"

    def wants(self, config: ClusterConfig) -> bool:
        return config.vm.launcher == STOCK_LAUNCHER and config.hosts[0].is_local

    def judged_config(self, config: ClusterConfig) -> ClusterConfig:
        return config

    def hosts_to_reach(self, config: ClusterConfig) -> list[HostConfig]:
        return []  # this machine

    def atomic_inc_mode(self, config: ClusterConfig) -> str | None:
        return None

    def start(self, spec: StartSpec) -> QemuGuest:
        config, run = spec.config, spec.run
        accelerator = choose_accelerator(config.vm.accel, config.vm.qemu_binary,
                                         spec.boot.kernel, run.file("accel-probe.log"),
                                         config.cache_dir)
        launcher = QemuLauncher(qemu_binary=config.vm.qemu_binary, accelerator=accelerator,
                                boot=spec.boot, run_dir=run.path, ssh_port=free_loopback_port(),
                                host_name=config.hosts[0].name)
        run.write_json("launch.json", {"accelerator": accelerator, "host": config.hosts[0].name,
                                       "command_lines": launcher.command_lines()})
        with spec.progress.step(f"start QEMU on {config.hosts[0].name}"):
            return launcher.start()

    def attach(self, config: ClusterConfig, run: RunFolder, record: dict,
               forwards: bool) -> QemuGuest:
        saved = LocalQemuRecord(**record)
        endpoints = GuestEndpoints(Path(saved.kernel_console_log), Path(saved.shell_socket),
                                   "127.0.0.1", saved.ssh_port)
        return QemuGuest(endpoints, saved.accelerator, LocalProcess(saved.pid,
                                                                    run.file("qemu.log")),
                         saved.host)
