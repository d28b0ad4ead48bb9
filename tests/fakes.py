"""Fakes shared by unit tests that stand in for a boundary (a port forward, an SSH channel,
the clock)."""

import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass
class FakeForward:
    target: object
    local_port: int
    local_path: Path | None = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class FakeClock:
    """`clock()` reads it; `clock.sleep(s)` advances it instantly and records the sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class SocketChannel:
    """Enough of a paramiko Channel for the relay, over one end of a socketpair."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
