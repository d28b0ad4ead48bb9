"""Stock QEMU on a remote host reached over SSH, reachable from here as if it ran on this machine.

The launch line is QemuLauncher's, with every path on the remote host: the kernel and initramfs
are uploaded (sha256-checked, skipped when the host already has them) to the host's content-
addressed artifact store, and the kernel console file, the ttyS1 socket and QEMU's pid file live
in a per-run directory under the host's work dir. QEMU runs detached (setsid, pid file), so it
outlives the SSH connection, and any later invocation can stop it from the pid file alone.

QEMU's lifecycle is transport/remote_process.py's (an exit-recording `sh`, so a later look can
tell how it ended); its consoles and SSH are made local by transport/remote_console.py, so the
suite reads a local console file and connects to a local socket and port as with a local QEMU.
"""

from __future__ import annotations

import random
import re
import shlex
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

from harness.backends.base import (BootSpec, GuestEndpoints, HostKernelFailure, HostLog,
                                   StartSpec, unix_socket_path)
from harness.backends.local_qemu import QemuLauncher
from harness.config import STOCK_LAUNCHER, ClusterConfig, HostConfig
from harness.errors import BootError, HarnessError
from harness.hosts import connect_host
from harness.run_folder import RunFolder
from harness.transport.artifacts import (ARTIFACT_DIR, artifact_path, remove_secret, sha256_file,
                                        upload_file)
from harness.transport.remote_console import ConsoleTail, RemoteConsole, RemotePlaces
from harness.transport.remote_host import DetachedProcess, RemoteHost, RemoteHostError
from harness.transport.remote_process import RemoteProcess, exit_recording_argv

REMOTE_RUNS = "runs"  # under the host's work_dir: one directory per run
EXIT_FILE = "qemu.exit"
CONSOLE_FILE = "console-kernel.log"
SHELL_SOCKET = "console-shell.sock"
QEMU_LOG = "qemu.log"
SOCKET_WAIT_S = 30.0
REMOTE_PORT_RANGE = (20000, 32767)  # below Linux's default ephemeral range
ACCELERATORS = ("tcg", "kvm")
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def free_remote_port(host: RemoteHost, low: int = REMOTE_PORT_RANGE[0],
                     high: int = REMOTE_PORT_RANGE[1], rng: random.Random | None = None) -> int:
    """A TCP port no socket uses on the host (any state, IPv4 and IPv6), for QEMU's hostfwd."""
    output = host.run(read_existing_command(PROC_NET_TCP), check=True, timeout_s=15).stdout
    used = used_ports(output)
    rng = rng or random.Random()
    for _ in range(1000):
        port = rng.randint(low, high)
        if port not in used:
            return port
    raise RemoteHostError(f"{host.spec.where}: no free TCP port between {low} and {high}")


def read_existing_command(paths: Sequence[str]) -> str:
    """`cat` of those of `paths` that exist: a host booted without IPv6 has no /proc/net/tcp6."""
    return f'for f in {shlex.join(paths)}; do if [ -r "$f" ]; then cat "$f"; fi; done'


