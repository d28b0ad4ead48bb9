"""One emulated GiantVM host: a QEMU TCG VM with AMD SVM and nested paging (`-cpu max`) on this
machine, booting a Linux-DSM kernel with the harness's initramfs (busybox, dropbear with this
run's pinned key, sftp-server), reached over SSH through a user-mode forward like any host.

Its second NIC sits on the hosts' private network, made of QEMU socket netdevs on 127.0.0.1 (no
root, no bridge): two hosts are a `dgram` pair, more share a `socket` multicast group. The init
script gives that NIC the address of the GiantVM node the host runs (`gvm_private_ip=`), so
GiantVM's iplist holds the same fixed addresses on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.stages.rootfs import PRIVATE_IP_PARAM
from harness.transport.local_process import LocalProcess

PRIVATE_PREFIX = 24
MCAST_GROUP = "230.0.9.9"


@dataclass(frozen=True)
class PrivateLink:
    """This host's end of the private network: UDP ports on 127.0.0.1."""

    local_port: int
    peer_port: int | None  # None: a multicast group of more than two hosts on `local_port`

    def netdev(self) -> str:
        if self.peer_port is None:
            return f"socket,id=private,mcast={MCAST_GROUP}:{self.local_port},localaddr=127.0.0.1"
        return (f"dgram,id=private,local.type=inet,local.host=127.0.0.1,"
                f"local.port={self.local_port},remote.type=inet,remote.host=127.0.0.1,"
                f"remote.port={self.peer_port}")


def private_links(count: int, ports: list[int]) -> list[PrivateLink]:
    """Each host's end: a pair sends to each other's port; three or four share one group."""
    if count == 2:
        return [PrivateLink(ports[0], ports[1]), PrivateLink(ports[1], ports[0])]
    return [PrivateLink(ports[0], None) for _ in range(count)]


@dataclass(frozen=True)
class EmulatedHostLauncher:
    """The QEMU line of emulated host `index`; pure data, so `plan` and tests can read it."""

    index: int
    qemu_binary: str
    kernel: Path
    initrd: Path
    cmdline: str
    cpus: int
    memory_mb: int
    ssh_port: int  # management SSH: 127.0.0.1:ssh_port here -> the host's port 22
    private_ip: str | None  # the address of the node it runs; None: no private network needed
    link: PrivateLink | None
    run_dir: Path

    @property
    def console_log(self) -> Path:
        return self.run_dir / f"host{self.index}-console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / f"host{self.index}-qemu.log"

    def kernel_cmdline(self) -> str:
        private = f" {PRIVATE_IP_PARAM}={self.private_ip}/{PRIVATE_PREFIX}" \
            if self.private_ip else ""
        return f"{self.cmdline}{private}"

    def command_line(self) -> list[str]:
        line = [
            self.qemu_binary, "-name", f"gvm-emulated-host{self.index}",
            "-accel", "tcg", "-cpu", "max", "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", self.kernel_cmdline(),
            "-serial", f"file:{self.console_log}",
            "-netdev", f"user,id=manage,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", f"e1000,netdev=manage,mac=52:54:00:9a:00:{self.index:02x}",
        ]
        if self.link is not None:
            line += ["-netdev", self.link.netdev(),
                     "-device", f"e1000,netdev=private,mac=52:54:00:9b:00:{self.index:02x}"]
        return line

    def start(self) -> LocalProcess:
        """FileNotFoundError (no QEMU) passes through: the backend names the package."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console_log.unlink(missing_ok=True)
        return LocalProcess.start(self.command_line(), self.qemu_log)
