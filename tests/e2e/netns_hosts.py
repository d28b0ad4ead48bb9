"""Stand-in cluster hosts: network namespaces on a private bridge, each running its own sshd.

Each host is a network namespace with one veth into a bridge in the root namespace. The /24 they
share exists only on interfaces created here (the bridge holds .1 so this process can reach the
hosts; no physical port is on the bridge, so nothing leaves the machine). Every host runs its own
OpenSSH sshd: its own config and ed25519 host key in a temporary directory, listening on the
namespace's address only, accepting one client key generated for this run.

The namespaces share this machine's kernel and file system: a host's "remote" files are local
files, and a process started on a host is a local process in that namespace (`ip netns pids`).

`NetnsLab.create` undoes whatever it managed to set up if a later step fails, and `close` kills
every process in the namespaces and deletes them, the veths and the bridge; it is safe to call
twice. Names carry this process's pid, so parallel test runs do not collide.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

SSHD = "/usr/sbin/sshd"
SUBNET_PREFIX = "10.231"
SUBNET_LOCK = "/run/lock/gvm-harness-netns-subnets.lock"
FIRST_HOST_OCTET = 11
UNUSED_OCTET = 99  # an address in the /24 that no host has
SSHD_READY_S = 10.0


class LabUnavailable(Exception):
    """Namespaces or sshd cannot be set up here; the tests should skip with this reason."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise LabUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


@dataclass
class NetnsHost:
    name: str
    namespace: str
    address: str
    directory: Path
    host_key_line: str  # "ssh-ed25519 AAAA..." as in the .pub file
    sshd: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def work_dir(self) -> Path:
        return self.directory / "work"


@dataclass
class NetnsLab:
    root: Path
    subnet: str  # "10.231.7"
    bridge: str
    client_key: Path
    known_hosts: Path
    hosts: list[NetnsHost] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # the bridge and the veths' outer ends

    @property
    def unused_address(self) -> str:
        return f"{self.subnet}.{UNUSED_OCTET}"

    @classmethod
    def create(cls, root: Path, count: int) -> NetnsLab:
        if os.geteuid() != 0:
            raise LabUnavailable("network namespaces need root")
        for tool in ("ip", "ssh-keygen", SSHD):
            if shutil.which(tool) is None:
                raise LabUnavailable(f"{tool} is not installed (apt-get install iproute2 "
                                     "openssh-server)")
        tag = str(os.getpid())
        # two test runs at once must not pick the same subnet: choose and claim under a lock
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = _free_subnet()
            lab = cls(root=root, subnet=subnet, bridge=f"gvbr{tag}",
                      client_key=root / "client_key", known_hosts=root / "known_hosts")
            try:
                _ip("link", "add", lab.bridge, "type", "bridge")
                lab.links.append(lab.bridge)
                _ip("addr", "add", f"{subnet}.1/24", "dev", lab.bridge)
            except BaseException:
                lab.close()
                raise
        try:
            _ip("link", "set", lab.bridge, "up")
            _keygen(lab.client_key, "gvm-harness netns test client")
            (root / "authorized_keys").write_text(
                lab.client_key.with_suffix(".pub").read_text())
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
            for index in range(count):
                lab._add_host(index, tag)
            lab.known_hosts.write_text("".join(f"{host.address} {host.host_key_line}\n"
                                               for host in lab.hosts))
            for host in lab.hosts:
                lab.start_sshd(host)
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_host(self, index: int, tag: str) -> None:
        name = f"h{index + 1}"
        namespace = f"gvm-{tag}-{name}"
        outside = f"gv{tag}{name}"
        _ip("netns", "add", namespace)
        host = NetnsHost(name=name, namespace=namespace,
                         address=f"{self.subnet}.{FIRST_HOST_OCTET + index}",
                         directory=self.root / name, host_key_line="")
        self.hosts.append(host)  # from here on close() removes the namespace
        _ip("link", "add", outside, "type", "veth", "peer", "name", f"{outside}p")
        self.links.append(outside)
        _ip("link", "set", f"{outside}p", "netns", namespace)
        _ip("-n", namespace, "link", "set", f"{outside}p", "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        host.work_dir.mkdir(parents=True)
        _keygen(host.directory / "ssh_host_ed25519_key", f"{name} host key")
        host.host_key_line = " ".join(
            (host.directory / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        (host.directory / "sshd_config").write_text("\n".join([
            f"ListenAddress {host.address}",
            "Port 22",
            f"HostKey {host.directory / 'ssh_host_ed25519_key'}",
            f"PidFile {host.directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
            "",
        ]))

    def start_sshd(self, host: NetnsHost) -> None:
        config = host.directory / "sshd_config"
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise LabUnavailable(f"sshd refuses {config}: {check.stderr.strip()}")
        log = (host.directory / "sshd.log").open("ab")
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, SSHD, "-D", "-e", "-f", str(config)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + SSHD_READY_S
        while not _banner(host.address):
            if host.sshd.poll() is not None or time.monotonic() > deadline:
                raise LabUnavailable(f"sshd for {host.name} did not come up: "
                                     f"{(host.directory / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)

    def kill_sshd(self, host: NetnsHost) -> None:
        """Kill the host's sshd and every session it forked, like a host going down."""
        for pid in self.pids(host):
            if _comm(pid) == "sshd":
                _kill(pid, signal.SIGKILL)
        if host.sshd is not None:
            host.sshd.wait(timeout=5)
            host.sshd = None

    def pids(self, host: NetnsHost) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True,
                                text=True, timeout=10)
        return [int(pid) for pid in result.stdout.split()]

    def close(self) -> None:
        for host in self.hosts:
            for _ in range(3):  # a process may fork while we kill; bounded retries
                pids = self.pids(host)
                if not pids:
                    break
                for pid in pids:
                    _kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            if host.sshd is not None:
                host.sshd.wait(timeout=5)
                host.sshd = None
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True,
                           timeout=10)
        self.hosts.clear()
        for link in reversed(self.links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        self.links.clear()


def _free_subnet() -> str:
    """A 10.231.X /24 that no interface or route of this machine uses yet."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for third in range(7, 255):
        candidate = f"{SUBNET_PREFIX}.{third}"
        if f"{candidate}." not in used:
            return candidate
    raise LabUnavailable(f"every {SUBNET_PREFIX}.X.0/24 is in use on this machine")


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True, timeout=10)


def _banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=0.5) as connection:
            connection.settimeout(1.0)
            return connection.recv(4) == b"SSH-"
    except OSError:
        return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


@contextmanager
def lab_or_skip(root: Path, count: int) -> Iterator[NetnsLab]:
    """A lab of `count` hosts for a fixture: skips the tests where none can be made, and always
    tears it down."""
    try:
        lab = NetnsLab.create(root, count=count)
    except LabUnavailable as reason:
        pytest.skip(f"no network-namespace hosts here: {reason}")
    try:
        yield lab
    finally:
        lab.close()
