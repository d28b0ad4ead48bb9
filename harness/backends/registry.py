"""The one place that names every backend. A new backend is a package under backends/ plus one
Registration line: the backend itself, the YAML section it parses (if any) and the subcommands
it brings (if any). The suite asks `backend_for(config)` when it starts a guest and
`backend_named(kind)` when it finds one again from session.json; the CLI loads configs with
`load_config` here, so every backend's section is checked, and adds `commands()`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import config as cluster_config
from harness.backends.base import Backend, BackendCommand
from harness.backends.bochs import commands as bochs_commands
from harness.backends.bochs import config as bochs_config
from harness.backends.bochs.backend import BochsBackend
from harness.backends.emulated import config as emulated_config
from harness.backends.emulated.backend import EmulatedBackend
from harness.backends.giantvm import commands as giantvm_commands
from harness.backends.giantvm import config as giantvm_config
from harness.backends.giantvm.backend import GiantVMBackend
from harness.backends.local_qemu import LocalQemuBackend
from harness.backends.remote_qemu import RemoteQemuBackend
from harness.config import BackendSection, ClusterConfig
from harness.errors import HarnessError


@dataclass(frozen=True)
class Registration:
    backend: Backend
    section: BackendSection | None = None
    commands: tuple[BackendCommand, ...] = ()


# Asked in this order; the first that wants a config runs it.
REGISTERED = (
    Registration(EmulatedBackend(), emulated_config.SECTION),
    Registration(GiantVMBackend(), giantvm_config.SECTION, giantvm_commands.COMMANDS),
    Registration(RemoteQemuBackend()),
    Registration(LocalQemuBackend()),
    Registration(BochsBackend(), bochs_config.SECTION, bochs_commands.COMMANDS),
)


def sections() -> tuple[BackendSection, ...]:
    return tuple(entry.section for entry in REGISTERED if entry.section is not None)


def booted_host_addresses() -> tuple[str, ...]:
    """The hosts[].address values that name a machine a backend boots itself (not reachable
    before the run starts it)."""
    return tuple(section.host_address for section in sections() if section.host_address)


def commands() -> list[tuple[BackendCommand, Backend]]:
    """Every backend's own subcommands, each with the backend it belongs to."""
    return [(command, entry.backend) for entry in REGISTERED for command in entry.commands]


def load_config(path: Path | None = None) -> ClusterConfig:
    """The YAML at `path` (default: vm_configs/local.yaml), every backend's section included."""
    return cluster_config.load_config(path, sections())


def parse_config(path: Path, data: object) -> ClusterConfig:
    return cluster_config.parse_config(path, data, sections())


def backend_for(config: ClusterConfig) -> Backend:
    for backend in _backends():
        if backend.wants(config):
            return backend
    raise HarnessError(f"{config.path}: no backend runs this config (vm.launcher "
                       f"'{config.vm.launcher}' on host '{config.hosts[0].name}')")


def backend_named(kind: str) -> Backend:
    for backend in _backends():
        if backend.kind == kind:
            return backend
    raise HarnessError(f"no backend is called '{kind}' (known: "
                       f"{', '.join(backend.kind for backend in _backends())}); the run was made "
                       "by another version of the harness")


def _backends() -> list[Backend]:
    return [entry.backend for entry in REGISTERED]
