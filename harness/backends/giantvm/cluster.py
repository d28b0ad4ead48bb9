"""A GiantVM cluster on real hosts: one GiantVM QEMU per node, each on the host that owns its
iplist address, started and stopped as one guest.

`GiantVMCluster` takes a validated `GiantVMLauncher` (pure launch lines, giantvm.py) and one
RemoteHost per host name the launcher's nodes use. Its lifecycle follows GiantVM's docs
(shared/docs/giantvm-notes.md 2.3-2.6):

1. preflight, on every host at once: the host has its nodes' iplist addresses (`ip -4 -o addr`),
   nothing listens on the DSM, I/O-router and SSH-forward ports (`ss -Htln`), the GiantVM QEMU
   binary is there, and no node of this run is already running;
2. a per-run DMESG_RUN_MARKER goes to each host's /dev/kmsg, so the dmesg scan after the run
   skips every older line;
3. the nodes are started detached (setsid + pid file, under the same exit-code-recording `sh` as
   the remote stock QEMU), node 0 first as GiantVM's docs do; every QEMU then blocks in the I/O
   router rendezvous until all peers are up;
4. each node's QEMU log is tailed until it shows the topology line, its listen line and
   `connect_io_router done`, all before one deadline; a node that dies on the way fails the start
   at once with its log tail, and every node is stopped;
5. node 0's kernel console, ttyS1 socket and SSH forward are made local (transport/
   remote_console), so SerialConsole and GuestSSH work as with one QEMU.

Each node's process is a transport/remote_process RemoteProcess: the same status cache, exit
record, stop and log copy as the remote stock QEMU.

The kernel and initramfs named in the launcher's BootSpec are paths on the hosts: upload them
first (deploy.upload_artifacts puts them at the same content-addressed path on every host).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from harness.backends.base import GuestEndpoints, HostLog, unix_socket_path
from harness.backends.giantvm.lines import (
    DMESG_RUN_MARKER, DmesgFinding, GiantVMLauncher, GiantVMSpecError, busy_ports,
    check_node_addresses, parse_ip_addr, parse_listeners, scan_dmesg)
from harness.backends.remote_qemu import CONSOLE_FILE, EXIT_FILE, SHELL_SOCKET
from harness.errors import BootError, HarnessError
from harness.transport.remote_console import RemoteConsole, RemotePlaces
from harness.transport.remote_host import (
    DetachedProcess, RemoteHostError, RemoteResult, on_hosts)
from harness.transport.remote_process import RemoteProcess, exit_recording_argv, log_tail

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


class ClusterHost(Protocol):
    """What the cluster needs of a host: RemoteHost, or a fake in the unit tests."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def close(self) -> None: ...

    def run(self, command: str | Sequence[str], timeout_s: float = ..., check: bool = ...,
            as_root: bool = ...) -> RemoteResult: ...

    def start_detached(self, name: str, argv: Sequence[str], as_root: bool = ...,
                       timeout_s: float = ...) -> DetachedProcess: ...

    def stop_detached(self, name: str, grace_s: float = ..., as_root: bool = ...) -> str: ...

    def running_pid(self, name: str, as_root: bool = ...) -> int | None: ...

    def read_file(self, path: str, offset: int = ..., max_bytes: int = ...) -> bytes: ...


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


@dataclass(frozen=True)
class NodeStop:
    node: int
    host: str
    outcome: str | None  # stop_detached's answer; None: the host could not be reached
    error: str | None = None


@dataclass(frozen=True)
class HostDmesg:
    """The trouble one host's kernel log shows after this run's marker."""

    host: str
    findings: tuple[DmesgFinding, ...] = ()
    missing_markers: tuple[str, ...] = ()  # DSM lines of this host's nodes that never appeared
    error: str | None = None  # the log could not be read or has no run marker

    def problems(self) -> tuple[str, ...]:
        found = [f"{finding.kind}: {finding.line}" for finding in self.findings]
        found += [f"missing: {line}" for line in self.missing_markers]
        if self.error is not None:
            found.append(f"unreadable: {self.error}")
        return tuple(found)


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
            listeners = parse_listeners(host.run("ss -Htln", check=True, timeout_s=15).stdout)
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

    def start(self) -> GiantVMGuest:
        self.preflight()
        self.mark_dmesg()
        guest = GiantVMGuest(self)
        try:
            for index in range(len(self.launcher.nodes)):  # node 0 first, as the docs do
                guest.processes.append(self._start_node(index))
            guest.wait_for_rendezvous()
            guest.open_console()
        except BaseException as failure:
            try:
                guest.stop()
            except ClusterStopError as stop_failure:
                if isinstance(failure, HarnessError):
                    raise type(failure)(f"{failure}\nStopping the nodes failed too: "
                                        f"{stop_failure}") from None
            raise
        return guest

    def _start_node(self, index: int) -> NodeProcess:
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


