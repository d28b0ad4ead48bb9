"""The `bochs_host` section of the YAML: the Bochs-emulated VMX host's kernel and shape. Parsed
here, beside the backend that boots it; the registry hands SECTION to `load_config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.config import BackendSection, ClusterConfig
from harness.yaml_section import Section, required_path
from harness.errors import HarnessError

CLOCK_SYNCS = ("slowdown", "realtime", "both", "none")  # Bochs' `clock: sync=`


@dataclass(frozen=True)
class BochsHostConfig:
    """A Bochs-emulated host with VMX: the kernel it boots and its shape."""

    kernel: Path
    memory_mb: int
    cpus: int
    ips: int
    clock_sync: str
    cmdline: str
    boot_timeout_s: float
    qemu_tree: Path | None = None  # a static QEMU build to run the guest on the machine


def bochs_host_of(config: ClusterConfig) -> BochsHostConfig:
    bochs = config.section(BochsHostConfig)
    if bochs is None:
        raise HarnessError(f"{config.path} has no bochs_host section (kernel, memory_mb, ...)")
    return bochs


def parse_bochs_host(section: Section, config: ClusterConfig) -> BochsHostConfig:
    bochs = BochsHostConfig(
        kernel=required_path(section, "kernel"),
        memory_mb=section.integer("memory_mb", 1024, 64, 16384),
        cpus=section.integer("cpus", 1, 1, 8),
        ips=section.integer("ips", 50_000_000, 1_000_000, 4_000_000_000),
        clock_sync=section.string("clock_sync", default="slowdown", choices=CLOCK_SYNCS),
        cmdline=section.string("cmdline", default="console=ttyS0 panic=-1"),
        boot_timeout_s=section.number("boot_timeout_s", 600, 1, 86400),
        qemu_tree=section.path("qemu_tree"),
    )
    section.done()
    return bochs


SECTION = BackendSection(key="bochs_host", parse=parse_bochs_host,
                         gives="the Linux-DSM kernel the Bochs machine boots")
