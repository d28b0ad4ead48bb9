"""Fakes shared by unit tests that stand in for a boundary (a port forward, an SSH channel,
the clock, a host that runs QEMU)."""

import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from harness.backends.giantvm.cluster import LISTENERS_COMMAND
from harness.transport.artifacts import UploadResult
from harness.transport.remote_host import DetachedProcess, HostUnreachable, RemoteHostError, RemoteHostSpec, RemoteResult
from harness.transport.parallel import HostOutcome, ParallelResult


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


@dataclass
class FakeProcess:
    chunks: list[bytes]  # released one per read of the log
    released: bytes = b""
    alive: bool = True
    dies_after_polls: int | None = None  # running_pid answers None after this many polls
    exit_code: str | None = "1\n"  # what its qemu.exit file holds once it died; None: no file
    polls: int = 0
    pid: int = 1000


@dataclass
class FakeHost:
    """A host that runs QEMU (a stock one or GiantVM nodes): records every call as (host, call,
    ...) in `events`, which several hosts may share, and answers from a script."""

    name: str
    ips: list[str]
    work_dir: str = "/srv/gvm"
    events: list = field(default_factory=list)
    listeners: list[str] = field(default_factory=list)  # "addr:port"
    has_binary: bool = True
    missing_files: tuple[str, ...] = ()
    down: bool = False
    script: dict[str, list[tuple[list[bytes], int | None]]] = field(default_factory=dict)
    processes: dict[str, FakeProcess] = field(default_factory=dict)
    dmesg: str = "[    1.0] old boot: kvm-dsm: BUG: from yesterday\n"
    console: bytes = b"Linux version 4.15\n"
    forwards: list = field(default_factory=list)
    connected: bool = True
    kvm_mode: str | None = "send_all"  # kvm.atomic_inc_mode; None: an unpatched kvm
    answers: dict[str, str] = field(default_factory=dict)  # stdout of a command containing key
    connect_error: Exception | None = None
    stop_error: Exception | None = None
    closes: int = 0

    @property
    def spec(self) -> RemoteHostSpec:
        return RemoteHostSpec(self.name, self.ips[0], work_dir=self.work_dir)

    @property
    def calls(self) -> list[tuple]:
        """This host's own events, without its name."""
        return [event[1:] for event in self.events if event[0] == self.name]

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]

    def forward(self, target, local_port=0, local_path=None) -> FakeForward:
        """Recorded in `forwards`, never opened."""
        forward = FakeForward(target, 0 if local_path else local_port or 45678, local_path)
        self.forwards.append(forward)
        return forward

    def open_channel_to(self, target, origin=("127.0.0.1", 0), timeout_s=10.0):
        raise RemoteHostError("not in this test")

    def _call(self, *what) -> None:
        self.events.append((self.name, *what))
        if self.down:
            raise HostUnreachable(f"host '{self.name}' (root@{self.ips[0]}:22): cannot connect: "
                                  "[Errno 113] No route to host")

    def connect(self) -> "FakeHost":
        self._call("connect")
        if self.connect_error is not None:
            raise self.connect_error
        return self

    def close(self) -> None:
        self.events.append((self.name, "close"))
        self.closes += 1

    def run(self, command, timeout_s=60.0, check=False, as_root=False) -> RemoteResult:
        text = command if isinstance(command, str) else shlex.join(command)
        self._call("run", text)
        status, out = 0, ""
        answer = next((out for key, out in self.answers.items() if key in text), None)
        if answer is not None:
            out = answer
        elif text == "ip -4 -o addr show":
            out = "1: lo    inet 127.0.0.1/8 scope host lo\n" + "".join(
                f"2: eth0    inet {ip}/24 brd 10.0.0.255 scope global eth0\n" for ip in self.ips)
        elif text == LISTENERS_COMMAND:
            out = "".join(f"LISTEN 0 128 {address} 0.0.0.0:*\n" for address in self.listeners)
        elif text.startswith("test -x "):
            status = 0 if self.has_binary else 1
        elif text.startswith("test -r "):
            status = 1 if text.split()[-1] in self.missing_files else 0
        elif "/dev/kmsg" in text:
            marker = shlex.split(text)[2]
            self.dmesg += f"[  100.0] {marker}\n"
        elif "/sys/module/kvm/parameters/atomic_inc_mode" in text:
            if self.kvm_mode is None:
                status = 3
            else:
                if "printf %s " in text:
                    self.kvm_mode = text.split("printf %s ")[1].split(" ")[0]
                out = self.kvm_mode
        elif text == "dmesg":
            out = self.dmesg
        elif text.startswith("cat ") and "qemu.exit" in text:
            name = next((n for n in self.processes if not self.processes[n].alive), None)
            code = self.processes[name].exit_code if name else None
            out, status = (code, 0) if code is not None else ("", 1)
        result = RemoteResult(self.name, text, status, out, "")
        if check:
            result.check()
        return result

    def start_detached(self, name, argv, as_root=False, timeout_s=15.0) -> DetachedProcess:
        self._call("start_detached", name, list(argv))
        chunks, dies = self.script.get(name, ([b"QEMU says hi\n"], None))  # type: ignore
        process = FakeProcess(list(chunks), dies_after_polls=dies, pid=1001 + len(self.processes))
        self.processes[name] = process
        return DetachedProcess(self.name, name, process.pid, f"{self.work_dir}/proc/{name}.pid",
                               f"{self.work_dir}/proc/{name}.log")

    def running_pid(self, name, as_root=False):
        self._call("running_pid", name)
        process = self.processes.get(name)
        if process is None:
            return None
        process.polls += 1
        if process.dies_after_polls is not None and process.polls > process.dies_after_polls:
            process.alive = False
        return process.pid if process.alive else None

    def stop_detached(self, name, grace_s=5.0, as_root=False):
        self._call("stop_detached", name)
        if self.stop_error is not None:
            raise self.stop_error
        process = self.processes.get(name)
        if process is None:
            return "not running"
        was_alive, process.alive = process.alive, False
        return "terminated" if was_alive else "had exited"

    def read_file(self, path, offset=0, max_bytes=16 << 20) -> bytes:
        self._call("read_file", path)
        if path.endswith("console-kernel.log"):
            return self.console[offset:offset + max_bytes]
        name = Path(path).name.removesuffix(".log")
        process = self.processes.get(name)
        if process is None:
            raise RemoteHostError(f"host '{self.name}': {path} does not exist")
        if process.chunks and offset == len(process.released):
            process.released += process.chunks.pop(0)
        return process.released[offset:offset + max_bytes]


def fake_hosts() -> tuple[list, dict[str, FakeHost]]:
    events: list = []
    hosts = {"h0": FakeHost("h0", ["10.0.0.1"], events=events),
             "h1": FakeHost("h1", ["10.0.0.2"], events=events)}
    return events, hosts


def opener(hosts: dict[str, FakeHost]):
    return lambda host_config: hosts[host_config.name]


def fake_uploads(calls: list):
    def upload_artifacts(hosts, files):
        calls.append(([host.name for host in hosts], [Path(f).name for f in files]))
        return ParallelResult("upload", tuple(
            HostOutcome(host.name, 0.1, value=tuple(
                UploadResult(host.name, Path(f), f"/srv/gvm/artifacts/{index}/{Path(f).name}",
                             str(index), 1, True) for index, f in enumerate(files)))
            for host in hosts))
    return upload_artifacts
