"""The running GiantVM cluster as one guest (a RunningGuest): its nodes' processes, found again
from their record, watched, stopped, their logs copied here, and the hosts' kernel logs scanned.

`start_guest` turns a prepared GiantVMCluster (cluster.py) into one: preflight, the run marker in
every host's kernel log, the nodes started node 0 first, every node's QEMU log tailed until the
I/O-router rendezvous is done (a node that dies on the way fails the start at once, with its log
tail, and every node is stopped), then node 0's kernel console, ttyS1 socket and SSH forward made
local (transport/remote_console), so SerialConsole and GuestSSH work as with one QEMU. Each
node's process is a transport/remote_process RemoteProcess: the same status cache, exit record,
stop and log copy as the remote stock QEMU.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

from harness.backends.base import GuestEndpoints, HostKernelFailure, HostLog, unix_socket_path
from harness.backends.giantvm.cluster import (LOG_CHUNK, LOG_TAIL_LINES, ClusterHost,
                                              ClusterStartError, ClusterStopError,
                                              GiantVMCluster, NodeProcess)
from harness.backends.giantvm.lines import DMESG_RUN_MARKER, DmesgFinding, scan_dmesg
from harness.backends.remote_qemu import CONSOLE_FILE, SHELL_SOCKET
from harness.errors import HarnessError
from harness.transport.artifacts import remove_secret
from harness.transport.parallel import on_hosts
from harness.transport.remote_console import RemoteConsole, RemotePlaces
from harness.transport.remote_host import RemoteHostError
from harness.transport.console_log import log_tail
from harness.transport.remote_process import RemoteProcess


DEBUGFS = "/sys/kernel/debug"
# Host kernel trouble that ends the wait for the guest: any of these fails the host-log check
# at the end anyway, so waiting out the boot timeout (up to an hour) would only delay the FAIL.
# The original update_first stopped its guest with two WARNINGs and no Oops in one run. The
# DSM's own protocol lines (ATOMIC_INC failed, invalid gfn, ...) are left to the end-of-run scan.
FATAL_HOST_KINDS = ("Oops", "BUG", "WARNING", "hung task", "lockup", "DEADLOCK")
HOST_SCAN_INTERVAL_S = 20.0  # one `dmesg` per host at most this often while the guest boots
COUNTERS_COMMAND = (
    f"grep -qs ' {DEBUGFS} ' /proc/mounts || mount -t debugfs none {DEBUGFS} 2>/dev/null; "
    f"for f in {DEBUGFS}/kvm/atomic_inc_* {DEBUGFS}/kvm/dsm_*; do "
    '[ -r "$f" ] && echo "${f##*/} $(cat "$f")"; done; true')


def parse_counters(output: str) -> dict[str, int]:
    """`name value` lines; anything else (a counter that is not a number) is left out."""
    counters = {}
    for line in output.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            counters[name] = int(value)
    return counters


def start_guest(cluster: GiantVMCluster) -> GiantVMGuest:
    """Preflight, mark the hosts' logs, start every node (node 0 first, as the docs do), wait for
    the rendezvous and open node 0's console; on failure every started node is stopped."""
    cluster.preflight()
    cluster.mark_dmesg()
    guest = GiantVMGuest(cluster)
    try:
        for index in range(len(cluster.launcher.nodes)):
            guest.processes.append(cluster.start_node(index))
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


@dataclass(frozen=True)
class NodeStop:
    node: int
    host: str
    outcome: str | None  # stop_detached's answer; None: the host could not be reached
    error: str | None = None


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
    _next_host_scan: float = field(default=0.0, repr=False)

    @property
    def endpoints(self) -> GuestEndpoints:
        local = self.cluster.local_dir
        return GuestEndpoints(kernel_console_log=local / CONSOLE_FILE,
                              shell_socket=unix_socket_path(local, SHELL_SOCKET),
                              ssh_host="127.0.0.1",
                              ssh_port=self.console.local_ssh_port if self.console else 0)

    one_clock = False  # each node's QEMU keeps its own guest clock

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

    def login_command(self, client_key: str) -> str | None:
        return None  # the SSH forward is this process's

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
        initrd = str(self.cluster.launcher.boot.initrd)  # this run's guest keys, on every host
        removed = on_hosts(self.cluster._hosts(), "remove this run's initramfs",
                           lambda host: remove_secret(host, initrd))
        if removed.failed:
            raise ClusterStopError(f"every node stopped, but {removed.summary()}")

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

    def host_kernel_failure(self) -> HostKernelFailure | None:
        """The first FATAL_HOST_KINDS line in a host's log since the run began; at most one
        scan every HOST_SCAN_INTERVAL_S. A host that cannot be read counts as nothing found: a
        lost host shows as a lost node."""
        now = self.cluster.clock()
        if now < self._next_host_scan:
            return None
        self._next_host_scan = now + HOST_SCAN_INTERVAL_S
        for host in self.dmesg_findings():
            for finding in host.findings:
                if finding.kind in FATAL_HOST_KINDS:
                    return HostKernelFailure(host.host, finding.line)
        return None

    def platform_caveat(self) -> str | None:
        return None  # real hosts: their CPUs are not known to misdeliver

    def host_logs(self) -> list[HostLog]:
        """Every host's kernel log since the run began (host-dmesg.json in the run folder holds
        it all): nothing alarming, and every DSM line its nodes should have printed."""
        findings = self.dmesg_findings()
        (self.cluster.local_dir / "host-dmesg.json").write_text(
            json.dumps([asdict(host) for host in findings], indent=2, sort_keys=True) + "\n")
        return [HostLog(host.host, "no DEADLOCK/lockup/hung task/Oops/BUG/WARNING/invalid "
                                   "gfn lines, every DSM connection line", host.problems())
                for host in findings]

    def host_counters(self) -> dict[str, dict[str, int]]:
        """Each host's kvm debugfs counters (atomic_inc_*, dsm_*): what the protocol did, for
        rates over the observation. A host that cannot be read gives {}."""
        def read(host: ClusterHost) -> dict[str, int]:
            return parse_counters(host.run(COUNTERS_COMMAND, timeout_s=30, as_root=True).stdout)

        result = on_hosts(self.cluster._hosts(), "kvm counters", read)
        return {outcome.host: outcome.value or {} for outcome in result.outcomes}
