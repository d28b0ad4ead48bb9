"""Typed model of a `vm_configs/*.yaml` cluster description, validated strictly.

Unknown keys are errors, not warnings: a misspelt key that is silently ignored is how a config
fragment or a threshold gets dropped without anyone noticing. Every error names the file, the key
and what is allowed. Relative paths are resolved against the YAML file's own directory.

Over 400 lines because it is the whole YAML format in one place: the dataclasses and the parser of
each section sit side by side, so a key's type, default, limits and error message are read and
changed together. It imports no backend: the backends read their sections from these types.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError

# The limits of GiantVM 2.8 + Linux-DSM that the YAML may ask for; the launch lines obey them too.
GIANTVM_MAX_NODES = 4  # the DSM's generate_txid table has room for node ids 0-3 only
GIANTVM_MACHINES = ("q35", "pc")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "vm_configs" / "local.yaml"
LAUNCHERS = ("qemu", "giantvm")
ACCELERATORS = ("auto", "tcg", "kvm")
PROBE_TRANSPORTS = ("ssh", "serial")
WORKLOADS = ("cpu-hog", "page-writer", "tick-mover", "nanosleep")  # stages/workloads.py
ATOMIC_INC_MODES = ("send_all", "local_first")  # kvm.atomic_inc_mode (host_patches/README.md)
BOOT_MODES = ("once", "default")  # host_install: grub-reboot or grub-set-default
BOCHS_CLOCK_SYNCS = ("slowdown", "realtime", "both", "none")  # Bochs' `clock: sync=`
EMULATED = "emulated"  # a host's address when the harness boots it (emulated_hosts)


@dataclass(frozen=True)
class HostConfig:
    """A machine that runs QEMU: `local` is this machine, anything else is reached over SSH.

    Host keys are pinned: the host must already be in `known_hosts`, unless
    `trust_on_first_use` is set, which records the key seen on the first connection.
    """

    name: str
    address: str
    user: str
    port: int
    key_file: Path | None
    work_dir: str
    known_hosts: Path = Path("~/.ssh/known_hosts").expanduser()
    trust_on_first_use: bool = False
    sudo: bool = False

    @property
    def is_local(self) -> bool:
        return self.address == "local"

    @property
    def is_emulated(self) -> bool:
        """A host the harness boots itself (emulated_hosts): reached over SSH once it runs."""
        return self.address == EMULATED


@dataclass(frozen=True)
class KernelConfig:
    source: str
    patches: Path | None
    base_config: str
    fragments: tuple[Path, ...]
    make_jobs: int


@dataclass(frozen=True)
class GuestConfig:
    kernel: KernelConfig
    cmdline: str


@dataclass(frozen=True)
class VMConfig:
    launcher: str
    accel: str
    vcpus: int
    nodes: int
    memory_mb: int
    qemu_binary: str

    @property
    def vcpus_per_node(self) -> int:
        return self.vcpus // self.nodes

    def node_of_vcpu(self, vcpu: int) -> int:
        return vcpu // self.vcpus_per_node


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


@dataclass(frozen=True)
class BochsHostConfig:
    """A Bochs-emulated host with VMX (harness/bochs_host.py): the kernel it boots and its shape."""

    kernel: Path
    memory_mb: int
    cpus: int
    ips: int
    clock_sync: str
    cmdline: str
    boot_timeout_s: float
    qemu_tree: Path | None = None  # a static QEMU build to run the guest on the machine


@dataclass(frozen=True)
class EmulatedHostsConfig:
    """Hosts the harness boots as QEMU TCG VMs with AMD SVM (-cpu max) on this machine: each runs
    the Linux-DSM `kernel` with the harness's initramfs and one GiantVM node, linked by a private
    network on 127.0.0.1 sockets, so a GiantVM cluster runs where there is no VT-x."""

    kernel: Path
    qemu_tree: Path  # a static GiantVM QEMU 2.8 build tree, uploaded to every host
    cpus: int
    memory_mb: int
    cmdline: str
    boot_timeout_s: float


@dataclass(frozen=True)
class ProbeConfig:
    rounds: int
    interval_s: float
    transports: tuple[str, ...]
    duration_s: float = 0.0  # the continuous stream over SSH (0: round probes only)
    stream_hz: int = 0  # readings per second per vCPU in the stream (0: the guest's, 2 x HZ)
    workloads: tuple[str, ...] = ()  # run in the guest while the stream samples


@dataclass(frozen=True)
class CheckConfig:
    rate_tolerance: float
    # off only where the guest's clock is not tied to this machine's (an emulated host)
    rate_vs_host_clock: bool = True
    max_lag_s: float = 1.0  # jiffies behind the guest clock: generous, so only a frozen tick fails
    node_bound_ticks: int = 1  # how far a reading on another node may trail: one ATOMIC_INC round


@dataclass(frozen=True)
class TimeoutConfig:
    boot_s: float
    ssh_s: float
    command_s: float
    tcg_multiplier: float


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    name: str
    run_root: Path
    cache_dir: Path
    hosts: tuple[HostConfig, ...]
    guest: GuestConfig
    vm: VMConfig
    probe: ProbeConfig
    checks: CheckConfig
    timeouts: TimeoutConfig
    giantvm: GiantVMConfig | None = None
    bochs_host: BochsHostConfig | None = None
    emulated_hosts: EmulatedHostsConfig | None = None

    def host(self, name: str) -> HostConfig:
        return next(host for host in self.hosts if host.name == name)


class _Section:
    """Reads one mapping of the YAML, remembering which keys were used so the rest can be refused."""

    def __init__(self, path: Path, key: str, data: Any):
        self.file = path
        self.key = key
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error("", f"expected a mapping, got {type(data).__name__}")
        self.data = data
        self.allowed: list[str] = []

    def error(self, key: str, message: str) -> ConfigError:
        where = ".".join(part for part in (self.key, key) if part) or "(top level)"
        return ConfigError(f"{self.file}: {where}: {message}")

    def _get(self, key: str, default: Any) -> Any:
        self.allowed.append(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = None, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"'{value}' is not one of: {', '.join(choices)}")
        return value

    def integer(self, key: str, default: Any, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"expected a whole number from {low} to {high}, got {value!r}")
        return value

    def number(self, key: str, default: Any, low: float, high: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:
            raise self.error(key, f"expected a number from {low} to {high}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def path(self, key: str, default: Any = None) -> Path | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a path, got {value!r}")
        # An unset variable stays in the path: the config still loads for `plan`, `status` and
        # `down`, and what needs the file says which variable to export (see unexpanded()).
        expanded = os.path.expandvars(os.path.expanduser(value))
        return (self.file.parent / expanded).resolve()

    def string_list(self, key: str, default: Any, choices: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        for item in value:
            if choices and item not in choices:
                raise self.error(key, f"'{item}' is not one of: {', '.join(choices)}")
        return tuple(value)

    def section(self, key: str, required: bool = False) -> "_Section":
        value = self._get(key, _REQUIRED if required else {})
        return _Section(self.file, ".".join(p for p in (self.key, key) if p), value)

    def items(self, key: str) -> list["_Section"]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {type(value).__name__}")
        prefix = ".".join(p for p in (self.key, key) if p)
        return [_Section(self.file, f"{prefix}[{index}]", item) for index, item in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - set(self.allowed))
        if unknown:
            raise self.error(unknown[0], f"unknown key; allowed here: {', '.join(self.allowed)}")


_REQUIRED = object()


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: the
    second would silently win, and the first is usually the one the user meant to change."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found key '{key}' a second time (first at line {seen[key].line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path | None = None) -> ClusterConfig:
    path = (path or DEFAULT_CONFIG).resolve()
    try:
        with path.open() as stream:  # a stream, so YAML errors name the file, not "<unicode string>"
            data = yaml.load(stream, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; the default is {DEFAULT_CONFIG}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(path, data)


def parse_config(path: Path, data: Any) -> ClusterConfig:
    top = _Section(path, "", data)
    name = top.string("name", default=path.stem)
    run_root = top.path("run_dir", default=str(REPO_ROOT / "runs"))
    cache_dir = top.path("cache_dir", default=str(_default_cache_dir()))
    hosts = tuple(_parse_host(section) for section in top.items("hosts"))
    if not hosts:
        hosts = (HostConfig("localhost", "local", "root", 22, None, "/tmp/gvm-harness"),)
    guest = _parse_guest(top.section("guest", required=True))
    vm = _parse_vm(top.section("vm", required=True))
    probe = _parse_probe(top.section("probe"))
    checks = _parse_checks(top.section("checks"))
    timeouts = _parse_timeouts(top.section("timeouts"))
    giantvm_section = top.section("giantvm") if "giantvm" in top.data else None
    bochs_host = _parse_bochs_host(top.section("bochs_host")) if "bochs_host" in top.data \
        else None
    emulated_hosts = _parse_emulated_hosts(top.section("emulated_hosts")) \
        if "emulated_hosts" in top.data else None
    top.done()
    if emulated_hosts is None and any(host.is_emulated for host in hosts):
        raise top.error("hosts", f"a host with address '{EMULATED}' needs an emulated_hosts "
                                 "section (the Linux-DSM kernel and GiantVM QEMU to boot it with)")
    names = [host.name for host in hosts]
    if len(set(names)) != len(names):
        raise top.error("hosts", f"host names must be unique, got {names}")
    giantvm = None
    if vm.launcher == "giantvm":
        if giantvm_section is None:
            raise top.error("giantvm", "is required with vm.launcher 'giantvm': list the nodes "
                                       "(host and iplist address of each)")
        giantvm = _parse_giantvm(giantvm_section, vm, hosts)
    elif giantvm_section is not None:
        raise top.error("giantvm", "is only read with vm.launcher 'giantvm'; remove it or set "
                                   "the launcher")
    return ClusterConfig(path=path, name=name, run_root=run_root, cache_dir=cache_dir,
                         hosts=hosts, guest=guest, vm=vm, probe=probe, checks=checks,
                         timeouts=timeouts, giantvm=giantvm, bochs_host=bochs_host,
                         emulated_hosts=emulated_hosts)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "gvm-harness"


def _parse_host(section: _Section) -> HostConfig:
    address = section.string("address")
    if address not in ("local", EMULATED):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            if not all(part.isalnum() or part == "-" for part in address.replace(".", "-").split("-")):
                raise section.error("address", f"'{address}' is neither 'local', "
                                               f"'{EMULATED}', an IP address nor a host name") \
                from None
    host = HostConfig(
        name=section.string("name"),
        address=address,
        user=section.string("user", default="root"),
        port=section.integer("port", 22, 1, 65535),
        key_file=section.path("key_file"),
        work_dir=section.string("work_dir", default="/tmp/gvm-harness"),
        known_hosts=section.path("known_hosts", default="~/.ssh/known_hosts"),
        trust_on_first_use=section.boolean("trust_on_first_use", False),
        sudo=section.boolean("sudo", False),
    )
    section.done()
    return host


def _parse_guest(section: _Section) -> GuestConfig:
    kernel_section = section.section("kernel", required=True)
    config_section = kernel_section.section("config")
    fragments = config_section.string_list("fragments", [])
    kernel = KernelConfig(
        source=kernel_section.string("source"),
        patches=kernel_section.path("patches"),
        base_config=config_section.string("base", default="tinyconfig"),
        fragments=tuple((section.file.parent / fragment).resolve() for fragment in fragments),
        make_jobs=kernel_section.integer("make_jobs", os.cpu_count() or 1, 1, 256),
    )
    for fragment in kernel.fragments:
        if not fragment.is_file():
            raise config_section.error("fragments", f"{fragment} does not exist")
    if kernel.patches is not None and not kernel.patches.is_dir():
        raise kernel_section.error("patches", f"{kernel.patches} is not a directory")
    config_section.done()
    kernel_section.done()
    guest = GuestConfig(kernel=kernel, cmdline=section.string("cmdline", default="console=ttyS0"))
    section.done()
    return guest


def _parse_vm(section: _Section) -> VMConfig:
    vm = VMConfig(
        launcher=section.string("launcher", default="qemu", choices=LAUNCHERS),
        accel=section.string("accel", default="auto", choices=ACCELERATORS),
        vcpus=section.integer("vcpus", 2, 1, 64),
        nodes=section.integer("nodes", 1, 1, 64),
        memory_mb=section.integer("memory_mb", 256, 64, 1 << 20),
        qemu_binary=section.string("qemu_binary", default="qemu-system-x86_64"),
    )
    section.done()
    if vm.vcpus % vm.nodes:
        raise section.error("nodes", f"{vm.vcpus} vCPUs cannot be split evenly over {vm.nodes} "
                                     "nodes; GiantVM needs the same number of local CPUs on each")
    if vm.launcher == "giantvm" and vm.nodes > GIANTVM_MAX_NODES:
        raise section.error("nodes", f"GiantVM supports at most {GIANTVM_MAX_NODES} nodes")
    return vm


def _parse_giantvm(section: _Section, vm: VMConfig,
                   hosts: tuple[HostConfig, ...]) -> GiantVMConfig:
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
        machine=section.string("machine", default="q35", choices=GIANTVM_MACHINES),
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


def _parse_host_modules(section: _Section) -> HostModules:
    modules = HostModules(kvm_ko=_required_path(section, "kvm_ko"),
                          kvm_intel_ko=_required_path(section, "kvm_intel_ko"))
    section.done()
    return modules


def _parse_host_kernel(section: _Section) -> HostKernel:
    kernel = HostKernel(bzimage=_required_path(section, "bzimage"),
                        modules_tarball=_required_path(section, "modules_tarball"),
                        release=section.string("release"),
                        boot_mode=section.string("boot_mode", default="once", choices=BOOT_MODES))
    section.done()
    return kernel


def unexpanded(path: Path) -> str | None:
    """The environment variable a config path still names because it was not set, if any."""
    return next((part for part in path.parts if part.startswith("$")), None)


def _required_path(section: _Section, key: str) -> Path:
    """Checked for existence by `deploy`, not here: `status` and `down` must load the config
    even where the host build's files are not."""
    path = section.path(key, default=_REQUIRED)
    assert path is not None
    return path