def used_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in /proc/net/tcp{,6} text (`sl local_address rem_address st ...`)."""
    ports = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[0].endswith(":") and ":" in fields[1]:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass(frozen=True)
class RemoteGuestState:
    """Everything needed to reach (or stop) a remote guest again; plain data, JSON-able."""

    host: str
    process_name: str
    pid: int
    accelerator: str
    remote_run_dir: str
    remote_console_log: str
    remote_shell_socket: str
    remote_ssh_port: int
    remote_qemu_log: str
    exit_file: str
    local_console_log: str
    local_shell_socket: str
    local_ssh_port: int  # asked for; 0: any free port (the guest's endpoints say which)
    remote_initrd: str = ""  # this run's initramfs on the host, removed at stop ("": older runs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RemoteQemuLauncher:
    """One stock QEMU on `host`; `boot` names the local kernel and initramfs to upload."""

    host: RemoteHost
    qemu_binary: str
    boot: BootSpec
    local_dir: Path  # this run's folder here: the tailed console log and the serial socket
    remote_ssh_port: int  # QEMU's hostfwd port on the remote host's loopback
    accelerator: str = "tcg"
    local_ssh_port: int = 0  # 0: any free loopback port, chosen at start
    run_id: str = ""  # names the remote run directory; default: local_dir's name

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise BootError(f"the remote QEMU launcher runs with accel 'tcg' or 'kvm', not "
                            f"'{self.accelerator}' (a KVM test boot on a remote host is not "
                            "implemented); set vm.accel explicitly")
        for what, port in (("remote_ssh_port", self.remote_ssh_port),
                           ("local_ssh_port", self.local_ssh_port)):
            if not (what == "local_ssh_port" and port == 0) and not 1 <= port <= 65535:
                raise BootError(f"{what} {port} is not a TCP port")

    @property
    def name(self) -> str:
        return _SAFE_NAME.sub("_", self.run_id or self.local_dir.name) or "run"

    @property
    def process_name(self) -> str:
        return f"qemu-{self.name}"

    @property
    def remote_run_dir(self) -> str:
        return f"{self.host.spec.work_dir}/{REMOTE_RUNS}/{self.name}"

    @cached_property
    def _digests(self) -> tuple[str, str]:
        return sha256_file(self.boot.kernel), sha256_file(self.boot.initrd)

    @property
    def remote_kernel(self) -> str:
        return artifact_path(f"{self.host.spec.work_dir}/{ARTIFACT_DIR}", self._digests[0],
                             self.boot.kernel.name)

    @property
    def remote_initrd(self) -> str:
        return artifact_path(f"{self.host.spec.work_dir}/{ARTIFACT_DIR}", self._digests[1],
                             self.boot.initrd.name)

    def qemu(self) -> QemuLauncher:
        """The local launcher's line, with the remote host's paths and port."""
        remote_boot = BootSpec(kernel=Path(self.remote_kernel), initrd=Path(self.remote_initrd),
                               cmdline=self.boot.cmdline, vcpus=self.boot.vcpus,
                               memory_mb=self.boot.memory_mb)
        return QemuLauncher(qemu_binary=self.qemu_binary, accelerator=self.accelerator,
                            boot=remote_boot, run_dir=Path(self.remote_run_dir),
                            ssh_port=self.remote_ssh_port)

    @property
    def remote_endpoints(self) -> GuestEndpoints:
        """Where QEMU puts the consoles and SSH, as seen on the remote host."""
        return self.qemu().endpoints

    @property
    def endpoints(self) -> GuestEndpoints:
        """Where the guest will be reachable here (a port of 0 is chosen at start)."""
        return GuestEndpoints(kernel_console_log=self.local_dir / CONSOLE_FILE,
                              shell_socket=unix_socket_path(self.local_dir, SHELL_SOCKET),
                              ssh_host="127.0.0.1", ssh_port=self.local_ssh_port)

    @property
    def exit_file(self) -> str:
        return f"{self.remote_run_dir}/{EXIT_FILE}"

    def command_lines(self) -> list[list[str]]:
        """QEMU's line as it runs on the remote host."""
        return self.qemu().command_lines()

    def remote_argv(self) -> list[str]:
        """What is started detached: QEMU's line under an `sh` that records its exit code."""
        (qemu,) = self.command_lines()
        return exit_recording_argv(qemu, self.exit_file)

    def state(self, process: DetachedProcess) -> RemoteGuestState:
        remote = self.remote_endpoints
        local = self.endpoints
        return RemoteGuestState(
            host=self.host.name, process_name=process.name, pid=process.pid,
            accelerator=self.accelerator, remote_run_dir=self.remote_run_dir,
            remote_console_log=str(remote.kernel_console_log),
            remote_shell_socket=str(remote.shell_socket), remote_ssh_port=self.remote_ssh_port,
            remote_qemu_log=process.log_file,
            exit_file=self.exit_file, local_console_log=str(local.kernel_console_log),
            local_shell_socket=str(local.shell_socket), local_ssh_port=self.local_ssh_port,
            remote_initrd=self.remote_initrd)

    def start(self) -> RemoteQemuGuest:
        host = self.host
        host.connect()  # a wrong host key or a dead host fails here, before any upload
        for local, remote, digest in ((self.boot.kernel, self.remote_kernel, self._digests[0]),
                                      (self.boot.initrd, self.remote_initrd, self._digests[1])):
            upload_file(host, local, remote, digest)
        running = host.running_pid(self.process_name)
        if running is not None:  # before anything of its run directory is touched
            raise BootError(f"QEMU did not start on {host.spec.where}: '{self.process_name}' is "
                            f"already running as process group {running}; stop it first")
        remote = self.remote_endpoints
        stale = [str(remote.kernel_console_log), str(remote.shell_socket), self.exit_file,
                 f"{self.remote_run_dir}/qemu.pid"]
        host.run(f"mkdir -p {shlex.quote(self.remote_run_dir)} && rm -f {shlex.join(stale)}",
                 check=True)
        try:
            process = host.start_detached(self.process_name, self.remote_argv())
        except RemoteHostError as error:
            raise BootError(f"QEMU did not start: {error}") from None
        guest = RemoteQemuGuest(host, self.state(process))
        try:
            guest.wait_for_remote_socket(SOCKET_WAIT_S)
            guest.open_local(fresh=True)
        except BaseException:
            guest.stop()
            raise
        return guest


