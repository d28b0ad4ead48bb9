"""A guest on a remote host made local again, through one SSH connection: its kernel console
file tailed into a local file, its ttyS1 unix socket relayed to a local socket, and QEMU's SSH
forward (on the host's loopback) relayed to a local TCP port. Waiting for the ready marker,
scanning for panics, SerialConsole and GuestSSH then work as with a QEMU on this machine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.transport.remote_host import RemoteHost, RemoteHostError
from harness.transport.forward import PortForward, TcpTarget, UnixTarget

TAIL_INTERVAL_S = 0.2
TAIL_CHUNK = 1 << 20


class ConsoleTail:
    """Copies a growing file to a local one by polling `read(offset)`; a thread, until close."""

    def __init__(self, read: Callable[[int], bytes], local: Path, fresh: bool,
                 interval_s: float = TAIL_INTERVAL_S):
        self._read = read
        self.local = local
        self.interval_s = interval_s
        self.last_error: str | None = None
        local.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not local.exists():
            local.write_bytes(b"")
        self.offset = local.stat().st_size
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"console-tail-{local.name}")
        self._thread.start()

    def poll(self) -> int:
        """Copy what is new; the number of bytes copied. Errors are kept, not raised."""
        with self._lock:
            copied = 0
            while True:
                try:
                    data = self._read(self.offset)
                except RemoteHostError as error:
                    self.last_error = str(error)
                    return copied
                if not data:
                    return copied
                with self.local.open("ab") as file:
                    file.write(data)
                self.offset += len(data)
                copied += len(data)
                if len(data) < TAIL_CHUNK:
                    return copied

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()


@dataclass(frozen=True)
class RemotePlaces:
    """Where a guest's consoles and SSH are on its host, and where they go here."""

    console_log: str
    shell_socket: str
    ssh_port: int
    local_console_log: Path
    local_shell_socket: Path
    local_ssh_port: int = 0  # 0: any free loopback port


@dataclass
class RemoteConsole:
    """The tail and the two forwards of one remote guest; `open` starts them, `close` ends them."""

    host: RemoteHost
    places: RemotePlaces
    tail: ConsoleTail | None = field(default=None, init=False, repr=False)
    shell_forward: PortForward | None = field(default=None, init=False, repr=False)
    ssh_forward: PortForward | None = field(default=None, init=False, repr=False)

    def open(self, fresh: bool) -> None:
        """`fresh`: start the local console file anew (a new guest), else resume it."""
        places = self.places
        try:
            self.tail = ConsoleTail(self._read_console, places.local_console_log, fresh=fresh)
            self.tail.poll()
            self.shell_forward = self.host.forward(UnixTarget(places.shell_socket),
                                                   local_path=places.local_shell_socket)
            self.ssh_forward = self.host.forward(TcpTarget(places.ssh_port),
                                                 places.local_ssh_port)
        except BaseException:
            self.close()
            raise

    @property
    def local_ssh_port(self) -> int:
        return self.ssh_forward.local_port if self.ssh_forward else self.places.local_ssh_port

    def poll(self) -> None:
        """Copy the console's last lines now (after a stop, before the log is read)."""
        if self.tail is not None:
            self.tail.poll()

    def close(self) -> None:
        """Close the forwards and stop the tail (the guest keeps running); safe to call twice."""
        for forward in (self.shell_forward, self.ssh_forward):
            if forward is not None:
                forward.close()
        self.shell_forward = self.ssh_forward = None
        if self.tail is not None:
            self.tail.close()

    def _read_console(self, offset: int) -> bytes:
        return self.host.read_file(self.places.console_log, offset, TAIL_CHUNK)
