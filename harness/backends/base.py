"""Launchers start a guest and hand back where to reach it; the pipeline never builds QEMU lines.

The stock-QEMU launcher runs one QEMU on this machine; the GiantVM launcher (one QEMU per node)
implements the same interface, the way syzkaller keeps each VM type behind one `vm` interface.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class BootSpec:
    """What to boot and with which shape; the same for every launcher."""

    kernel: Path
    initrd: Path
    cmdline: str
    vcpus: int
    memory_mb: int


@dataclass(frozen=True)
class GuestEndpoints:
    """Where the running guest can be reached from this machine."""

    kernel_console_log: Path
    shell_socket: Path
    ssh_host: str
    ssh_port: int


def unix_socket_path(directory: str | Path, name: str) -> Path:
    """`directory/name`, or a short name in /tmp derived from it when that is too long to bind.

    Deep run folders (pytest's tmp_path, a long work_dir) would otherwise make QEMU or the forward
    fail; /tmp exists on this machine and on every remote host alike.
    """
    wanted = Path(directory) / name
    if len(str(wanted).encode()) <= UNIX_PATH_MAX:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:16]
    return Path("/tmp") / f"gvm-{digest}-{name}"


class RunningGuest(Protocol):
    endpoints: GuestEndpoints
    accelerator: str

    @property
    def pid(self) -> int:
        """The process (group) to name when the user has to stop it by hand."""

    def exit_status(self) -> int | None:
        """None while the guest's QEMU processes run; their exit code once one has stopped."""

    def qemu_log_tail(self, lines: int = 10) -> str:
        """The end of QEMU's own output, for error messages."""

    def stop(self) -> None:
        """Stop every process of this guest; safe to call twice."""

    def detach(self) -> None:
        """Close this process's forwards and connections and leave the guest running."""


class Launcher(Protocol):
    def command_lines(self) -> list[list[str]]:
        """The exact commands `start` will run, for plan output and for starting by hand."""

    def start(self) -> RunningGuest:
        ...