@dataclass
class RemoteQemuGuest:
    """A QEMU running on a remote host, with local forwards to its consoles and SSH."""

    host: RemoteHost
    state: RemoteGuestState
    process: RemoteProcess = field(init=False)
    console: RemoteConsole = field(init=False)

    def __post_init__(self) -> None:
        state = self.state
        self.process = RemoteProcess(self.host, state.process_name, state.pid,
                                     state.remote_qemu_log, state.exit_file)
        self.console = RemoteConsole(self.host, RemotePlaces(
            state.remote_console_log, state.remote_shell_socket, state.remote_ssh_port,
            Path(state.local_console_log), Path(state.local_shell_socket),
            state.local_ssh_port))

    @property
    def endpoints(self) -> GuestEndpoints:
        return GuestEndpoints(kernel_console_log=Path(self.state.local_console_log),
                              shell_socket=Path(self.state.local_shell_socket),
                              ssh_host="127.0.0.1", ssh_port=self.console.local_ssh_port)

    one_clock = True

    @property
    def accelerator(self) -> str:
        return self.state.accelerator

    @property
    def pid(self) -> int:
        """The remote process group (the recording `sh`; QEMU's own pid is in qemu.pid)."""
        return self.state.pid

    @property
    def where(self) -> str:
        return self.host.name

    @property
    def tail(self) -> ConsoleTail | None:
        return self.console.tail

    @property
    def stop_outcome(self) -> str | None:
        return self.process.stop_outcome

    @classmethod
    def attach(cls, host: RemoteHost, state: RemoteGuestState) -> RemoteQemuGuest:
        """Reach a guest an earlier invocation started; the local console log is resumed."""
        guest = cls(host, state)
        guest.open_local(fresh=False)
        return guest

    def record(self) -> RemoteGuestState:
        return self.state

    def host_logs(self) -> list[HostLog]:
        return []  # the host is the user's; its kernel log is not the kernel under test

    def host_counters(self) -> dict[str, dict[str, int]]:
        return {}  # no DSM

    def host_kernel_failure(self) -> HostKernelFailure | None:
        return None  # the host's kernel is not under test here

    def platform_caveat(self) -> str | None:
        return None

    def open_local(self, fresh: bool) -> None:
        """Start the console tail and the two forwards; undone by `close_local`."""
        self.console.open(fresh)

    def close_local(self) -> None:
        """Close the forwards and stop the tail (QEMU keeps running); safe to call twice."""
        self.console.close()

    def wait_for_remote_socket(self, timeout_s: float) -> None:
        """Wait (on the host, in one command) until QEMU opened ttyS1's socket."""
        steps = max(1, round(timeout_s / 0.1))
        sock, exit_file = (shlex.quote(self.state.remote_shell_socket),
                           shlex.quote(self.state.exit_file))
        script = "\n".join([
            "i=0",
            f"while [ ! -S {sock} ]; do",
            f'  [ -s {exit_file} ] && {{ echo "exited $(cat {exit_file})"; exit 3; }}',
            f'  kill -0 {self.state.pid} 2>/dev/null || {{ echo "gone"; exit 4; }}',
            f'  [ "$i" -ge {steps} ] && {{ echo timeout; exit 5; }}',
            "  sleep 0.1; i=$((i+1))",
            "done",
        ])
        result = self.host.run(script, timeout_s=timeout_s + 15)
        if result.exit_status == 0:
            return
        where = self.host.spec.where
        if result.exit_status == 5:
            raise BootError(f"QEMU on {where} did not create {self.state.remote_shell_socket} "
                            f"within {timeout_s:.0f}s; see {self.state.remote_qemu_log} there")
        raise BootError(f"QEMU on {where} exited before it opened "
                        f"{self.state.remote_shell_socket} ({result.stdout.strip()}): "
                        f"{self.qemu_log_tail()}")

    def exit_status(self) -> int | None:
        """None while QEMU runs; its exit code once it stopped (-N: killed by signal N; -1:
        gone without a code)."""
        return self.process.exit_status()

    def login_command(self, client_key: str) -> str | None:
        return None  # the SSH forward is this process's

    def qemu_log_tail(self, lines: int = 10) -> str:
        return self.process.log_tail(lines)

    def detach(self) -> None:
        self.close_local()
        self.host.close()

    def stop(self) -> None:
        """Stop QEMU's process group on the host (TERM, then KILL), the forwards and the tail,
        then remove this run's initramfs (the guest's keys) from the host.

        Safe to call twice. If the host cannot be reached, the local side is still closed and a
        RemoteHostError says how to stop QEMU by hand; a later call tries again.
        """
        self.close_local()
        if self.process.stop_outcome is None:
            try:
                self.process.stop()
            except RemoteHostError as error:
                raise RemoteHostError(f"could not stop QEMU on {self.host.spec.where}: "
                                      f"{error}") from None
            self.console.poll()  # the last lines QEMU wrote
            self.process.copy_log(Path(self.state.local_console_log).parent / QEMU_LOG)
        if self.state.remote_initrd:
            remove_secret(self.host, self.state.remote_initrd)


