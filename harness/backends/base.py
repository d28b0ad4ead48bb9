"""The backend interface: every way of running the guest (one QEMU here, one QEMU on a remote
host, a GiantVM cluster, a guest on a Bochs-emulated host) starts it from the same StartSpec and
hands back a RunningGuest, the way syzkaller keeps each VM type behind `vmimpl`. The suite above
never learns which backend it talks to; backends/registry.py is the one place that names them.

A backend is found again by a later command (`probe`, `down`, `status`) from session.json, which
holds its `kind` and the JSON form of its guest's `record()`; `attach` rebuilds the guest from it.
"""

from __future__ import annotations

import argparse
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from harness.config import ClusterConfig, HostConfig
from harness.progress import Progress
from harness.run_folder import RunFolder

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class BootSpec:
    """What to boot and with which shape; the same for every launcher."""

    kernel: Path
    initrd: Path
    cmdline: str
    vcpus: int
    memory_mb: int


@dataclass(frozen=True)
class GuestEndpoints:
    """Where the running guest can be reached from this machine."""

    kernel_console_log: Path
    shell_socket: Path
    ssh_host: str
    ssh_port: int


def unix_socket_path(directory: str | Path, name: str) -> Path:
    """`directory/name`, or a short name in /tmp derived from it when that is too long to bind.

    Deep run folders (pytest's tmp_path, a long work_dir) would otherwise make QEMU or the forward
    fail; /tmp exists on this machine and on every remote host alike.
    """
    wanted = Path(directory) / name
    if len(str(wanted).encode()) <= UNIX_PATH_MAX:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:16]
    return Path("/tmp") / f"gvm-{digest}-{name}"


@dataclass(frozen=True)
class StartSpec:
    """Everything a backend gets to start a guest: the files to boot and the config's shape."""

    config: ClusterConfig
    boot: BootSpec
    run: RunFolder
    progress: Progress


@dataclass(frozen=True)
class HostLog:
    """What one host's kernel log showed during the run, for the judge to turn into a check."""

    host: str
    looked_for: str
    problems: tuple[str, ...]


@dataclass(frozen=True)
class HostKernelFailure:
    """A host kernel that failed while the guest ran (its kvm is under test too)."""

    host: str
    line: str  # the first fatal line of its log since the run began


class RunningGuest(Protocol):
    endpoints: GuestEndpoints

    @property
    def accelerator(self) -> str:
        """tcg or kvm."""

    @property
    def where(self) -> str:
        """The host the guest (its node 0) runs on, for messages."""

    @property
    def one_clock(self) -> bool:
        """Whether every vCPU reads one guest clock (one QEMU process), so readings of any two
        vCPUs can be ordered by their timestamps; GiantVM nodes each keep their own."""

    @property
    def pid(self) -> int:
        """The process (group) to name when the user has to stop it by hand."""

    def exit_status(self) -> int | None:
        """None while the guest's QEMU processes run; their exit code once one has stopped."""

    def qemu_log_tail(self, lines: int = 10) -> str:
        """The end of QEMU's own output, for error messages."""

    def login_command(self, client_key: str) -> str | None:
        """A shell command that logs in to the guest after this process has left it running;
        None where the way in (a forward of this process) closes with it."""

    def record(self) -> Any:
        """A dataclass of what `attach` needs to find this guest again (saved as JSON)."""

    def host_logs(self) -> list[HostLog]:
        """What each host's kernel log showed during the run ([] where hosts are not ours)."""

    def host_counters(self) -> dict[str, dict[str, int]]:
        """Per host, the host kvm's ATOMIC_INC and DSM counters now ({} where there are none)."""

    def host_kernel_failure(self) -> HostKernelFailure | None:
        """A host kernel that oopsed, warned, locked up or hung a task since the run began, so
        the guest's wait can end at once instead of at its timeout (None where hosts are not ours).
        Cheap to call often: an implementation that reads logs over SSH throttles itself."""

    def platform_caveat(self) -> str | None:
        """A known defect below the guest, not in a kernel under test, that can kill the guest
        the way a kernel bug would; a guest failure's message carries it (None: none known)."""

    def stop(self) -> None:
        """Stop every process of this guest; safe to call twice."""

    def detach(self) -> None:
        """Close this process's forwards and connections and leave the guest running."""


class GuestOnBootedHosts(ABC):
    """A guest that runs on machines its own backend booted (Bochs, emulated hosts): it answers
    for the inner guest, and `stop` ends the guest first, then those machines (`stop_machines`)."""

    guest: RunningGuest

    @property
    def endpoints(self) -> GuestEndpoints:
        return self.guest.endpoints

    @property
    def accelerator(self) -> str:
        return self.guest.accelerator

    @property
    def where(self) -> str:
        return self.guest.where

    @property
    def one_clock(self) -> bool:
        return self.guest.one_clock

    def qemu_log_tail(self, lines: int = 10) -> str:
        return self.guest.qemu_log_tail(lines)

    def login_command(self, client_key: str) -> str | None:
        return None  # through forwards to machines of this process

    def host_logs(self) -> list[HostLog]:
        return self.guest.host_logs()

    def host_counters(self) -> dict[str, dict[str, int]]:
        return self.guest.host_counters()

    def host_kernel_failure(self) -> HostKernelFailure | None:
        return self.guest.host_kernel_failure()

    def platform_caveat(self) -> str | None:
        return self.guest.platform_caveat()

    def stop(self) -> None:
        try:
            self.guest.stop()
        finally:
            self.stop_machines()

    @abstractmethod
    def stop_machines(self) -> None:
        """End the machines the guest ran on."""


@dataclass(frozen=True)
class BackendCommand:
    """A subcommand that one backend brings (GiantVM's `plan`, Bochs' `bochs-host`): the registry
    lists them and the CLI adds them, so the CLI names no backend."""

    name: str
    help: str
    run: Callable[[argparse.Namespace, ClusterConfig, Progress], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    # With this flag given, the CLI runs the whole suite on the command's backend instead.
    suite_flag: str | None = None


class Backend(Protocol):
    kind: str  # what session.json calls it

    def wants(self, config: ClusterConfig) -> bool:
        """Whether this backend runs the guest `config` describes (the registry asks in turn)."""

    def judged_config(self, config: ClusterConfig) -> ClusterConfig:
        """`config` as the suite should use it with this backend (timeouts, transports, checks);
        raises when the config lacks what the backend needs, before anything is built."""

    def atomic_inc_mode(self, config: ClusterConfig) -> str | None:
        """The ATOMIC_INC method the hosts' kvm is set to (None: not a host kvm of ours)."""

    def hosts_to_reach(self, config: ClusterConfig) -> list[HostConfig]:
        """The config's hosts this backend logs in to over SSH, checked before anything is built
        (hosts the backend boots itself do not exist yet and are not among them)."""

    def start(self, spec: StartSpec) -> RunningGuest:
        """Start the guest; on failure nothing of it keeps running."""

    def attach(self, config: ClusterConfig, run: RunFolder, record: dict,
               forwards: bool) -> RunningGuest:
        """The guest an earlier command started (`record` as `record()` saved it);
        `forwards=False` is enough to check or stop it."""
