"""SSH to the cluster's hosts with paramiko: pinned host keys, deadlines, detached processes,
SFTP, and channels for the forwards (forward.py). Over 400 lines because RemoteHost is one
connection with one lock and one reconnect rule that every operation here shares; the
forwards, the exec loop and the parallel runner are already their own modules.

Host keys are checked against a known_hosts file and an unknown or changed key is refused: the
harness loads kernel modules and runs QEMU as root on these machines. Trust on first use must be
asked for explicitly, and then the key it learns is written to that file so the next run pins it.

Long-running processes (the GiantVM QEMUs) are started with `setsid` under `sh`, which writes the
process-group id to a pid file in the host's work dir before it execs the command. Any later
harness invocation can therefore stop the whole group (TERM, then KILL) from that file alone.

Every remote call has a deadline; output is drained before the exit status is read (paramiko
#448), and a lost connection is reported as such instead of waiting forever.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
import shlex
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import paramiko

from harness.errors import HarnessError
from harness.transport.exec import ChannelTimeout, exec_on_channel
from harness.transport.forward import PortForward, TcpTarget, UnixTarget, open_streamlocal

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts").expanduser()
COMMAND_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
# The stop script sleeps at most grace + 5 s; the rest of its budget is for a host too busy to
# run it quickly: its /proc scan took over 15 s on an emulated host at load 24, and a stop that
# ran out of time there cost the run its verdict (docs/seed-reproduction.md).
STOP_SLACK_S = 90.0
KEEPALIVE_S = 15
_PROCESS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# `alive`: does process group $g have a member that is not a zombie? `kill -0` also counts
# zombies, which linger until init reaps them (seconds on some hosts). POSIX sh, dash, busybox.
_ALIVE = "\n".join([
    "alive() {",
    '  for s in /proc/[0-9]*/stat; do',
    '    read -r l 2>/dev/null < "$s" || continue',
    '    set -- ${l##*) }',
    '    [ "$3" = "$g" ] && [ "$1" != Z ] && return 0',
    "  done",
    "  return 1",
    "}",
])
_known_hosts_lock = threading.Lock()



class RemoteHostError(HarnessError):
    """Talking to a cluster host failed; the message names the host."""


class HostKeyError(RemoteHostError):
    """The host's key is unknown or differs from the pinned one; retrying cannot help."""


class HostUnreachable(RemoteHostError):
    """No SSH server answered at the host's address and port."""


class RemoteCommandError(RemoteHostError):
    """A remote command exited non-zero."""


class RemoteTimeout(RemoteHostError):
    """A remote command did not finish before its deadline."""


@dataclass(frozen=True)
class RemoteHostSpec:
    name: str
    address: str
    user: str = "root"
    port: int = 22
    key_file: Path | None = None
    known_hosts: Path = DEFAULT_KNOWN_HOSTS
    trust_on_first_use: bool = False
    sudo: bool = False
    work_dir: str = "/tmp/gvm-harness"
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not posixpath.isabs(self.work_dir):
            raise RemoteHostError(f"host '{self.name}': work_dir '{self.work_dir}' must be an "
                                  "absolute path")

    @property
    def where(self) -> str:
        return f"host '{self.name}' ({self.user}@{self.address}:{self.port})"


@dataclass(frozen=True)
class RemoteResult:
    host: str
    command: str
    exit_status: int
    stdout: str
    stderr: str

    def check(self) -> str:
        if self.exit_status != 0:
            detail = (self.stderr.strip() or self.stdout.strip())[-2000:]
            raise RemoteCommandError(f"host '{self.host}': `{self.command}` exited with "
                                     f"{self.exit_status}: {detail}")
        return self.stdout


@dataclass(frozen=True)
class DetachedProcess:
    host: str
    name: str
    pid: int
    pid_file: str
    log_file: str


StopOutcome = Literal["not running", "had exited", "terminated", "killed"]


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form, as `ssh-keygen -lf` prints it, so users can compare by eye."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