@dataclass(frozen=True)
class RemoteQemuBackend:
    """One stock QEMU on the config's first host when that host is not this machine."""

    kind = "remote-qemu"

    def wants(self, config: ClusterConfig) -> bool:
        return config.vm.launcher == STOCK_LAUNCHER and not config.hosts[0].is_local

    def judged_config(self, config: ClusterConfig) -> ClusterConfig:
        return config

    def hosts_to_reach(self, config: ClusterConfig) -> list[HostConfig]:
        return [config.hosts[0]]

    def atomic_inc_mode(self, config: ClusterConfig) -> str | None:
        return None

    def start(self, spec: StartSpec) -> RemoteQemuGuest:
        config, host_config = spec.config, spec.config.hosts[0]
        # No KVM test boot on remote hosts yet: `auto` means TCG there.
        accelerator = "tcg" if config.vm.accel == "auto" else config.vm.accel
        host = connect_host(host_config)
        try:
            launcher = RemoteQemuLauncher(host=host, qemu_binary=config.vm.qemu_binary,
                                          boot=spec.boot, local_dir=spec.run.path,
                                          remote_ssh_port=free_remote_port(host),
                                          accelerator=accelerator)
            spec.run.write_json("launch.json", {"accelerator": accelerator,
                                                "host": host_config.name,
                                                "command_lines": launcher.command_lines()})
            with spec.progress.step(f"start QEMU on {host_config.name}"):
                return launcher.start()
        except BaseException:
            host.close()
            raise

    def attach(self, config: ClusterConfig, run: RunFolder, record: dict,
               forwards: bool) -> RemoteQemuGuest:
        state = RemoteGuestState(**record)
        hosts = {host.name: host for host in config.hosts}
        if state.host not in hosts:
            raise HarnessError(f"{run.path} ran its guest on host '{state.host}', which "
                               f"{config.path} no longer names")
        host = connect_host(hosts[state.host])
        return RemoteQemuGuest.attach(host, state) if forwards else RemoteQemuGuest(host, state)
