"""Local listeners relayed over SSH: a TCP port or a unix socket here whose every connection gets
its own SSH channel to a TCP port or unix socket on (or reachable from) a host. paramiko has no
channel for unix sockets, so OpenSSH's direct-streamlocal is opened by hand."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from harness.errors import HarnessError

STREAMLOCAL = "direct-streamlocal@openssh.com"


@dataclass(frozen=True)
class TcpTarget:
    """A TCP port as seen from the remote host (127.0.0.1 is the remote host's loopback)."""

    port: int
    host: str = "127.0.0.1"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixTarget:
    """A unix socket on the remote host, e.g. the guest's serial console from QEMU."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


class ChannelOpener(Protocol):
    """What a forward needs of its host (RemoteHost)."""

    @property
    def name(self) -> str: ...

    def open_channel_to(self, target: TcpTarget | UnixTarget,
                        origin: tuple[str, int] = ..., timeout_s: float = ...) -> paramiko.Channel: ...


def open_streamlocal(transport: paramiko.Transport, path: str,
                      timeout_s: float) -> paramiko.Channel:
    """Open OpenSSH's direct-streamlocal channel (to a unix socket), which paramiko lacks.

    This is paramiko's own `Transport.open_channel` with the payload OpenSSH's PROTOCOL file gives
    for it (socket path, reserved string, reserved uint32); it uses paramiko's channel
    bookkeeping, which has not changed since paramiko 1.x.
    """
    with transport.lock:
        window = transport._sanitize_window_size(None)
        max_packet = transport._sanitize_packet_size(None)
        channel_id = transport._next_channel()
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_CHANNEL_OPEN)
        message.add_string(STREAMLOCAL)
        message.add_int(channel_id)
        message.add_int(window)
        message.add_int(max_packet)
        message.add_string(path)
        message.add_string("")
        message.add_int(0)
        channel = paramiko.Channel(channel_id)
        transport._channels.put(channel_id, channel)
        opened = transport.channel_events[channel_id] = threading.Event()
        transport.channels_seen[channel_id] = True
        channel._set_transport(transport)
        channel._set_window(window, max_packet)
    transport._send_user_message(message)
    deadline = time.monotonic() + timeout_s
    while not opened.wait(0.1):
        if not transport.is_active():
            raise transport.get_exception() or paramiko.SSHException("connection lost")
        if time.monotonic() > deadline:
            raise paramiko.SSHException(f"no answer to {STREAMLOCAL} within {timeout_s:.0f}s")
    if transport._channels.get(channel_id) is None:
        raise transport.get_exception() or paramiko.SSHException(f"{STREAMLOCAL} refused")
    return channel


class PortForward:
    """A local listener whose connections each get their own SSH channel to the target.

    It listens on 127.0.0.1:`local_port`, or on the unix socket `local_path` when one is given
    (the serial console is a unix socket for SerialConsole, wherever QEMU runs).
    """

    def __init__(self, host: ChannelOpener, target: TcpTarget | UnixTarget, local_port: int = 0,
                 local_path: Path | None = None):
        self.host = host
        self.target = target
        self.local_path = local_path
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._relays: list[threading.Thread] = []
        if local_path is None:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            address: str | tuple[str, int] = ("127.0.0.1", local_port)
        else:
            local_path.unlink(missing_ok=True)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = str(local_path)
        try:
            self._listener.bind(address)
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.local_port: int = self._listener.getsockname()[1] if local_path is None else 0
        self._acceptor = threading.Thread(
            target=self._accept, daemon=True,
            name=f"forward-{host.name}-{local_path.name if local_path else self.local_port}")
        self._acceptor.start()

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._acceptor.join(timeout=2.0)
        for worker in self._relays:
            worker.join(timeout=2.0)
        if self.local_path is not None:
            self.local_path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, origin = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                channel = self.host.open_channel_to(
                    self.target, origin if self.local_path is None else ("127.0.0.1", 0))
            except HarnessError as error:  # RemoteHostError: the host refused or is gone
                self.failures.append(str(error))
                connection.close()
                continue
            worker = threading.Thread(target=relay, args=(connection, channel, self._stop),
                                      daemon=True)
            self._relays = [thread for thread in self._relays if thread.is_alive()] + [worker]
            worker.start()


def relay(connection: socket.socket, channel: paramiko.Channel, stop: threading.Event) -> None:
    """Copy bytes both ways; an EOF on one side is passed on as a half-close."""
    open_ends = {connection, channel}
    try:
        while open_ends and not stop.is_set():
            readable, _, _ = select.select(list(open_ends), [], [], 0.2)
            if connection in readable:
                data = connection.recv(65536)
                if data:
                    channel.sendall(data)
                else:
                    channel.shutdown_write()
                    open_ends.discard(connection)
            if channel in readable:
                data = channel.recv(65536)
                if data:
                    connection.sendall(data)
                else:
                    connection.shutdown(socket.SHUT_WR)
                    open_ends.discard(channel)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        channel.close()
        connection.close()
