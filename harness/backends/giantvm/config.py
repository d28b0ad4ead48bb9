"""The `giantvm` section of the YAML: where each node runs and what `deploy` installs on the
nodes' hosts. Parsed here, beside the backend that reads it; the registry hands SECTION to
`load_config`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from harness.config import BackendSection, ClusterConfig, HostConfig
from harness.yaml_section import Section, required_path
from harness.errors import ConfigError, HarnessError

LAUNCHER = "giantvm"  # vm.launcher
# The limits of GiantVM 2.8 + Linux-DSM that the YAML may ask for; the launch lines obey them too.
MAX_NODES = 4  # the DSM's generate_txid table has room for node ids 0-3 only
MACHINES = ("q35", "pc")
# kvm.atomic_inc_mode of the shipped host series (host_patches/README.md), or AS_BUILT: a kvm
# whose method is compiled in and has no such parameter (moharaka's original write_update_*
# branches), which the harness then leaves as it is and names in the verdict.
AS_BUILT = "as_built"
ATOMIC_INC_MODES = ("send_all", "local_first", AS_BUILT)
BOOT_MODES = ("once", "default")  # host_kernel: grub-reboot or grub-set-default


@dataclass(frozen=True)
class GiantVMNode:
    """Node i of the cluster: the host it runs on and iplist[i], an address of that host."""

    host: str
    ip: str


@dataclass(frozen=True)
class HostModules:
    """Linux-DSM kvm.ko and kvm-intel.ko (`harness host-build`) for hosts whose KVM is a module."""

    kvm_ko: Path
    kvm_intel_ko: Path


@dataclass(frozen=True)
class HostKernel:
    """A whole Linux-DSM kernel for hosts with KVM built in: installed, then rebooted into."""

    bzimage: Path
    modules_tarball: Path
    release: str
    boot_mode: str


@dataclass(frozen=True)
class GiantVMConfig:
    """How the GiantVM launcher places the nodes and what `deploy` installs on their hosts."""

    nodes: tuple[GiantVMNode, ...]
    machine: str
    ssh_port: int
    rendezvous_timeout_s: float
    atomic_inc_mode: str
    host_modules: HostModules | None
    host_kernel: HostKernel | None


def giantvm_of(config: ClusterConfig) -> GiantVMConfig:
    giantvm = config.section(GiantVMConfig)
    if giantvm is None:
        raise HarnessError(f"{config.path} does not use the GiantVM launcher (vm.launcher: "
                           f"{LAUNCHER}); there is no host kvm to deploy for a stock QEMU")
    return giantvm


def node_hosts(config: ClusterConfig) -> list[HostConfig]:
    """Each host that runs a GiantVM node, once, in the order of its first node."""
    names = dict.fromkeys(node.host for node in giantvm_of(config).nodes)
    return [config.host(name) for name in names]


def parse_giantvm(section: Section, config: ClusterConfig) -> GiantVMConfig:
    vm, hosts = config.vm, config.hosts
    if vm.nodes > MAX_NODES:
        raise ConfigError(f"{config.path}: vm.nodes: GiantVM supports at most {MAX_NODES} nodes")
    nodes = []
    for item in section.items("nodes"):
        nodes.append(GiantVMNode(host=item.string("host"), ip=item.string("ip")))
        item.done()
        try:
            ipaddress.IPv4Address(nodes[-1].ip)
        except ValueError:
            raise item.error("ip", f"'{nodes[-1].ip}' is not an IPv4 address; GiantVM's QEMU "
                                   "takes dotted quads only in its iplist") from None
        if nodes[-1].host not in {host.name for host in hosts}:
            raise item.error("host", f"'{nodes[-1].host}' is not one of the config's hosts: "
                                     f"{', '.join(host.name for host in hosts)}")
    modules_section = section.section("host_modules") if "host_modules" in section.data else None
    kernel_section = section.section("host_kernel") if "host_kernel" in section.data else None
    giantvm = GiantVMConfig(
        nodes=tuple(nodes),
        machine=section.string("machine", default="q35", choices=MACHINES),
        ssh_port=section.integer("ssh_port", 20022, 1024, 65535),
        rendezvous_timeout_s=section.number("rendezvous_timeout_s", 180, 1, 86400),
        atomic_inc_mode=section.string("atomic_inc_mode", default="send_all",
                                       choices=ATOMIC_INC_MODES),
        host_modules=_parse_host_modules(modules_section) if modules_section else None,
        host_kernel=_parse_host_kernel(kernel_section) if kernel_section else None,
    )
    section.done()
    if len(nodes) != vm.nodes:
        raise section.error("nodes", f"lists {len(nodes)} nodes, but vm.nodes is {vm.nodes}; "
                                     "give one entry (host, ip) per node, node 0 first")
    if giantvm.host_modules and giantvm.host_kernel:
        raise section.error("host_kernel", "and host_modules are alternatives: modules for hosts "
                                           "whose KVM is a module, a kernel for KVM built in")
    if giantvm.atomic_inc_mode == AS_BUILT and giantvm.host_modules:
        raise section.error("atomic_inc_mode", f"{AS_BUILT} is for a kvm without the "
                                               "atomic_inc_mode parameter, but `deploy` loads "
                                               "host_modules with it; deploy such a kernel as "
                                               "host_kernel, or pick send_all or local_first")
    if vm.accel == "tcg":
        raise section.error("", "GiantVM runs on KVM only (its DSM lives in the host's kvm "
                                "module); set vm.accel to 'kvm' or 'auto'")
    used = [host for host in hosts if host.name in {node.host for node in nodes}]
    if any(host.is_local for host in used):
        raise section.error("nodes", "GiantVM nodes run on hosts reached over SSH; for this "
                                     "machine add a host with address 127.0.0.1")
    work_dirs = sorted({host.work_dir for host in used})
    if len(work_dirs) > 1:
        raise section.error("nodes", f"the nodes' hosts have different work_dirs "
                                     f"({', '.join(work_dirs)}); GiantVM starts every node with "
                                     "the same -kernel and -initrd paths, so give them one "
                                     "work_dir")
    return giantvm


def _parse_host_modules(section: Section) -> HostModules:
    modules = HostModules(kvm_ko=required_path(section, "kvm_ko"),
                          kvm_intel_ko=required_path(section, "kvm_intel_ko"))
    section.done()
    return modules


def _parse_host_kernel(section: Section) -> HostKernel:
    kernel = HostKernel(bzimage=required_path(section, "bzimage"),
                        modules_tarball=required_path(section, "modules_tarball"),
                        release=section.string("release"),
                        boot_mode=section.string("boot_mode", default="once", choices=BOOT_MODES))
    section.done()
    return kernel


SECTION = BackendSection(key="giantvm", parse=parse_giantvm, launcher=LAUNCHER,
                         gives="list the nodes (host and iplist address of each)")
