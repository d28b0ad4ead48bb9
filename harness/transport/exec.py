"""One command over one SSH channel: the exec loop that hosts (RemoteHost) and guests (GuestSSH)
share, and the result type every transport returns (the serial console too).

stdout and stderr are drained while the command runs, not after: a command that writes more
than the channel's window would otherwise block for ever waiting for us to read.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass

import paramiko

from harness.errors import CommandError


@dataclass(frozen=True)
class CommandResult:
    """What a command printed (stdout then stderr for SSH; the console's one stream) and its code."""

    output: str
    exit_status: int

    def check(self, command: str) -> str:
        if self.exit_status != 0:
            raise CommandError(f"`{command}` exited with {self.exit_status}: "
                               f"{self.output.strip()}")
        return self.output


@dataclass(frozen=True)
class ChannelOutput:
    exit_status: int  # -1: the channel closed without one (connection lost)
    stdout: bytes
    stderr: bytes


OPEN_RETRIES = 5
OPEN_RETRY_PAUSE_S = 0.5


def started_command(transport: paramiko.Transport, command: str,
                    deadline: float) -> paramiko.Channel:
    """A channel running `command`. A busy server (dropbear on an emulated host under load, or
    just booted on one CPU) may refuse a channel while it still closes the previous ones, or
    close a fresh one instead of running its command ("Channel closed."); either is retried a few
    times before the deadline, a lost connection is not. The command never ran in either case."""
    attempts = 0
    while True:
        channel = None
        try:
            channel = transport.open_session(timeout=max(1.0, deadline - time.monotonic()))
            channel.exec_command(command)
            return channel
        except paramiko.SSHException:
            if channel is not None:
                channel.close()
            attempts += 1
            if not transport.is_active() or attempts == OPEN_RETRIES or \
                    time.monotonic() + OPEN_RETRY_PAUSE_S * attempts > deadline:
                raise
            time.sleep(OPEN_RETRY_PAUSE_S * attempts)


class ChannelTimeout(Exception):
    """The command did not finish before its deadline; its channel was closed."""


def exec_on_channel(transport: paramiko.Transport, command: str,
                    timeout_s: float) -> ChannelOutput:
    """Run `command` on a new session channel; raise ChannelTimeout past `timeout_s`.

    paramiko's SSHException, OSError and EOFError pass through: each caller names its peer.
    """
    deadline = time.monotonic() + timeout_s
    channel = started_command(transport, command, deadline)
    try:
        stdout, stderr = bytearray(), bytearray()
        while True:
            while channel.recv_ready():
                stdout += channel.recv(65536)
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(65536)
            if channel.exit_status_ready() and not channel.recv_ready() \
                    and not channel.recv_stderr_ready():
                return ChannelOutput(channel.recv_exit_status(), bytes(stdout), bytes(stderr))
            if time.monotonic() > deadline:
                raise ChannelTimeout(command)
            select.select([channel], [], [], 0.1)
    finally:
        channel.close()
