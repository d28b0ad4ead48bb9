"""Run a command on this machine with its full output in a log file and a live status line, and
stop a detached one (QEMU, Bochs) by its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import CommandError
from harness.transport.console_log import TAIL_LINES, log_tail, read_log
from harness.progress import Progress

STOP_GRACE_S = 5.0


def run_logged(args: list[str], log_path: Path, progress: Progress, cwd: Path | None = None,
               env: dict[str, str] | None = None,
               summarize: Callable[[str], str | None] = lambda line: line.strip() or None,
               tail_lines: int = 25) -> None:
    """Run `args`, appending all output to `log_path`; raise CommandError with the log's tail.

    `summarize` turns an output line into the status text to show (or None to keep the old one),
    so a kernel build can show the file it compiles instead of every warning.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tail: list[str] = []
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   start_new_session=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-tail_lines:]
                status = summarize(line)
                if status:
                    progress.status(status, started)
            returncode = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    if returncode != 0:
        raise CommandError(f"`{' '.join(args)}` exited with {returncode} after "
                           f"{time.monotonic() - started:.0f}s; full log: {log_path}\n"
                           + "\n".join(tail))


def run_captured(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float | None = None) -> str:
    """Run a short command and return its stdout; raise CommandError with stderr on failure."""
    try:
        result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except FileNotFoundError:
        raise CommandError(f"`{args[0]}` is not installed; run the project's setup "
                           "(./gvm setup)") from None
    if result.returncode != 0:
        raise CommandError(f"`{' '.join(args)}` exited with {result.returncode}: "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def stop_process_group(pid: int, has_exited: Callable[[], bool],
                       process: subprocess.Popen | None = None) -> None:
    """TERM the session `pid` leads, KILL it if it outlives STOP_GRACE_S; reap `process` (our
    child) so no zombie stays behind. Safe when it is already gone."""
    if has_exited():
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while not has_exited() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not has_exited():
        os.killpg(pid, signal.SIGKILL)
        if process is not None:
            process.wait()


def free_loopback_port(udp: bool = False) -> int:
    """A TCP (or UDP) port on 127.0.0.1 that nothing uses right now."""
    with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalProcess:
    """A process group on this machine (QEMU, Bochs) that writes to one log: started here, or
    found again from its pid by a later command (then it is not our child)."""

    pid: int
    log: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def start(cls, argv: list[str], log: Path, cwd: Path | None = None) -> "LocalProcess":
        """Start `argv` in a session of its own, output appended to `log`. FileNotFoundError
        passes through: the caller knows which package to name."""
        with log.open("ab") as output:
            popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return cls(popen.pid, log, popen)

    def exit_status(self) -> int | None:
        """None while it runs; its code once it stopped (-1 when not our child: unknown)."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return -1
        return -1 if state in ("Z", "X") else None

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return log_tail(read_log(self.log), lines)

    def stop(self) -> None:
        """TERM the whole session, then KILL what is left; safe to call twice."""
        stop_process_group(self.pid, lambda: self.exit_status() is not None, self.popen)
