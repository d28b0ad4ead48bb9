"""The interactive serial console (ttyS1): log in, then run commands framed by unique markers.

Every command is wrapped as `printf BEGIN; { cmd\n}; printf END_<exit code>`, where each marker
is printed from two separate strings so the echo of the command line can never match it. The braces
make it one command (multi-line commands work, and no prompt is printed in between; PS2 is empty).
Output is what lies between the markers, with the tty's `\\r` removed. The whole conversation goes
to a transcript file.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from harness.errors import ConsoleError
from harness.transport.exec import CommandResult

PROMPT = "gvm-console# "
LOGIN_PROMPT = re.compile(r"login: ?$", re.M)
PASSWORD_PROMPT = re.compile(r"[Pp]assword: ?$", re.M)
# BusyBox ash follows its prompt with a cursor-position query (ESC [6n).
SHELL_PROMPT = re.compile(r"[#$] (?:\x1b\[6n)?$")
MARKER_PREFIX = "__GVM_"


class SerialConsole:
    def __init__(self, socket_path: Path, transcript: Path, command_timeout_s: float):
        self.socket_path = socket_path
        self.command_timeout_s = command_timeout_s
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.connect(str(socket_path))
        except OSError as error:
            raise ConsoleError(f"cannot connect to the serial console {socket_path}: {error}") \
                from None
        self._transcript = transcript.open("a", encoding="utf-8")
        self._child = pexpect.fdpexpect.fdspawn(self._socket.fileno(), encoding="utf-8",
                                                codec_errors="replace", searchwindowsize=4096)
        self._child.logfile_read = self._transcript

    def login(self, user: str, password: str, timeout_s: float) -> None:
        """Log in at the getty, or take over a shell a previous session left logged in."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._child.send("\n")
            index = self._expect([LOGIN_PROMPT, PASSWORD_PROMPT, re.escape(PROMPT), SHELL_PROMPT],
                                 timeout=min(3.0, max(0.1, deadline - time.monotonic())),
                                 what="a login prompt", fatal=time.monotonic() > deadline)
            if index is None:
                continue
            if index == 0:
                self._child.send(user + "\n")
                self._expect([PASSWORD_PROMPT], timeout=10, what="the password prompt")
                self._child.send(password + "\n")
                if self._expect([SHELL_PROMPT, LOGIN_PROMPT], timeout=15,
                                what="a shell prompt after login") == 1:
                    raise ConsoleError(f"login as {user} on {self.socket_path} was refused; "
                                       "is the guest's root password the one in keys/?")
            elif index == 1:
                continue
            break
        self._child.send(f"stty -echo; export TERM=dumb; PS1='{PROMPT}'; PS2=''\n")
        self.run("true")

    def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        token = secrets.token_hex(6)
        begin = f"{MARKER_PREFIX}{token}_B__"
        end = re.compile(re.escape(f"{MARKER_PREFIX}{token}_E_") + r"(\d+)__")
        self._child.send(f"printf '%s%s\\n' '{MARKER_PREFIX}' '{token}_B__'; {{ {command}\n}}; "
                         f"printf '\\n%s%s%d__\\n' '{MARKER_PREFIX}' '{token}_E_' \"$?\"\n")
        timeout = timeout_s or self.command_timeout_s
        self._expect([re.escape(begin)], timeout=timeout, what=f"the start of `{command}`")
        self._expect([end], timeout=timeout, what=f"the end of `{command}`")
        output = self._child.before.replace("\r", "")
        output = output[1:] if output.startswith("\n") else output
        # Trailing newlines go, as in the shell's $(...) and in GuestSSH.run.
        output = output.rstrip("\n")
        return CommandResult(output=output, exit_status=int(self._child.match.group(1)))

    def close(self) -> None:
        self._child.logfile_read = None
        self._transcript.close()
        self._socket.close()

    def _expect(self, patterns: list, timeout: float, what: str, fatal: bool = True) -> int | None:
        try:
            return self._child.expect(patterns, timeout=timeout)
        except pexpect.TIMEOUT:
            if not fatal:
                return None
            raise ConsoleError(f"timed out after {timeout:.0f}s waiting for {what} on "
                               f"{self.socket_path}; last output: "
                               f"{self._child.before[-300:]!r}") from None
        except pexpect.EOF:
            raise ConsoleError(f"the serial console {self.socket_path} closed while waiting for "
                               f"{what} (did QEMU exit?)") from None