@dataclass(frozen=True)
class ClusterRecord:
    """What session.json keeps of a started cluster for a later `probe` or `down`."""

    run_id: str
    kernel: str  # the guest's bzImage and initramfs, as paths on the hosts
    initrd: str
    processes: tuple[NodeProcess, ...]

    @classmethod
    def from_dict(cls, data: dict) -> ClusterRecord:
        return cls(data["run_id"], data["kernel"], data["initrd"],
                   tuple(NodeProcess(**process) for process in data["processes"]))


@dataclass
class _NodeLog:
    offset: int = 0
    text: str = ""


@dataclass
class GiantVMGuest:
    """The running cluster as one guest (RunningGuest): node 0's consoles and SSH made local."""

    cluster: GiantVMCluster
    processes: list[NodeProcess] = field(default_factory=list)
    accelerator: str = "kvm"
    console: RemoteConsole | None = field(default=None, repr=False)
    stops: dict[int, NodeStop] = field(default_factory=dict)
    _lifecycles: dict[int, RemoteProcess] = field(default_factory=dict, repr=False)
    _logs: dict[int, _NodeLog] = field(default_factory=dict, repr=False)
    _status: int | None = field(default=None, repr=False)

    @property
    def endpoints(self) -> GuestEndpoints:
        local = self.cluster.local_dir
        return GuestEndpoints(kernel_console_log=local / CONSOLE_FILE,
                              shell_socket=unix_socket_path(local, SHELL_SOCKET),
                              ssh_host="127.0.0.1",
                              ssh_port=self.console.local_ssh_port if self.console else 0)

    @property
    def pid(self) -> int:
        """Node 0's process group on its host."""
        return self.processes[0].pid if self.processes else 0

    @property
    def where(self) -> str:
        return self.cluster.launcher.nodes[0].host

    @classmethod
    def attach(cls, cluster: GiantVMCluster, processes: Sequence[NodeProcess],
               forwards: bool = True) -> GiantVMGuest:
        """Reach a cluster an earlier invocation started; node 0's console log is resumed."""
        guest = cls(cluster, list(processes))
        if forwards:
            guest.open_console(fresh=False)
        return guest

    def record(self) -> ClusterRecord:
        boot = self.cluster.launcher.boot
        return ClusterRecord(self.cluster.run_id, str(boot.kernel), str(boot.initrd),
                             tuple(self.processes))

    def _host(self, process: NodeProcess) -> ClusterHost:
        return self.cluster.hosts[process.host]

    def lifecycle(self, process: NodeProcess) -> RemoteProcess:
        """The node's process as transport/remote_process sees it (status cache, stop, log)."""
        if process.node not in self._lifecycles:
            self._lifecycles[process.node] = RemoteProcess(
                self._host(process), process.process_name, process.pid, process.log_file,
                process.exit_file, as_root=self.cluster.as_root, clock=self.cluster.clock)
        return self._lifecycles[process.node]

    # -- the rendezvous ----------------------------------------------------------------------

    def read_new_log(self, process: NodeProcess) -> str:
        """Append what the node's QEMU wrote since the last call; the whole log so far."""
        log = self._logs.setdefault(process.node, _NodeLog())
        while True:
            data = self.lifecycle(process).read_log(log.offset, LOG_CHUNK)
            if not data:
                return log.text
            log.offset += len(data)
            log.text += data.decode(errors="replace")
            if len(data) < LOG_CHUNK:
                return log.text

    def missing_markers(self, process: NodeProcess) -> list[str]:
        text = self._logs.get(process.node, _NodeLog()).text
        return [marker for marker in self.cluster.launcher.qemu_markers(process.node)
                if marker not in text]

    def wait_for_rendezvous(self) -> None:
        """Until every node's log shows the rendezvous done; fail fast when a node dies."""
        cluster = self.cluster
        deadline = cluster.clock() + cluster.marker_timeout_s
        waiting = list(self.processes)
        while True:
            for process in list(waiting):
                try:
                    self.read_new_log(process)
                except RemoteHostError:
                    pass  # the log may not exist yet; liveness below decides
                if not self.missing_markers(process):
                    waiting.remove(process)
                    continue
                try:
                    pid = self._host(process).running_pid(process.process_name,
                                                          as_root=cluster.as_root)
                except RemoteHostError as error:
                    raise ClusterStartError(f"lost host '{process.host}' while node "
                                            f"{process.node} waited for its peers: "
                                            f"{error}") from None
                if pid is None:
                    self._refresh_quietly(process)
                    status = self.lifecycle(process).recorded_exit()
                    raise ClusterStartError(
                        f"node {process.node} on host '{process.host}' exited ({status}) before "
                        f"the I/O router rendezvous was done; every node is being stopped. Its "
                        f"log ({process.log_file}) ends with:\n"
                        f"{log_tail(self._log_text(process), LOG_TAIL_LINES)}")
            if not waiting:
                return
            if cluster.clock() >= deadline:
                details = "\n".join(
                    f"node {process.node} on host '{process.host}' still lacks "
                    f"{', '.join(repr(m) for m in self.missing_markers(process))}; its log "
                    f"ends with:\n{log_tail(self._log_text(process), LOG_TAIL_LINES)}"
                    for process in waiting)
                raise ClusterStartError(
                    f"the GiantVM nodes did not finish the I/O router rendezvous within "
                    f"{cluster.marker_timeout_s:.0f}s (are TCP ports 37710+i and 40000+i open "
                    f"between the hosts?):\n{details}")
            cluster.sleep(cluster.poll_interval_s)

    def _log_text(self, process: NodeProcess) -> str:
        return self._logs.get(process.node, _NodeLog()).text

    def _refresh_quietly(self, process: NodeProcess) -> None:
        try:
            self.read_new_log(process)
        except RemoteHostError:
            pass

    def open_console(self, fresh: bool = True) -> None:
        """Node 0's console tail, ttyS1 socket and SSH forward (transport/remote_console)."""
        endpoints = self.cluster.launcher.endpoints
        local = self.endpoints
        console = RemoteConsole(self._host(self.processes[0]), RemotePlaces(  # type: ignore[arg-type]
            endpoints.kernel_console_log, endpoints.shell_socket, endpoints.ssh_port,
            local.kernel_console_log, local.shell_socket))
        console.open(fresh=fresh)
        self.console = console

    def qemu_log_tail(self, lines: int = 10) -> str:
        """The end of every node's QEMU log: any of them may be the one that failed."""
        tails = []
        for process in self.processes:
            self._refresh_quietly(process)
            tails.append(f"node {process.node} on host '{process.host}':\n"
                         f"{log_tail(self._log_text(process), lines)}")
        return "\n".join(tails) or "(no node was started)"

    def detach(self) -> None:
        """Close node 0's forwards and every host connection; the nodes keep running."""
        if self.console is not None:
            self.console.close()
        for host in self.cluster._hosts():
            host.close()

    def exit_status(self) -> int | None:
        """None while every node runs; else the exit code of the first node seen stopped (in node
        order), kept from then on: the node that failed first is the one to look at."""
        for process in self.processes:
            if self._status is not None:
                break
            try:
                self._status = self.lifecycle(process).exit_status()
            except RemoteHostError:
                continue  # unknown is not stopped; the next call asks that host again
        return self._status

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every node's QEMU (all hosts at once), copy the node logs here; safe twice.

        A host that cannot be reached does not keep the others from being stopped: every failure
        is collected and raised together (ClusterStopError); a later call retries those nodes.
        """
        if self.console is not None:
            self.console.close()
        pending = [process for process in self.processes if process.node not in self.stops
                   or self.stops[process.node].error is not None]
        if pending:
            with ThreadPoolExecutor(max_workers=len(pending),
                                    thread_name_prefix="gvm-stop") as pool:
                for stop in pool.map(self._stop_node, pending):
                    self.stops[stop.node] = stop
        failed = [self.stops[process.node] for process in self.processes
                  if self.stops[process.node].error is not None]
        if self.console is not None:
            self.console.poll()  # the last lines node 0 wrote
        if failed:
            raise ClusterStopError(
                f"{len(failed)} of {len(self.processes)} GiantVM nodes could not be stopped "
                "(the others were):\n  - " + "\n  - ".join(
                    f"node {stop.node} on host '{stop.host}': {stop.error}" for stop in failed))

    def _stop_node(self, process: NodeProcess) -> NodeStop:
        lifecycle = self.lifecycle(process)
        try:
            outcome = lifecycle.stop()
        except RemoteHostError as error:
            return NodeStop(process.node, process.host, None, str(error))
        lifecycle.copy_log(self.cluster.local_dir / f"qemu-node{process.node}.log")
        return NodeStop(process.node, process.host, outcome)

    # -- after the run -----------------------------------------------------------------------

    def dmesg_findings(self) -> list[HostDmesg]:
        """Scan every host's kernel log after this run's marker (and note missing DSM lines)."""
        cluster = self.cluster
        launcher = cluster.launcher

        def scan(host: ClusterHost) -> HostDmesg:
            text = host.run("dmesg", check=True, timeout_s=30, as_root=True).stdout
            findings = scan_dmesg(text, cluster.run_id)
            marker = DMESG_RUN_MARKER.format(run_id=cluster.run_id)
            after = text[text.rfind(marker):]
            missing = [line for index, node in enumerate(launcher.nodes)
                       if node.host == host.name
                       for line in launcher.dmesg_markers(index) if line not in after]
            return HostDmesg(host.name, tuple(findings), tuple(missing))

        result = on_hosts(cluster._hosts(), "dmesg scan", scan)
        return [outcome.value if outcome.ok and outcome.value is not None
                else HostDmesg(outcome.host, error=str(outcome.error))
                for outcome in result.outcomes]

    def host_logs(self) -> list[HostLog]:
        """Every host's kernel log since the run began (host-dmesg.json in the run folder holds
        it all): nothing alarming, and every DSM line its nodes should have printed."""
        findings = self.dmesg_findings()
        (self.cluster.local_dir / "host-dmesg.json").write_text(
            json.dumps([asdict(host) for host in findings], indent=2, sort_keys=True) + "\n")
        return [HostLog(host.host, "no DEADLOCK/BUG/WARNING/invalid gfn lines, every DSM "
                                   "connection line", host.problems())
                for host in findings]