class _PinnedKeys(paramiko.MissingHostKeyPolicy):
    def __init__(self, spec: RemoteHostSpec):
        self.spec = spec

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        spec = self.spec
        port = "" if spec.port == 22 else f"-p {spec.port} "
        raise HostKeyError(
            f"{spec.where} offered host key {fingerprint(key)}, which is not in "
            f"{spec.known_hosts}. Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on "
            f"the host, then add it with `ssh-keyscan {port}{spec.address} >> "
            f"{spec.known_hosts}`, or allow trust on first use for this host")


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    def __init__(self, spec: RemoteHostSpec):
        self.spec = spec

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        with _known_hosts_lock:
            self.spec.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with self.spec.known_hosts.open("a") as known_hosts:
                known_hosts.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class RemoteHost:
    """One SSH connection to one host, opened on first use; safe to share between threads."""

    def __init__(self, spec: RemoteHostSpec):
        self.spec = spec
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        # one SFTP session for read_file: a tail polls several times a second, and each new
        # session starts an sftp-server on the host (seconds of CPU on an emulated one)
        self._reader: paramiko.SFTPClient | None = None
        self._reader_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def __enter__(self) -> RemoteHost:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> RemoteHost:
        with self._lock:
            if self._client is None:
                self._client = self._login()
        return self

    def close(self) -> None:
        with self._reader_lock:
            self._drop_reader()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _login(self) -> paramiko.SSHClient:
        spec = self.spec
        if spec.key_file is not None and not spec.key_file.is_file():
            raise RemoteHostError(f"{spec.where}: the key file {spec.key_file} does not exist")
        client = paramiko.SSHClient()
        if spec.known_hosts.is_file():
            client.get_host_keys().load(str(spec.known_hosts))
        client.set_missing_host_key_policy(
            _TrustOnFirstUse(spec) if spec.trust_on_first_use else _PinnedKeys(spec))
        timeout = spec.connect_timeout_s
        try:
            client.connect(spec.address, port=spec.port, username=spec.user,
                           key_filename=str(spec.key_file) if spec.key_file else None,
                           look_for_keys=spec.key_file is None, allow_agent=spec.key_file is None,
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
        except paramiko.BadHostKeyException as error:
            client.close()
            # known_hosts names a host on another port '[host]:port' (paramiko's error does not)
            entry = spec.address if spec.port == 22 else f"[{spec.address}]:{spec.port}"
            raise HostKeyError(
                f"{spec.where} offered host key {fingerprint(error.key)}, but {spec.known_hosts} "
                f"pins {fingerprint(error.expected_key)}. Someone may be intercepting the "
                f"connection; if the host was reinstalled, remove the old entry with "
                f"`ssh-keygen -R '{entry}' -f {spec.known_hosts}` and pin the new key") from None
        except paramiko.AuthenticationException as error:
            client.close()
            key = spec.key_file or "your default keys"
            raise RemoteHostError(f"{spec.where} refused the login with {key}: {error}. Add the "
                                  f"public key to ~{spec.user}/.ssh/authorized_keys on the "
                                  "host") from None
        except (socket.timeout, TimeoutError):
            client.close()
            raise HostUnreachable(f"{spec.where}: no SSH answer within {timeout:.0f}s; is the "
                                  "host up, and are the address and port right?") from None
        except paramiko.SSHException as error:
            client.close()
            raise RemoteHostError(f"{spec.where}: the SSH handshake failed: {error}") from None
        except OSError as error:
            client.close()
            if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
                error = next(iter(error.errors.values()))  # the one address we tried
            raise HostUnreachable(f"{spec.where}: cannot connect: {error}; is the host up and "
                                  f"its sshd listening on port {spec.port}?") from None
        except HostKeyError:
            client.close()
            raise
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_S)
        return client

    @property
    def connected(self) -> bool:
        client = self._client
        transport = client.get_transport() if client is not None else None
        return transport is not None and transport.is_active()

    def _transport(self) -> paramiko.Transport:
        self.connect()
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is None or not transport.is_active():
            raise RemoteHostError(f"{self.spec.where}: the SSH connection was lost; "
                                  "reconnect with close() and connect()")
        return transport

    def _privileged(self, command: str) -> str:
        if self.spec.sudo and self.spec.user != "root":
            return f"sudo -n sh -c {shlex.quote(command)}"
        return command

    def run(self, command: str | Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S,
            check: bool = False, as_root: bool = False) -> RemoteResult:
        """Run a shell command (or an argv, quoted for the shell) before a deadline."""
        text = command if isinstance(command, str) else shlex.join(command)
        try:
            transport = self._transport()
            output = exec_on_channel(transport, self._privileged(text) if as_root else text,
                                     timeout_s)
            if output.exit_status == -1 and not transport.is_active():
                raise RemoteHostError(f"{self.spec.where}: the connection was lost while "
                                      f"running `{text}`")
        except ChannelTimeout:
            raise RemoteTimeout(f"{self.spec.where}: `{text}` did not finish within "
                                f"{timeout_s:.0f}s") from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise RemoteHostError(f"{self.spec.where}: `{text}` failed: {error}") from None
        status, stdout, stderr = output.exit_status, output.stdout, output.stderr
        result = RemoteResult(host=self.name, command=text, exit_status=status,
                              stdout=stdout.decode(errors="replace"),
                              stderr=stderr.decode(errors="replace"))
        if check:
            result.check()
        return result

    def start_detached(self, name: str, argv: Sequence[str], as_root: bool = False,
                       timeout_s: float = 15.0) -> DetachedProcess:
        """Start `argv` in its own session; it outlives this connection and this harness."""
        pid_file, log_file = self._process_files(name)
        pid, log = shlex.quote(pid_file), shlex.quote(log_file)
        # sh -c writes its own pid ($$, also the group id under setsid) and then becomes argv.
        record_and_exec = 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec "$@"'
        script = "\n".join([
            _ALIVE,
            f"mkdir -p {shlex.quote(posixpath.dirname(pid_file))} || exit 1",
            f'if [ -s {pid} ] && g=$(cat {pid}) && alive; then',
            '  echo "already running as process group $g" >&2; exit 17',
            "fi",
            f"rm -f {pid}",
            f"setsid sh -c {shlex.quote(record_and_exec)} {pid} {shlex.join(argv)} "
            f"> {log} 2>&1 < /dev/null &",
            "i=0",
            f'while [ ! -s {pid} ] && [ "$i" -lt 100 ]; do sleep 0.05; i=$((i+1)); done',
            f'[ -s {pid} ] || {{ echo "no pid file after 5s" >&2; exit 18; }}',
            f"g=$(cat {pid})",
            "sleep 0.2",
            f'alive || {{ echo "exited at once:" >&2; tail -n 20 {log} >&2; rm -f {pid}; '
            "exit 19; }",
            'echo "$g"',
        ])
        result = self.run(script, timeout_s=timeout_s, as_root=as_root)
        if result.exit_status != 0:
            raise RemoteHostError(f"{self.spec.where}: could not start '{name}' "
                                  f"(`{shlex.join(argv)}`): {result.stderr.strip()}"
                                  f"{'; stop it first' if result.exit_status == 17 else ''}")
        return DetachedProcess(host=self.name, name=name, pid=int(result.stdout.strip()),
                               pid_file=pid_file, log_file=log_file)

    def running_pid(self, name: str, as_root: bool = False) -> int | None:
        """The process group of a detached process if any of it still runs."""
        pid = shlex.quote(self._process_files(name)[0])
        result = self.run(f'{_ALIVE}\n[ -s {pid} ] && g=$(cat {pid}) && alive && echo "$g"',
                          as_root=as_root)
        return int(result.stdout) if result.exit_status == 0 else None

    def stop_detached(self, name: str, grace_s: float = STOP_GRACE_S,
                      as_root: bool = False) -> StopOutcome:
        """TERM the whole process group, KILL it after `grace_s`; works from any invocation."""
        pid = shlex.quote(self._process_files(name)[0])
        steps = max(1, round(grace_s / 0.1))
        script = "\n".join([
            _ALIVE,
            f'[ -s {pid} ] || {{ echo "not running"; exit 0; }}',
            f"g=$(cat {pid})",
            f'alive || {{ rm -f {pid}; echo "had exited"; exit 0; }}',
            'kill -TERM -"$g" 2>/dev/null',
            "i=0",
            f'while alive && [ "$i" -lt {steps} ]; do sleep 0.1; i=$((i+1)); done',
            f'alive || {{ rm -f {pid}; echo terminated; exit 0; }}',
            'kill -KILL -"$g" 2>/dev/null',
            "i=0",
            'while alive && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done',
            f'alive || {{ rm -f {pid}; echo killed; exit 0; }}',
            'echo "process group $g survived SIGKILL for 5s" >&2; exit 1',
        ])
        result = self.run(script, timeout_s=grace_s + 5 + STOP_SLACK_S, as_root=as_root)
        if result.exit_status != 0:
            raise RemoteHostError(f"{self.spec.where}: could not stop '{name}': "
                                  f"{result.stderr.strip()}; it may be stuck in the kernel "
                                  "(state D); look at it with `ps -eo pid,stat,wchan,cmd`")
        return result.stdout.strip()  # type: ignore[return-value]

    def _process_files(self, name: str) -> tuple[str, str]:
        if not _PROCESS_NAME.fullmatch(name):
            raise RemoteHostError(f"process name '{name}' must be letters, digits, '.', '_' "
                                  "or '-'")
        base = f"{self.spec.work_dir}/proc/{name}"
        return f"{base}.pid", f"{base}.log"

    @contextmanager
    def sftp(self, stall_timeout_s: float = 60.0) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session whose reads and writes fail after `stall_timeout_s` without progress."""
        try:
            client = self._open_sftp(stall_timeout_s)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise RemoteHostError(f"{self.spec.where}: cannot open SFTP: {error}") from None
        try:
            yield client
        finally:
            client.close()

    def _open_sftp(self, stall_timeout_s: float) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(self._transport())
        assert client is not None
        client.get_channel().settimeout(stall_timeout_s)
        return client

    def read_file(self, path: str, offset: int = 0, max_bytes: int = 16 << 20) -> bytes:
        """Up to `max_bytes` of a remote file from `offset`, so a growing log can be tailed."""
        with self._reader_lock:
            try:
                if self._reader is None:
                    self._reader = self._open_sftp(stall_timeout_s=60.0)
                with self._reader.open(path, "rb") as remote:
                    remote.seek(offset)
                    return remote.read(max_bytes)
            except FileNotFoundError:
                raise RemoteHostError(f"{self.spec.where}: {path} does not exist") from None
            except (paramiko.SSHException, OSError, EOFError) as error:
                self._drop_reader()  # the next read opens a fresh session
                raise RemoteHostError(f"{self.spec.where}: cannot read {path}: {error}") \
                    from None

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def open_channel_to(self, target: TcpTarget | UnixTarget,
                        origin: tuple[str, int] = ("127.0.0.1", 0),
                        timeout_s: float = 10.0) -> paramiko.Channel:
        """A byte stream to a TCP port or unix socket on (or reachable from) the host."""
        try:
            transport = self._transport()
            if isinstance(target, TcpTarget):
                return transport.open_channel("direct-tcpip", (target.host, target.port), origin,
                                              timeout=timeout_s)
            return open_streamlocal(transport, target.path, timeout_s)
        except paramiko.ChannelException as error:
            if error.code == paramiko.common.OPEN_FAILED_UNKNOWN_CHANNEL_TYPE:
                raise RemoteHostError(f"{self.spec.where}: its SSH server cannot forward to "
                                      f"{target} ({error.text}); dropbear forwards TCP only, "
                                      "OpenSSH's sshd both") from None
            raise RemoteHostError(f"{self.spec.where} could not connect to {target}: "
                                  f"{error.text}; is anything listening there?") from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise RemoteHostError(f"{self.spec.where}: forwarding to {target} failed: "
                                  f"{error}") from None

    def forward(self, target: TcpTarget | UnixTarget, local_port: int = 0,
                local_path: Path | None = None) -> PortForward:
        """Listen on 127.0.0.1:local_port (or the unix socket local_path) here; each connection
        is relayed to `target`."""
        self._transport()
        return PortForward(self, target, local_port, local_path)
