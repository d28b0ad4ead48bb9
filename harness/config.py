"""Typed model of a `vm_configs/*.yaml` cluster description, validated strictly.

Unknown keys are errors, not warnings: a misspelt key that is silently ignored is how a config
fragment or a threshold gets dropped without anyone noticing. Every error names the file, the key
and what is allowed. Relative paths are resolved against the YAML file's own directory.

The sections every run reads (hosts, guest, vm, probe, checks, timeouts) are parsed here, the
dataclass and its parser side by side, so a key's type, default, limits and error message are read
and changed together. A section that belongs to one backend (`giantvm`, `emulated_hosts`,
`bochs_host`) is parsed by that backend: backends/registry.py hands its BackendSection specs to
`load_config`, so this module names no backend.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from harness.errors import ConfigError
from harness.yaml_section import Section, UniqueKeyLoader

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "vm_configs" / "local.yaml"
STOCK_LAUNCHER = "qemu"  # one stock QEMU; a backend's section may add its own launcher
ACCELERATORS = ("auto", "tcg", "kvm")
PROBE_TRANSPORTS = ("ssh", "serial")
WORKLOADS = ("cpu-hog", "page-writer", "tick-mover", "nanosleep")  # stages/workloads.py


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
    backend_sections: tuple[object, ...] = ()  # what each backend parsed from its own section

    def host(self, name: str) -> HostConfig:
        return next(host for host in self.hosts if host.name == name)

    def section(self, kind: type[SectionT]) -> SectionT | None:
        """The parsed section of that type (a backend asks for its own), None if not given."""
        return next((found for found in self.backend_sections if isinstance(found, kind)), None)

    def with_section(self, new: object) -> ClusterConfig:
        """This config with `new` in place of the parsed section of its type."""
        return replace(self, backend_sections=tuple(
            new if type(found) is type(new) else found for found in self.backend_sections))


SectionT = TypeVar("SectionT")


@dataclass(frozen=True)
class BackendSection:
    """A top-level YAML section that one backend owns and parses. The registry hands these to
    `load_config`; the parsed object lands in ClusterConfig.backend_sections."""

    key: str
    parse: Callable[[Section, ClusterConfig], object]  # gets the config as parsed so far
    gives: str  # what the section holds, for the error when it is missing
    launcher: str | None = None  # the vm.launcher that needs this section (and alone reads it)
    host_address: str | None = None  # a hosts[].address that needs it (a host the backend boots)


def load_config(path: Path | None = None,
                backend_sections: Sequence[BackendSection] = ()) -> ClusterConfig:
    path = (path or DEFAULT_CONFIG).resolve()
    try:
        with path.open() as stream:  # a stream, so YAML errors name the file, not "<unicode string>"
            data = yaml.load(stream, Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; the default is {DEFAULT_CONFIG}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(path, data, backend_sections)


def parse_config(path: Path, data: Any,
                 backend_sections: Sequence[BackendSection] = ()) -> ClusterConfig:
    top = Section(path, "", data)
    name = top.string("name", default=path.stem)
    run_root = top.path("run_dir", default=str(Path.cwd() / "runs"))  # where gvm is run
    cache_dir = top.path("cache_dir", default=str(_default_cache_dir()))
    special_addresses = tuple(spec.host_address for spec in backend_sections if spec.host_address)
    hosts = tuple(_parse_host(section, special_addresses) for section in top.items("hosts"))
    if not hosts:
        hosts = (HostConfig("localhost", "local", "root", 22, None, "/tmp/gvm-harness"),)
    guest = _parse_guest(top.section("guest", required=True))
    launchers = (STOCK_LAUNCHER,) + tuple(spec.launcher for spec in backend_sections
                                          if spec.launcher)
    vm = _parse_vm(top.section("vm", required=True), launchers)
    probe = _parse_probe(top.section("probe"))
    checks = _parse_checks(top.section("checks"))
    timeouts = _parse_timeouts(top.section("timeouts"))
    given = {spec.key: top.section(spec.key) for spec in backend_sections if spec.key in top.data}
    top.done()
    names = [host.name for host in hosts]
    if len(set(names)) != len(names):
        raise top.error("hosts", f"host names must be unique, got {names}")
    config = ClusterConfig(path=path, name=name, run_root=run_root, cache_dir=cache_dir,
                           hosts=hosts, guest=guest, vm=vm, probe=probe, checks=checks,
                           timeouts=timeouts)
    parsed = [spec.parse(given[spec.key], config) for spec in backend_sections
              if _wanted(spec, top, config, spec.key in given)]
    return replace(config, backend_sections=tuple(parsed))


def _wanted(spec: BackendSection, top: Section, config: ClusterConfig, given: bool) -> bool:
    """Whether the backend's section is to be parsed; raises where it is missing or not read."""
    booted = spec.host_address is not None and \
        any(host.address == spec.host_address for host in config.hosts)
    if not given and booted:
        raise top.error("hosts", f"a host with address '{spec.host_address}' needs the "
                                 f"{spec.key} section ({spec.gives})")
    if not given and spec.launcher == config.vm.launcher:
        raise top.error(spec.key, f"is required with vm.launcher '{spec.launcher}': {spec.gives}")
    if given and spec.launcher is not None and spec.launcher != config.vm.launcher:
        raise top.error(spec.key, f"is only read with vm.launcher '{spec.launcher}'; remove it "
                                  "or set the launcher")
    return given


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "gvm-harness"


def _parse_host(section: Section, special_addresses: tuple[str, ...]) -> HostConfig:
    address = section.string("address")
    if address not in ("local", *special_addresses):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            if not all(part.isalnum() or part == "-" for part in address.replace(".", "-").split("-")):
                named = "".join(f"'{special}', " for special in special_addresses)
                raise section.error("address", f"'{address}' is neither 'local', {named}"
                                               "an IP address nor a host name") \
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


def _parse_guest(section: Section) -> GuestConfig:
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


def _parse_vm(section: Section, launchers: tuple[str, ...]) -> VMConfig:
    vm = VMConfig(
        launcher=section.string("launcher", default=STOCK_LAUNCHER, choices=launchers),
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
    return vm


def _parse_probe(section: Section) -> ProbeConfig:
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


def _parse_checks(section: Section) -> CheckConfig:
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


def _parse_timeouts(section: Section) -> TimeoutConfig:
    timeouts = TimeoutConfig(
        boot_s=section.number("boot_s", 120, 1, 86400),
        ssh_s=section.number("ssh_s", 60, 1, 86400),
        command_s=section.number("command_s", 30, 1, 86400),
        tcg_multiplier=section.number("tcg_multiplier", 3, 1, 100),
    )
    section.done()
    return timeouts
