"""A Bochs-emulated host: an x86 machine with VMX that the harness starts on this one, reaches over
SSH like any other host, and stops again.

The machine boots the configured kernel (a Linux-DSM host kernel, or any x86_64 kernel) with the
harness's own initramfs, so it has busybox, dropbear with this run's pinned host key, and the
run's client key. Bochs' slirp forwards a free loopback port to its sshd; the known_hosts entry
for that port is written into the run folder, and the harness's RemoteHost then runs commands,
detached processes and SFTP uploads on it as on a CloudLab machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from harness.stages import rootfs
from harness.backends.bochs.config import BochsHostConfig
from harness.errors import HarnessError
from harness.hosts import log_in_to_booted_host
from harness.backends.bochs.machine import BochsLauncher, BochsMachine, BochsProcess
from harness.transport.local_process import free_loopback_port
from harness.progress import Progress
from harness.transport.remote_host import HostUnreachable, RemoteHost, RemoteHostSpec
from harness.run_folder import RunFolder

SSH_READY_S = 300.0  # a 4.9 kernel's sshd waits ~70 s for the entropy pool under Bochs
WORK_DIR = "/tmp/gvm-harness"  # tmpfs in the initramfs


class BochsHostError(HarnessError):
    """The Bochs machine did not boot, or could not be reached."""


@dataclass(frozen=True)
class MachineFacts:
    """What the machine says about itself once it is up."""

    kernel_release: str
    cpu_flags: tuple[str, ...]  # of vmx, ept, vpid: what kvm-intel needs
    dev_kvm: bool
    atomic_inc_mode: str | None  # None: no patched kvm (no ATOMIC_INC parameter)
    kvm_log: tuple[str, ...]


@dataclass
class RunningBochsHost:
    process: BochsProcess
    remote: RemoteHost
    boot_s: float
    ssh_s: float
    closed: bool = field(default=False, repr=False)

    def facts(self) -> MachineFacts:
        script = "; ".join([
            "uname -r",
            "grep -o -w -E 'vmx|ept|vpid' /proc/cpuinfo | sort -u | tr '\\n' ' '; echo",
            "[ -c /dev/kvm ] && echo kvm-yes || echo kvm-no",
            "cat /sys/module/kvm/parameters/atomic_inc_mode 2>/dev/null || echo -",
            "dmesg | grep -i -E 'kvm|vmx|dsm' | tail -n 20"])
        lines = self.remote.run(script, timeout_s=60, check=True).stdout.splitlines()
        if len(lines) < 4:
            raise BochsHostError(f"the Bochs machine answered {lines!r} to the facts script")
        return MachineFacts(kernel_release=lines[0].strip(), cpu_flags=tuple(lines[1].split()),
                         dev_kvm=lines[2].strip() == "kvm-yes",
                         atomic_inc_mode=None if lines[3].strip() == "-" else lines[3].strip(),
                         kvm_log=tuple(line.strip() for line in lines[4:]))

    def stop(self) -> None:
        """Close the SSH connection and end Bochs; safe to call twice."""
        self.remote.close()
        self.process.stop()
        self.closed = True


def start_bochs_host(config: BochsHostConfig, run: RunFolder, progress: Progress,
                     name: str = "bochs") -> RunningBochsHost:
    """Boot the machine, wait for the initramfs' ready marker and for SSH; on any failure Bochs
    is stopped again."""
    if not config.kernel.is_file():
        raise BochsHostError(f"{config.kernel} does not exist; build the host kernel first "
                             "(Linux-DSM: tinyconfig + host_patches/bochs-host.config)")
    with progress.step("build initramfs (busybox, dropbear, this run's keys)"):
        initramfs = rootfs.build_initramfs(run.path)
    machine = BochsMachine(memory_mb=config.memory_mb, cpus=config.cpus, ips=config.ips,
                           clock_sync=config.clock_sync, ssh_port=free_loopback_port())
    launcher = BochsLauncher(config.kernel, initramfs.path, config.cmdline, run.path, machine)
    run.write_json("bochs-launch.json", {"machine": asdict(machine),
                                         "command_lines": launcher.command_lines()})
    process = launcher.start()
    try:
        with progress.step(f"boot {config.kernel.name} in Bochs (COM1: {launcher.serial_log})"):
            boot_s = process.wait_for(rootfs.READY_MARKER, config.boot_timeout_s)
        with progress.step("SSH into the Bochs machine"):
            remote, ssh_s = _connect(name, machine.ssh_port or 0, initramfs.credentials, run,
                                     process)
    except BaseException:
        process.stop()
        raise
    return RunningBochsHost(process, remote, boot_s, ssh_s)


def _connect(name: str, port: int, credentials: rootfs.GuestCredentials, run: RunFolder,
             process: BochsProcess) -> tuple[RemoteHost, float]:
    spec = RemoteHostSpec(name, "127.0.0.1", port=port, key_file=credentials.client_key,
                          known_hosts=run.file("keys") / "bochs_known_hosts", work_dir=WORK_DIR)

    def still_booting() -> None:
        if process.exit_status() is not None:
            raise BochsHostError(f"Bochs exited before its sshd answered: {process.log_tail()}")

    started = time.monotonic()
    try:
        remote = log_in_to_booted_host(spec, (credentials.host_key_type,
                                              credentials.host_key_base64),
                                       SSH_READY_S, still_booting)
    except HostUnreachable as error:
        raise BochsHostError(f"the Bochs machine: {error}") from None
    return remote, time.monotonic() - started
