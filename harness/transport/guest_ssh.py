"""SSH into the guest with paramiko: pinned host key, one deadline, backoff between attempts.

QEMU's port forward accepts TCP before the guest's sshd listens, and a just-started sshd can drop
the banner, so readiness is: an `SSH-` banner on a raw socket, then a paramiko login, retried with
exponential backoff and jitter until one wall-clock deadline. A wrong host key or a refused key is
fatal at once: retrying cannot fix it.
"""

from __future__ import annotations

import base64
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import paramiko

from harness.transport.exec import ChannelTimeout, CommandResult, exec_on_channel
from harness.errors import GuestSSHError

BACKOFF_START_S = 0.25
BACKOFF_CAP_S = 3.0
# A forwarded port (QEMU's or Bochs' slirp) accepts before the guest's sshd listens and that
# connection then stays silent, so a banner is waited for a quarter of the time spent so far,
# within these bounds: short while the guest boots, longer for a loaded or emulated host.
BANNER_WAIT_MIN_S = 0.5
BANNER_WAIT_MAX_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class SSHTarget:
    host: str
    port: int
    user: str
    key_file: Path
    host_key_type: str
    host_key_base64: str


def wait_for_banner(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False


class LoginNotYet(Exception):
    """A login attempt failed in a way that a later attempt can fix."""


class SSHNotReady(Exception):
    def __init__(self, attempts: int, last_error: str):
        super().__init__(last_error)
        self.attempts = attempts
        self.last_error = last_error


def log_in_when_ready(host: str, port: int, timeout_s: float, attempt: Callable[[float], T],
                      still_booting: Callable[[], None] = lambda: None) -> tuple[T, int]:
    """Wait for a banner, then `attempt(login timeout)`, with backoff until one deadline; the
    result and the number of attempts. `attempt` raises LoginNotYet to be retried, anything
    else to give up; `still_booting` raises if the machine died."""
    deadline = time.monotonic() + timeout_s
    delay = BACKOFF_START_S
    attempts = 0
    while True:
        attempts += 1
        attempt_started = time.monotonic()
        remaining = deadline - attempt_started
        banner_wait = min(max((timeout_s - remaining) / 4, BANNER_WAIT_MIN_S), BANNER_WAIT_MAX_S)
        if wait_for_banner(host, port, min(banner_wait, max(remaining, 0.5))):
            try:
                return attempt(min(10.0, max(remaining, 1.0))), attempts
            except LoginNotYet as error:
                last_error = str(error)
        else:
            last_error = "no SSH banner yet"
        still_booting()
        if time.monotonic() + delay > deadline:
            raise SSHNotReady(attempts, last_error)
        # the pause between attempts counts the time this attempt already waited
        time.sleep(max(0.0, delay * random.uniform(0.8, 1.2)
                       - (time.monotonic() - attempt_started)))
        delay = min(delay * 2, BACKOFF_CAP_S)


class GuestSSH:
    def __init__(self, target: SSHTarget, command_timeout_s: float):
        self.target = target
        self.command_timeout_s = command_timeout_s
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout_s: float, still_booting: Callable[[], None] = lambda: None) -> int:
        """Connect before the deadline; return the number of attempts it took.

        `still_booting` is called between attempts and should raise if the guest died, so a
        crashed VM fails fast instead of using up the whole deadline.
        """
        def attempt(login_timeout_s: float) -> paramiko.SSHClient:
            try:
                return self._login(timeout_s=login_timeout_s)
            except (paramiko.BadHostKeyException, paramiko.AuthenticationException) as error:
                raise GuestSSHError(f"SSH to {self._where()} refused for good: {error}. The "
                                    "guest is not the one this run built (stale port?) or "
                                    "its keys differ") from None
            except (paramiko.SSHException, OSError) as error:
                raise LoginNotYet(f"{type(error).__name__}: {error}") from None

        try:
            self._client, attempts = log_in_when_ready(self.target.host, self.target.port,
                                                       timeout_s, attempt, still_booting)
        except SSHNotReady as error:
            raise GuestSSHError(f"SSH to {self._where()} not ready after {timeout_s:.0f}s and "
                                f"{error.attempts} attempts; last: {error.last_error}") from None
        return attempts

    def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        """Run one command; stdout and stderr are drained before the exit status is read."""
        if self._client is None:
            raise GuestSSHError("run() before connect()")
        timeout = timeout_s or self.command_timeout_s
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestSSHError(f"the SSH connection to {self._where()} is closed")
        try:
            result = exec_on_channel(transport, command, timeout)
        except ChannelTimeout:
            raise GuestSSHError(f"`{command}` over SSH did not finish within {timeout:.0f}s") \
                from None
        output = result.stdout + result.stderr
        return CommandResult(output=output.decode(errors="replace").rstrip("\n"),
                             exit_status=result.exit_status)

    def lines(self, command: str, timeout_s: float = 30.0) -> "SSHLineSource":
        """`command`'s output line by line as it comes, on a channel of its own (a context
        manager: leaving it ends the command)."""
        if self._client is None:
            raise GuestSSHError("lines() before connect()")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestSSHError(f"the SSH connection to {self._where()} is closed")
        return SSHLineSource(transport, command, timeout_s)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _login(self, timeout_s: float) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        known_as = f"[{self.target.host}]:{self.target.port}"
        key = paramiko.PKey.from_type_string(self.target.host_key_type,
                                             base64.b64decode(self.target.host_key_base64))
        client.get_host_keys().add(known_as, self.target.host_key_type, key)
        client.connect(self.target.host, port=self.target.port, username=self.target.user,
                       key_filename=str(self.target.key_file), look_for_keys=False,
                       allow_agent=False, timeout=timeout_s, banner_timeout=timeout_s,
                       auth_timeout=timeout_s)
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        return client

    def _where(self) -> str:
        return f"{self.target.user}@{self.target.host}:{self.target.port}"


class SSHLineSource:
    """The lines of one command run in its own channel of an open SSH connection, on a pty
    (`GuestSSH.lines(command)`).

    Why a pty: closing an exec channel does not end the guest's `cat` (dropbear neither signals
    it nor closes its pipe at once), and while `cat` holds the stream file open the sampler keeps
    running and the next reader gets EBUSY. On a pty, `close()` sends Ctrl-C, which ends `cat` at
    once (the guest closes the file and stops its timers), then closes the channel. The pty turns
    line ends into CR LF; the parser strips them."""

    def __init__(self, transport: paramiko.Transport, command: str, timeout_s: float = 30.0):
        self.channel = transport.open_session(timeout=timeout_s)
        self.channel.settimeout(timeout_s)     # a guest that stops sending fails, not hangs
        self.channel.get_pty(term="dumb", width=250)
        self.channel.exec_command(command)
        self._file = self.channel.makefile("r")

    def __iter__(self) -> Iterator[str]:
        for line in self._file:
            yield line.decode(errors="replace") if isinstance(line, bytes) else line

    def close(self, wait_s: float = 3.0) -> None:
        if not self.channel.closed:
            try:
                self.channel.send(b"\x03")
                deadline = time.monotonic() + wait_s
                while not self.channel.exit_status_ready() and time.monotonic() < deadline:
                    if self.channel.recv_ready():
                        self.channel.recv(65536)
                    else:
                        time.sleep(0.02)
            except OSError:
                pass
        self.channel.close()

    def __enter__(self) -> "SSHLineSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