def _parse_bochs_host(section: _Section) -> BochsHostConfig:
    kernel = section.path("kernel", default=_REQUIRED)
    assert kernel is not None
    bochs = BochsHostConfig(
        kernel=kernel,
        memory_mb=section.integer("memory_mb", 1024, 64, 16384),
        cpus=section.integer("cpus", 1, 1, 8),
        ips=section.integer("ips", 50_000_000, 1_000_000, 4_000_000_000),
        clock_sync=section.string("clock_sync", default="slowdown", choices=BOCHS_CLOCK_SYNCS),
        cmdline=section.string("cmdline", default="console=ttyS0 panic=-1"),
        boot_timeout_s=section.number("boot_timeout_s", 600, 1, 86400),
        qemu_tree=section.path("qemu_tree"),
    )
    section.done()
    return bochs


def _parse_emulated_hosts(section: _Section) -> EmulatedHostsConfig:
    kernel, qemu_tree = _required_path(section, "kernel"), _required_path(section, "qemu_tree")
    if kernel.is_dir():  # a Linux-DSM build directory
        kernel = kernel / "arch/x86/boot/bzImage"
    emulated = EmulatedHostsConfig(
        kernel=kernel, qemu_tree=qemu_tree,
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


def _parse_probe(section: _Section) -> ProbeConfig:
    probe = ProbeConfig(
        rounds=section.integer("rounds", 20, 2, 100000),
        interval_s=section.number("interval_s", 0.25, 0.0, 3600.0),
        transports=section.string_list("transports", ["ssh", "serial"], PROBE_TRANSPORTS),
        duration_s=section.number("duration_s", 0.0, 0.0, 86400.0),
        stream_hz=section.integer("stream_hz", 0, 0, 10000),
        workloads=section.string_list("workloads", [], WORKLOADS),
    )
    section.done()
    if not probe.transports:
        raise section.error("transports", f"name at least one of: {', '.join(PROBE_TRANSPORTS)}")
    if len(set(probe.transports)) != len(probe.transports):
        raise section.error("transports", "names a transport twice; each is probed once, and "
                                          "two probes of one would be judged as one series")
    return probe


RETIRED_CHECK_KEYS = {
    "max_skew_ticks": "the skew checks mixed host load with staleness; the stale-read check has "
                      "no limit to set, and lag is judged against checks.max_lag_s",
    "max_node_skew_ticks": "between nodes a reading may trail by checks.node_bound_ticks "
                           "(default 1, one ATOMIC_INC round)",
}


def _parse_checks(section: _Section) -> CheckConfig:
    for key, why in RETIRED_CHECK_KEYS.items():
        if key in section.data:
            raise section.error(key, f"is no longer read: {why}; remove it")
    checks = CheckConfig(
        rate_tolerance=section.number("rate_tolerance", 0.05, 0.0, 1.0),
        rate_vs_host_clock=section.boolean("rate_vs_host_clock", True),
        max_lag_s=section.number("max_lag_s", 1.0, 0.001, 3600.0),
        node_bound_ticks=section.integer("node_bound_ticks", 1, 0, 1000),
    )
    section.done()
    return checks


def _parse_timeouts(section: _Section) -> TimeoutConfig:
    timeouts = TimeoutConfig(
        boot_s=section.number("boot_s", 120, 1, 86400),
        ssh_s=section.number("ssh_s", 60, 1, 86400),
        command_s=section.number("command_s", 30, 1, 86400),
        tcg_multiplier=section.number("tcg_multiplier", 3, 1, 100),
    )
    section.done()
    return timeouts
