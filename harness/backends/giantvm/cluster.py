"""A GiantVM cluster on real hosts before it runs: one GiantVM QEMU per node, each on the host
that owns its iplist address (shared/docs/giantvm-notes.md 2.3-2.6).

`GiantVMCluster` takes a validated `GiantVMLauncher` (pure launch lines, lines.py) and one
RemoteHost per host name the launcher's nodes use, and does the steps before the guest exists:

1. preflight, on every host at once: the host has its nodes' iplist addresses (`ip -4 -o addr`),
   nothing listens on the DSM, I/O-router and SSH-forward ports (`ss -Htln`), the GiantVM QEMU
   binary is there, and no node of this run is already running;
2. a per-run DMESG_RUN_MARKER goes to each host's /dev/kmsg, so the dmesg scan after the run
   skips every older line;
3. one node started detached (setsid + pid file, under the same exit-code-recording `sh` as the
   remote stock QEMU); every QEMU then blocks in the I/O router rendezvous until all peers are up.

guest.py's `start_guest` runs these in order and owns the running cluster. The kernel and initramfs named in the launcher's BootSpec are paths on the hosts: upload them
first (deploy.upload_artifacts puts them at the same content-addressed path on every host).
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from harness.backends.giantvm.lines import (
    DMESG_RUN_MARKER, GiantVMLauncher, GiantVMSpecError, busy_ports,
    check_node_addresses, parse_ip_addr, parse_listeners)
from harness.backends.remote_qemu import CONSOLE_FILE, EXIT_FILE
from harness.errors import BootError, HarnessError
from harness.transport.remote_host import DetachedProcess, RemoteHostError
from harness.transport.parallel import on_hosts
from harness.transport.remote_process import ProcessHost, exit_recording_argv

# iproute2's ss, or busybox's netstat on hosts with the harness's initramfs (emulated hosts):
# both print the local address:port in their fourth column, which parse_listeners reads
LISTENERS_COMMAND = "ss -Htln 2>/dev/null || netstat -tln"
MARKER_TIMEOUT_S = 180.0  # every node mlocks all guest RAM before the rendezvous
POLL_INTERVAL_S = 0.5
LOG_TAIL_LINES = 15
LOG_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class ClusterError(HarnessError):
    """The GiantVM cluster could not be started, watched or stopped."""


class ClusterPreflightError(ClusterError):
    """A host is not ready for its nodes; nothing was started. The message lists every problem."""


class ClusterStartError(ClusterError, BootError):
    """A node did not start or did not finish the rendezvous; every node was stopped."""


class ClusterStopError(ClusterError):
    """Some nodes could not be stopped; the message says which and how to stop them by hand."""


class ClusterHost(ProcessHost, Protocol):
    """What the cluster needs of a host (RemoteHost, or a fake in the unit tests): what a
    detached process needs, and starting one."""

    def start_detached(self, name: str, argv: Sequence[str], as_root: bool = ...,
                       timeout_s: float = ...) -> DetachedProcess: ...


@dataclass(frozen=True)
class HostFacts:
    """What preflight learned about one host."""

    host: str
    addresses: tuple[str, ...]
    listeners: tuple[tuple[str, int], ...]
    qemu_binary_ok: bool
    missing_boot_files: tuple[str, ...]
    running: tuple[tuple[int, int], ...]  # (node, process group) of this run's nodes still up


@dataclass(frozen=True)
class NodeProcess:
    """One started node: where its process, log and exit file are on its host."""

    node: int
    host: str
    process_name: str
    pid: int
    log_file: str
    exit_file: str


@dataclass
class GiantVMCluster:
    """Starts a validated GiantVMLauncher's nodes on their hosts; `start` gives a GiantVMGuest."""

    launcher: GiantVMLauncher
    hosts: Mapping[str, ClusterHost]
    local_dir: Path  # this run's folder here
    run_id: str
    marker_timeout_s: float = MARKER_TIMEOUT_S
    poll_interval_s: float = POLL_INTERVAL_S
    as_root: bool = True
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        missing = sorted({node.host for node in self.launcher.nodes} - set(self.hosts))
        if missing:
            raise GiantVMSpecError(f"nodes are placed on host(s) {', '.join(missing)}, which "
                                   "have no connection; add them to the config's hosts")

    @property
    def name(self) -> str:
        return _SAFE_NAME.sub("_", self.run_id) or "run"

    def process_name(self, index: int) -> str:
        return f"gvm-{self.name}-node{index}"

    def exit_file(self, index: int) -> str:
        return f"{self.launcher.nodes[index].work_dir}/{EXIT_FILE}"

    def host_names(self) -> list[str]:
        """Each host once, in the order of its first node."""
        return list(dict.fromkeys(node.host for node in self.launcher.nodes))

    def _hosts(self) -> list[ClusterHost]:
        return [self.hosts[name] for name in self.host_names()]

    def command_lines(self) -> list[list[str]]:
        return self.launcher.command_lines()

    def remote_argv(self, index: int) -> list[str]:
        return exit_recording_argv(self.launcher.node_commands()[index].argv,
                                   self.exit_file(index))

    # -- preflight ---------------------------------------------------------------------------

    def preflight(self) -> tuple[HostFacts, ...]:
        """Check every host at once; raise ClusterPreflightError listing every problem."""
        binary = self.launcher.qemu_binary
        boot_files = (str(self.launcher.boot.kernel), str(self.launcher.boot.initrd))

        def facts(host: ClusterHost) -> HostFacts:
            addresses = parse_ip_addr(host.run("ip -4 -o addr show", check=True,
                                               timeout_s=15).stdout)
            listeners = parse_listeners(host.run(LISTENERS_COMMAND, check=True, timeout_s=15).stdout)
            binary_ok = host.run(["test", "-x", binary], timeout_s=15).exit_status == 0
            missing = tuple(path for path in boot_files
                            if host.run(["test", "-r", path], timeout_s=15).exit_status != 0)
            running = []
            for index, node in enumerate(self.launcher.nodes):
                if node.host == host.name:
                    pid = host.running_pid(self.process_name(index), as_root=self.as_root)
                    if pid is not None:
                        running.append((index, pid))
            return HostFacts(host.name, tuple(addresses), tuple(listeners), binary_ok,
                             missing, tuple(running))

        result = on_hosts(self._hosts(), "GiantVM preflight", facts)
        problems = [f"host '{outcome.host}' could not be checked: {outcome.error}"
                    for outcome in result.failed]
        by_host = {outcome.host: outcome.value for outcome in result.outcomes if outcome.ok}
        problems += self._address_problems(by_host)
        problems += [f"{problem}; stop whatever listens there (`ss -Htlnp` shows it) or, for "
                     "the SSH forward, pick another ssh_port"
                     for problem in busy_ports(
                         [need for need in self.launcher.required_ports()
                          if need.host in by_host],
                         {host: facts.listeners for host, facts in by_host.items()})]
        for host, facts in by_host.items():
            assert facts is not None
            if not facts.qemu_binary_ok:
                problems.append(f"host '{host}': the GiantVM QEMU {binary} is missing or not "
                                "executable; build GiantVM/QEMU 2.8.1.1 there and set the "
                                "config's GiantVM qemu_binary to its path")
            if facts.missing_boot_files:
                files = " and ".join(facts.missing_boot_files)
                problems.append(f"host '{host}': the guest's {files} are missing; upload them "
                                "first (deploy.upload_artifacts puts them at the same path on "
                                "every host)")
            for index, pid in facts.running:
                problems.append(f"host '{host}': node {index} of run '{self.run_id}' already "
                                f"runs as process group {pid}; stop it first "
                                f"(`kill -TERM -{pid}`)")
        if problems:
            raise ClusterPreflightError("the GiantVM cluster cannot start:\n  - "
                                        + "\n  - ".join(problems))
        return tuple(by_host[name] for name in self.host_names()  # type: ignore[misc]
                     if name in by_host)

    def _address_problems(self, by_host: Mapping[str, HostFacts | None]) -> list[str]:
        """giantvm.check_node_addresses, with one line (and fix) per misplaced node."""
        nodes = self.launcher.nodes
        addresses: dict[str, set[str]] = {}
        for node in nodes:  # a host that could not be checked is reported on its own
            facts = by_host.get(node.host)
            addresses.setdefault(node.host, set()).update(
                facts.addresses if facts is not None else [node.ip])
        try:
            check_node_addresses(self.launcher, addresses)
            return []
        except GiantVMSpecError:
            pass
        seen = {host: facts.addresses for host, facts in by_host.items() if facts is not None}
        return [f"host '{node.host}' does not have node {index}'s iplist address {node.ip} "
                f"(it has {', '.join(seen.get(node.host, ())) or 'no IPv4 address'}); "
                "GiantVM binds node i on iplist[i], so place the node on the host that owns "
                "that address or configure it there (`ip addr add`)"
                for index, node in enumerate(nodes)
                if not node.ip.startswith("127.") and node.ip not in addresses[node.host]]

    # -- start -------------------------------------------------------------------------------

    def mark_dmesg(self) -> None:
        """Write this run's DMESG_RUN_MARKER into every host's kernel log."""
        marker = DMESG_RUN_MARKER.format(run_id=self.run_id)

        def mark(host: ClusterHost) -> None:
            host.run(f"printf '%s\\n' {shlex.quote(marker)} > /dev/kmsg", check=True,
                     timeout_s=15, as_root=True)

        failed = on_hosts(self._hosts(), "dmesg run marker", mark).failed
        if failed:
            raise ClusterStartError("could not write the run marker to /dev/kmsg (is the login "
                                    "root, or sudo allowed?): "
                                    + "; ".join(str(outcome.error) for outcome in failed))

    def start_node(self, index: int) -> NodeProcess:
        node = self.launcher.nodes[index]
        host = self.hosts[node.host]
        stale = [f"{node.work_dir}/{CONSOLE_FILE}", self.exit_file(index)]
        if index == 0:
            stale.append(self.launcher.endpoints.shell_socket)
        try:
            host.run(f"mkdir -p {shlex.quote(node.work_dir)} && rm -f {shlex.join(stale)}",
                     check=True, timeout_s=15, as_root=self.as_root)
            process = host.start_detached(self.process_name(index), self.remote_argv(index),
                                          as_root=self.as_root)
        except RemoteHostError as error:
            raise ClusterStartError(f"node {index} did not start on host '{node.host}': "
                                    f"{error}") from None
        return NodeProcess(index, node.host, process.name, process.pid, process.log_file,
                           self.exit_file(index))
