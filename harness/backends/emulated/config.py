"""The `emulated_hosts` section of the YAML and the host address that stands for one of those
hosts. Parsed here, beside the backend that boots them; the registry hands SECTION to
`load_config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.backends.emulated.emulator import DEFAULT_EMULATOR
from harness.config import BackendSection, ClusterConfig, HostConfig
from harness.yaml_section import Section, required_path

EMULATED = "emulated"  # a host's address when the harness boots it


@dataclass(frozen=True)
class EmulatedHostsConfig:
    """Hosts the harness boots as QEMU TCG VMs with AMD SVM (-cpu max) on this machine: each runs
    the Linux-DSM `kernel` with the harness's initramfs and one GiantVM node, linked by a private
    network on 127.0.0.1 sockets, so a GiantVM cluster runs where there is no VT-x."""

    kernel: Path
    qemu_tree: Path  # a static GiantVM QEMU 2.8 build tree, uploaded to every host
    emulator: str  # the QEMU on this machine that runs the hosts: a name on PATH, or a path
    cpus: int
    memory_mb: int
    cmdline: str
    boot_timeout_s: float


def is_emulated(host: HostConfig) -> bool:
    """A host the harness boots itself: reached over SSH once it runs."""
    return host.address == EMULATED


def parse_emulated_hosts(section: Section, config: ClusterConfig) -> EmulatedHostsConfig:
    kernel, qemu_tree = required_path(section, "kernel"), required_path(section, "qemu_tree")
    if kernel.is_dir():  # a Linux-DSM build directory
        kernel = kernel / "arch/x86/boot/bzImage"
    emulator = section.string("emulator", default=DEFAULT_EMULATOR)
    if "/" in emulator:  # a path, relative to the YAML file like the others
        emulator = str(section.path("emulator"))
    emulated = EmulatedHostsConfig(
        kernel=kernel, qemu_tree=qemu_tree, emulator=emulator,
        # Measured defaults (docs/emulated-hosts.md): one CPU, since two make the 4.9 kernel
        # distrust the TSC and turn every dsm-conn wake-up into an IPI between TCG threads;
        # idle=halt, since QEMU's AuthenticAMD model has the E400 erratum bit and amd_e400_idle
        # lost timer wake-ups; loglevel=4, since a console line costs milliseconds there.
        cpus=section.integer("cpus", 1, 1, 8),
        memory_mb=section.integer("memory_mb", 1024, 256, 16384),
        cmdline=section.string("cmdline", default="console=ttyS0 panic=-1 idle=halt loglevel=4"),
        boot_timeout_s=section.number("boot_timeout_s", 300, 1, 86400),
    )
    section.done()
    return emulated


SECTION = BackendSection(key="emulated_hosts", parse=parse_emulated_hosts, host_address=EMULATED,
                         gives="the Linux-DSM kernel and GiantVM QEMU to boot it with")
