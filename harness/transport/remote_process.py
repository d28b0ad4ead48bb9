"""One detached process on a remote host, from start to the exit code it left behind: the
lifecycle the remote stock QEMU and every GiantVM node share.

The process runs under a small `sh` that records its exit code in a file, so `exit_status()` can
say how it ended (killed, crashed, powered off) even though nobody here is its parent, and any
later invocation can stop it from its pid file alone (RemoteHost.start_detached/stop_detached).
"""

from __future__ import annotations

import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from harness.transport.console_log import TAIL_LINES
from harness.transport.remote_host import RemoteHostError, RemoteResult

STATUS_CACHE_S = 0.5  # exit_status() asks the host at most this often


class ProcessHost(Protocol):
    """What a detached process needs of its host: RemoteHost, or a fake in the unit tests."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def close(self) -> None: ...

    def run(self, command: str | Sequence[str], timeout_s: float = ..., check: bool = ...,
            as_root: bool = ...) -> RemoteResult: ...

    def running_pid(self, name: str, as_root: bool = ...) -> int | None: ...

    def stop_detached(self, name: str, grace_s: float = ..., as_root: bool = ...) -> str: ...

    def read_file(self, path: str, offset: int = ..., max_bytes: int = ...) -> bytes: ...


def exit_recording_argv(argv: Sequence[str], exit_file: str) -> list[str]:
    """`argv` under an `sh` that writes its exit code to `exit_file`, so a later look can tell a
    crash (signal) from a clean exit even after the process is gone."""
    quoted = shlex.quote(exit_file)
    record = (f'"$0" "$@"; s=$?; echo "$s" > {quoted}.tmp && mv {quoted}.tmp {quoted}; '
              'exit "$s"')
    return ["sh", "-c", record, *argv]


def exit_code(text: str) -> int:
    """The wrapper's `$?` in Popen's convention: a death by signal N is -N."""
    status = int(text.strip())
    return -(status - 128) if status > 128 else status


@dataclass
class RemoteProcess:
    """A process started with RemoteHost.start_detached under exit_recording_argv."""

    host: ProcessHost
    name: str
    pid: int  # the process group (the recording `sh`)
    log_file: str
    exit_file: str
    as_root: bool = False
    clock: Callable[[], float] = time.monotonic
    stop_outcome: str | None = field(default=None, init=False)
    _status: int | None = field(default=None, init=False, repr=False)
    _checked_at: float = field(default=float("-inf"), init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def where(self) -> str:
        return f"host '{self.host.name}'"

    def exit_status(self) -> int | None:
        """None while it runs; its exit code once it stopped (-N: killed by signal N; -1: gone
        without a code). Asks at most every STATUS_CACHE_S; RemoteHostError when the host cannot
        be asked (the next call logs in again)."""
        with self._lock:
            if self._status is not None:
                return self._status
            now = self.clock()
            if now - self._checked_at < STATUS_CACHE_S:
                return None
            self._checked_at = now
            self._reconnect_if_lost()
            if self.host.running_pid(self.name, as_root=self.as_root) is not None:
                return None
            self._status = self.recorded_exit()
            return self._status

    def recorded_exit(self) -> int:
        try:
            result = self.host.run(f"cat {shlex.quote(self.exit_file)} 2>/dev/null",
                                   timeout_s=15)
            return exit_code(result.stdout) if result.exit_status == 0 else -1
        except (RemoteHostError, ValueError):
            return -1

    def stop(self) -> str:
        """TERM, then KILL, the process group; its outcome. Safe to call twice. Raises
        RemoteHostError (saying how to stop it by hand) when the host cannot be reached."""
        if self.stop_outcome is not None:
            return self.stop_outcome
        try:
            self._reconnect_if_lost()
            outcome = self.host.stop_detached(self.name, as_root=self.as_root)
        except RemoteHostError as error:
            raise RemoteHostError(f"{error}; it may still run on {self.where} as process group "
                                  f"{self.pid}: `kill -TERM -{self.pid}`") from None
        self.stop_outcome = outcome
        with self._lock:
            if self._status is None:
                self._status = {"terminated": -15, "killed": -9}.get(outcome)
                if self._status is None:
                    self._status = self.recorded_exit()
        return outcome

    def read_log(self, offset: int = 0, max_bytes: int = 16 << 20) -> bytes:
        return self.host.read_file(self.log_file, offset, max_bytes)

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        try:
            result = self.host.run(["tail", "-n", str(lines), self.log_file], timeout_s=10)
        except RemoteHostError as error:
            return f"(the log {self.log_file} on {self.where} is out of reach: {error})"
        return result.stdout.strip() or "(the log is empty)"

    def copy_log(self, local: Path) -> None:
        """The whole log into `local` (or a line saying why it could not be read)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = self.read_log()
        except RemoteHostError as error:
            data = f"(the log {self.log_file} on {self.where} is out of reach: {error})\n" \
                .encode()
        local.write_bytes(data)

    def _reconnect_if_lost(self) -> None:
        """RemoteHost never reuses a dead connection; dropping it makes the next call log in
        again (and forwards and tails use the new one from their next channel on)."""
        if not self.host.connected:
            self.host.close()
