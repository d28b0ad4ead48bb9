"""Run a command on this machine with its full output in a log file and a live status line, and
stop a detached one (QEMU, Bochs) by its process group.

Every process group started here is tethered to this harness: a small `sh` watcher in a session of
its own reads a pipe whose only writer is this process, and when the pipe ends (the harness died,
SIGKILL included) it TERMs, then KILLs, the group. PR_SET_PDEATHSIG cannot do this job: it fires
when the *thread* that forked exits (the harness starts processes from worker threads), it reaches
only the direct child (not make's compilers), and it cannot be undone for a guest that `up` leaves
running on purpose; the tether is released (`untether`) exactly then. A build's `make` also inherits
the descriptors registered with `inherited_by_builds` (the cache lock), so the lock stays held
until the last compiler of a killed harness has exited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import CommandError
from harness.transport.console_log import TAIL_LINES, log_tail, read_log
from harness.progress import Progress

STOP_GRACE_S = 5.0
# The watcher: a line "release" lets the group live on; end of file (the harness is gone) stops it.
TETHER_SCRIPT = "\n".join([
    "read -r word",
    '[ "$word" = release ] && exit 0',
    'kill -TERM -"$1" 2>/dev/null || exit 0',
    "i=0",
    f'while kill -0 -"$1" 2>/dev/null && [ "$i" -lt {int(STOP_GRACE_S * 10)} ]; do',
    '  sleep 0.1; i=$((i+1))',
    "done",
    'kill -KILL -"$1" 2>/dev/null',
    "exit 0",
])
_build_fds: set[int] = set()


@contextmanager
def inherited_by_builds(fd: int) -> Iterator[None]:
    """While inside, every command run_logged starts inherits `fd` (the cache lock: a flock is
    held until every process that has it open has exited)."""
    _build_fds.add(fd)
    try:
        yield
    finally:
        _build_fds.discard(fd)


@dataclass
class Tether:
    """The watcher of one process group (see the module docstring)."""

    watcher: subprocess.Popen
    writer: int  # the pipe's write end: only this process holds it (O_CLOEXEC)

    @classmethod
    def to(cls, group: int) -> Tether:
        reader, writer = os.pipe()
        try:
            watcher = subprocess.Popen(["sh", "-c", TETHER_SCRIPT, "gvm-tether", str(group)],
                                       stdin=reader, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(writer)
            raise
        finally:
            os.close(reader)
        return cls(watcher, writer)

    def release(self) -> None:
        """The group may outlive this harness now; the watcher exits without a signal."""
        try:
            os.write(self.writer, b"release\n")
        except OSError:
            pass  # the watcher is gone already
        os.close(self.writer)
        self.watcher.wait()


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
                                   start_new_session=True, pass_fds=tuple(_build_fds))
        tether = Tether.to(process.pid)
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
        finally:
            tether.release()
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
    """A process group on this machine (QEMU, Bochs) that writes to one log: started here (and
    tethered to this harness until `untether`), or found again from its pid by a later command
    (then it is not our child)."""

    pid: int
    log: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)
    tether: Tether | None = field(default=None, repr=False)

    @classmethod
    def start(cls, argv: list[str], log: Path, cwd: Path | None = None) -> LocalProcess:
        """Start `argv` in a session of its own, output appended to `log`, stopped if this
        harness dies. FileNotFoundError passes through: the caller knows which package to name."""
        with log.open("ab") as output:
            popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return cls(popen.pid, log, popen, Tether.to(popen.pid))
        except BaseException:
            stop_process_group(popen.pid, lambda: popen.poll() is not None, popen)
            raise

    def untether(self) -> None:
        """Let it outlive this harness (a guest `up` leaves running); safe to call twice."""
        if self.tether is not None:
            self.tether.release()
            self.tether = None

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
        self.untether()
        stop_process_group(self.pid, lambda: self.exit_status() is not None, self.popen)
