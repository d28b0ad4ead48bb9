"""GiantVM (QEMU 2.8.1.1 + Linux-DSM): one QEMU per node, each told its slice of the vCPUs.

Everything here is pure data in, argv out, so a plan can be printed and checked before any host is
touched. The rules come from GiantVM's own sources (see shared/docs/giantvm-notes.md, 2.3-2.6):

- `-local-cpu N,start=S,iplist="ip0 ip1 ..."`: node i runs vCPUs S..S+N-1 with S = i*N (its node
  id is start / N); every node has the same N and the same -smp (= N x nodes), -m and -machine.
- `iplist` holds IPv4 addresses separated by single spaces: QEMU's `parse_cluster_iplist` accepts
  digits and dots only and counts one entry per whitespace character.
- Node i binds the DSM listener (TCP 37710+i, in the host kernel) and the I/O router (TCP 40000+i,
  in QEMU) on iplist[i], so it must run on a host that has that address.
- At most 4 nodes: the DSM's `generate_txid` table has room for node ids 0-3 only.
- Devices live on node 0 (the I/O router forwards PIO/MMIO there), so the serial ports and the NIC
  are given to node 0 only; `-nodefaults` keeps QEMU from adding a default NIC on the others.
- `-machine ...,kernel-irqchip=off` (userspace APIC, so IPIs can be forwarded), `--enable-kvm`,
  `-cpu host`; never `-shm-path`, which turns the DSM off.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Iterable, Mapping

from harness.backends.giantvm.config import MACHINES, MAX_NODES
from harness.errors import HarnessError
from harness.backends.base import BootSpec, unix_socket_path

DSM_BASE_PORT = 37710
IO_ROUTER_BASE_PORT = 40000

# QEMU's stdout (interrupt-router.c, vl.c, pc.c), exact text; `{}` fields are filled per node.
QEMU_TOPOLOGY = "QEMU nums: {nodes}, Total CPU nums: {vcpus}, CPU per QEMU: {per_node}"
IO_ROUTER_LISTEN = "QEMU {index} listen on TCP socket {ip}:{port}"
RENDEZVOUS_START = "connect_io_router..."
RENDEZVOUS_DONE = "connect_io_router done"
# The host kernel's log (dsm.c, dsm-util.c), exact text after any function-name prefix.
DSM_ENABLED = "Enable kvm dsm mode, this kvm instance will be node-{index}"
DSM_CONNECTED = "kvm-dsm: node-{index} established connection with node-{peer}"
# Written to /dev/kmsg by the harness before a run, so a scan can skip older boots' lines.
DMESG_RUN_MARKER = "gvm-harness: run {run_id} starts"

_IPV4_CHARS = re.compile(r"[0-9.]+")


class GiantVMSpecError(HarnessError):
    """The requested GiantVM cluster cannot run as described."""


@dataclass(frozen=True)
class NodePlacement:
    """Where node i runs: `host` is a host name from the config, `ip` is iplist[i]."""

    host: str
    ip: str
    work_dir: str


@dataclass(frozen=True)
class PortRequirement:
    """A TCP port that must be free on `host` before node `node` starts."""

    host: str
    node: int
    ip: str
    port: int
    purpose: str


@dataclass(frozen=True)
class NodeCommand:
    node: int
    host: str
    start: int
    argv: tuple[str, ...]

    def shell(self) -> str:
        """The line as one would type it, e.g. `-local-cpu '1,start=0,iplist=10.0.0.1 10.0.0.2'`."""
        return shlex.join(self.argv)


@dataclass(frozen=True)
class GiantVMEndpoints:
    """Where node 0 puts the guest's consoles and SSH, all on node 0's host."""

    host: str
    kernel_console_log: str
    shell_socket: str
    ssh_port: int


@dataclass(frozen=True)
class GiantVMLauncher:
    qemu_binary: str
    boot: BootSpec
    nodes: tuple[NodePlacement, ...]
    ssh_port: int
    machine: str = "q35"

    def __post_init__(self) -> None:
        validate(self)

    @property
    def vcpus_per_node(self) -> int:
        return self.boot.vcpus // len(self.nodes)

    @property
    def iplist(self) -> str:
        return " ".join(node.ip for node in self.nodes)

    @property
    def endpoints(self) -> GiantVMEndpoints:
        node0 = self.nodes[0]
        return GiantVMEndpoints(host=node0.host,
                                kernel_console_log=f"{node0.work_dir}/console-kernel.log",
                                shell_socket=str(unix_socket_path(node0.work_dir, "console-shell.sock")),
                                ssh_port=self.ssh_port)

    def node_commands(self) -> list[NodeCommand]:
        return [self._node_command(index) for index in range(len(self.nodes))]

    def command_lines(self) -> list[list[str]]:
        return [list(command.argv) for command in self.node_commands()]

    def _node_command(self, index: int) -> NodeCommand:
        per_node = self.vcpus_per_node
        start = index * per_node
        argv = [
            self.qemu_binary, "-name", f"gvm-node{index}",
            "--enable-kvm", "-cpu", "host",
            "-machine", f"{self.machine},kernel-irqchip=off",
            "-smp", str(self.boot.vcpus), "-m", str(self.boot.memory_mb),
            "-local-cpu", f"{per_node},start={start},iplist={self.iplist}",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(self.boot.kernel), "-initrd", str(self.boot.initrd),
            "-append", self.boot.cmdline,
        ]
        if index == 0:
            endpoints = self.endpoints
            argv += [
                "-serial", f"file:{endpoints.kernel_console_log}",
                "-serial", f"unix:{endpoints.shell_socket},server,nowait",
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "e1000,netdev=net0",
            ]
        return NodeCommand(node=index, host=self.nodes[index].host, start=start,
                           argv=tuple(argv))

    def required_ports(self) -> list[PortRequirement]:
        """Every TCP port the cluster binds, per host: free them before starting any node."""
        ports = [PortRequirement(self.nodes[0].host, 0, "127.0.0.1", self.ssh_port,
                                 "guest SSH forward")]
        for index, node in enumerate(self.nodes):
            ports.append(PortRequirement(node.host, index, node.ip, DSM_BASE_PORT + index,
                                         "DSM (host kernel)"))
            ports.append(PortRequirement(node.host, index, node.ip, IO_ROUTER_BASE_PORT + index,
                                         "I/O router (QEMU)"))
        return ports

    def qemu_markers(self, index: int) -> list[str]:
        """QEMU stdout lines node `index` prints by the end of the rendezvous.

        The listen line comes from the I/O router's own thread, so only the last one's position
        is fixed: once `connect_io_router done` is printed, every peer was reached.
        """
        node = self.nodes[index]
        return [QEMU_TOPOLOGY.format(nodes=len(self.nodes), vcpus=self.boot.vcpus,
                                     per_node=self.vcpus_per_node),
                IO_ROUTER_LISTEN.format(index=index, ip=node.ip, port=IO_ROUTER_BASE_PORT + index),
                RENDEZVOUS_START, RENDEZVOUS_DONE]

    def dmesg_markers(self, index: int) -> list[str]:
        """Host kernel lines that show node `index` enabled its DSM and reached every peer."""
        return [DSM_ENABLED.format(index=index)] + [
            DSM_CONNECTED.format(index=index, peer=peer)
            for peer in range(len(self.nodes)) if peer != index]


def validate(launcher: GiantVMLauncher) -> None:
    """Refuse shapes GiantVM rejects or silently mishandles, saying what to change."""
    nodes = launcher.nodes
    vcpus = launcher.boot.vcpus
    if len(nodes) < 2:
        raise GiantVMSpecError(f"GiantVM needs 2 to {MAX_NODES} nodes, got {len(nodes)}; for a "
                               "single QEMU use the stock 'qemu' launcher")
    if len(nodes) > MAX_NODES:
        raise GiantVMSpecError(f"GiantVM supports at most {MAX_NODES} nodes (the DSM's "
                               f"generate_txid table holds node ids 0-3), got {len(nodes)}")
    if vcpus < 1 or vcpus % len(nodes):
        raise GiantVMSpecError(f"{vcpus} vCPUs cannot be split evenly over {len(nodes)} nodes; "
                               "every node must hold the same number of local CPUs (QEMU refuses "
                               "to start otherwise): make vcpus a multiple of nodes")
    if launcher.boot.memory_mb < 1:
        raise GiantVMSpecError(f"memory_mb must be positive, got {launcher.boot.memory_mb}")
    if launcher.machine not in MACHINES:
        raise GiantVMSpecError(f"machine '{launcher.machine}' is not one of: "
                               f"{', '.join(MACHINES)}")
    if not 1 <= launcher.ssh_port <= 65535:
        raise GiantVMSpecError(f"ssh_port {launcher.ssh_port} is not a TCP port")
    for index, node in enumerate(nodes):
        _check_ipv4(index, node.ip)
    loopback = [node.ip.startswith("127.") for node in nodes]
    hosts = {node.host for node in nodes}
    if any(loopback) and len(hosts) > 1:
        raise GiantVMSpecError(
            f"iplist '{launcher.iplist}' mixes loopback with nodes on {len(hosts)} hosts "
            f"({', '.join(sorted(hosts))}); 127.x reaches only the node's own host, so loopback "
            "addresses work only when every node runs on one host")
    ip_owner: dict[str, int] = {}
    for index, node in enumerate(nodes):
        owner = nodes[ip_owner.setdefault(node.ip, index)]
        if owner.host != node.host:
            raise GiantVMSpecError(f"nodes {ip_owner[node.ip]} and {index} both have iplist "
                                   f"address {node.ip} but run on different hosts ('{owner.host}' "
                                   f"and '{node.host}'); each host needs its own address")
    taken: dict[tuple[str, str, int], PortRequirement] = {}
    for need in launcher.required_ports():
        other = taken.setdefault((need.host, need.ip, need.port), need)
        if other is not need:
            raise GiantVMSpecError(f"{need.ip}:{need.port} on host '{need.host}' is wanted twice: "
                                   f"{other.purpose} of node {other.node} and {need.purpose} of "
                                   f"node {need.node}; pick another ssh_port")


def _check_ipv4(index: int, ip: str) -> None:
    if not _IPV4_CHARS.fullmatch(ip):
        raise GiantVMSpecError(f"node {index}: iplist entry '{ip}' is not an IPv4 address; "
                               "GiantVM's QEMU accepts digits and dots only (no host names, no "
                               "IPv6, no spaces)")
    parts = ip.split(".")
    if len(parts) != 4 or not all(part and int(part) <= 255 for part in parts):
        raise GiantVMSpecError(f"node {index}: iplist entry '{ip}' is not a dotted-quad IPv4 "
                               "address such as 10.0.0.1")


def check_node_addresses(launcher: GiantVMLauncher,
                         host_addresses: Mapping[str, Iterable[str]]) -> None:
    """Node i binds its listeners on iplist[i]: that address must be configured on its host.

    `host_addresses` maps host names to their IPv4 addresses, e.g. parsed from
    `ip -4 -o addr show` with `parse_ip_addr`.
    """
    problems = []
    for index, node in enumerate(launcher.nodes):
        if node.ip.startswith("127."):
            continue
        addresses = set(host_addresses.get(node.host, ()))
        if node.ip not in addresses:
            problems.append(f"node {index} ({node.ip}) is placed on host '{node.host}', which has "
                            f"{', '.join(sorted(addresses)) or 'no IPv4 address'}")
    if problems:
        raise GiantVMSpecError("GiantVM binds node i on iplist[i], so each node must run on the "
                               "host that owns its address: " + "; ".join(problems))


def parse_ip_addr(output: str) -> list[str]:
    """IPv4 addresses from `ip -4 -o addr show`: `2: eth0    inet 10.0.0.1/24 brd ...`."""
    return [match.group(1) for match in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+)/", output)]


def parse_listeners(output: str) -> list[tuple[str, int]]:
    """(address, port) of each listener in `ss -Htln` output; wildcards come back as `*`."""
    listeners = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        address = address.strip("[]").split("%")[0]
        if port.isdigit():
            listeners.append(("*" if address in ("0.0.0.0", "::", "*", "") else address,
                              int(port)))
    return listeners


def busy_ports(needs: Iterable[PortRequirement],
               listeners_by_host: Mapping[str, Iterable[tuple[str, int]]]) -> list[str]:
    """Describe every required port that something already listens on (empty: all free)."""
    problems = []
    for need in needs:
        for address, port in listeners_by_host.get(need.host, ()):
            if port == need.port and address in ("*", need.ip):
                problems.append(f"host '{need.host}': {address}:{port} is in use, but node "
                                f"{need.node} needs {need.ip}:{port} for its {need.purpose}")
                break
    return problems


@dataclass(frozen=True)
class DmesgFinding:
    kind: str
    line: str


# The first line of a kernel log that still holds its boot (dmesg's clock starts at 0).
BOOT_LINE = re.compile(r"\[\s*0\.0+\]")
# Most specific first: a line is reported once, under the first kind that matches.
DMESG_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("DEADLOCK", re.compile(r"DEADLOCK")),
    ("invalid gfn", re.compile(r"invalid gfn|slot of gfn .* doesn't exist")),
    ("ATOMIC_INC failed", re.compile(r"KVM_HC_ATOMIC_INC on gpa \S+ failed")),
    ("node refused", re.compile(r"kvm-dsm: refusing node-\d+")),
    ("connect failed", re.compile(r"kvm-dsm: node-\d+ failed to connect to node-\d+")),
    ("lockup", re.compile(r"soft lockup|hard LOCKUP|self-detected stall|detected stalls? on")),
    ("hung task", re.compile(r"blocked for more than \d+ seconds")),
    ("Oops", re.compile(r"Oops: |general protection fault")),
    ("BUG", re.compile(r"\bBUG: |kernel BUG at ")),
    ("WARNING", re.compile(r"\bWARNING: ")),
)


def scan_dmesg(text: str, run_id: str | None = None) -> list[DmesgFinding]:
    """Trouble in a host's kernel log; with `run_id`, only after that run's DMESG_RUN_MARKER."""
    lines = text.splitlines()
    if run_id is not None:
        marker = DMESG_RUN_MARKER.format(run_id=run_id)
        starts = [number for number, line in enumerate(lines) if marker in line]
        if not starts:
            if lines and not BOOT_LINE.match(lines[0]):
                raise GiantVMSpecError(
                    f"the host log no longer holds '{marker}': its ring buffer wrapped (it "
                    f"starts at '{lines[0].strip()[:60]}', not at boot), so the kernel under test "
                    "printed more than the buffer keeps since the run began; boot the host with "
                    "a larger log_buf_len= to judge its log")
            raise GiantVMSpecError(f"the host log has no '{marker}' line: the harness writes it "
                                   "to /dev/kmsg before starting the nodes; was it run as root?")
        lines = lines[starts[-1] + 1:]
    findings = []
    for line in lines:
        for kind, pattern in DMESG_PATTERNS:
            if pattern.search(line):
                findings.append(DmesgFinding(kind, line.strip()))
                break
    return findings
