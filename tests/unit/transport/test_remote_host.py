"""The SSH transport's parts that need no server: specs, host-key policies, relaying, fan-out.

Everything that talks to a real sshd is in tests/e2e/test_remote_hosts.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from harness.errors import HarnessError
from harness.transport.local_process import free_loopback_port
from harness.transport.remote_host import HostKeyError, HostUnreachable, RemoteCommandError, RemoteHost, RemoteHostError, RemoteHostSpec, RemoteResult, _PinnedKeys, _TrustOnFirstUse, fingerprint
from harness.transport.forward import PortForward, UnixTarget, relay
from harness.transport.parallel import on_hosts
from tests.fakes import SocketChannel


def test_result_check_names_host_command_and_output() -> None:
    assert RemoteResult("a", "true", 0, "out", "").check() == "out"
    with pytest.raises(RemoteCommandError, match=r"host 'a': `false` exited with 1: why"):
        RemoteResult("a", "false", 1, "", "why\n").check()


def test_sudo_wraps_only_root_commands_of_other_users() -> None:
    wrapped = RemoteHost(RemoteHostSpec("a", "10.0.0.1", user="gvm", sudo=True))
    assert wrapped._privileged("rmmod kvm") == "sudo -n sh -c 'rmmod kvm'"
    assert RemoteHost(RemoteHostSpec("a", "10.0.0.1", user="root", sudo=True))._privileged(
        "rmmod kvm") == "rmmod kvm"
    assert RemoteHost(RemoteHostSpec("a", "10.0.0.1", user="gvm"))._privileged(
        "rmmod kvm") == "rmmod kvm"


def test_nothing_listening_is_unreachable_at_once(tmp_path: Path) -> None:
    port = free_loopback_port()
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match=rf"cannot connect: .*listening on port {port}"):
        RemoteHost(RemoteHostSpec("a", "127.0.0.1", port=port,
                                  known_hosts=tmp_path / "known_hosts")).connect()
    assert time.monotonic() - started < 5


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RemoteHostError, match=r"key file .*/nope does not exist"):
        RemoteHost(RemoteHostSpec("a", "127.0.0.1", key_file=tmp_path / "nope")).connect()


def test_bad_process_names_are_refused_before_connecting() -> None:
    host = RemoteHost(RemoteHostSpec("a", "192.0.2.1"))  # TEST-NET: would hang if contacted
    with pytest.raises(RemoteHostError, match="process name 'qemu 0' must be letters"):
        host.start_detached("qemu 0", ["true"])
    with pytest.raises(RemoteHostError, match="process name '../x' must be"):
        host.stop_detached("../x")


@pytest.fixture(scope="module")
def rsa_key() -> paramiko.RSAKey:
    return paramiko.RSAKey.generate(1024)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path, rsa_key) -> None:
    public = tmp_path / "key.pub"
    public.write_text(f"ssh-rsa {rsa_key.get_base64()} test\n")
    printed = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True,
                             check=True).stdout.split()[1]
    assert fingerprint(rsa_key) == f"ssh-rsa {printed}"


def test_pinned_policy_refuses_with_the_command_that_pins(tmp_path: Path, rsa_key) -> None:
    spec = RemoteHostSpec("a", "10.0.0.1", port=2222, known_hosts=tmp_path / "kh")
    with pytest.raises(HostKeyError, match=rf"offered host key ssh-rsa SHA256:.* not in "
                                           rf"{tmp_path}/kh.*ssh-keyscan -p 2222 10.0.0.1 >> "):
        _PinnedKeys(spec).missing_host_key(paramiko.SSHClient(), "[10.0.0.1]:2222", rsa_key)
    assert not (tmp_path / "kh").exists()


def test_trust_on_first_use_writes_the_key_it_accepts(tmp_path: Path, rsa_key) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"
    spec = RemoteHostSpec("a", "10.0.0.1", port=2222, known_hosts=known_hosts,
                          trust_on_first_use=True)
    client = paramiko.SSHClient()
    _TrustOnFirstUse(spec).missing_host_key(client, "[10.0.0.1]:2222", rsa_key)
    assert known_hosts.read_text() == f"[10.0.0.1]:2222 ssh-rsa {rsa_key.get_base64()}\n"
    assert client.get_host_keys().lookup("[10.0.0.1]:2222")["ssh-rsa"] == rsa_key
    reloaded = paramiko.HostKeys(str(known_hosts))
    assert reloaded.check("[10.0.0.1]:2222", rsa_key)


def test_a_changed_key_on_another_port_names_the_ssh_keygen_line_for_that_port(
        tmp_path: Path, rsa_key) -> None:
    """A real handshake with a paramiko server on a loopback port that is not 22: known_hosts
    names hosts on other ports as '[host]:port', and so must `ssh-keygen -R`."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pinned = paramiko.RSAKey.generate(1024)  # what known_hosts says; the server has rsa_key
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} ssh-rsa {pinned.get_base64()}\n")

    def serve() -> None:
        connection, _ = listener.accept()
        server = paramiko.Transport(connection)
        server.add_server_key(rsa_key)
        try:
            server.start_server(server=paramiko.ServerInterface())
        except (paramiko.SSHException, EOFError):
            pass  # the client hangs up once it has seen the key
        finally:
            server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    host = RemoteHost(RemoteHostSpec("moved", "127.0.0.1", port=port, known_hosts=known_hosts))
    try:
        with pytest.raises(HostKeyError, match=rf"offered host key ssh-rsa SHA256:.* but "
                                               rf"{known_hosts} pins .*`ssh-keygen -R "
                                               rf"'\[127\.0\.0\.1\]:{port}' -f {known_hosts}`"):
            host.connect()
    finally:
        thread.join(timeout=10)
        listener.close()


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_relay_passes_data_and_half_closes_both_ways() -> None:
    local, relay_end = socket.socketpair()
    channel_end, remote = socket.socketpair()
    stop = threading.Event()
    worker = threading.Thread(target=relay, args=(relay_end, SocketChannel(channel_end), stop))
    worker.start()
    local.sendall(b"request")
    local.shutdown(socket.SHUT_WR)
    assert read_all(remote) == b"request"  # EOF arrived: the client's half-close was passed on
    remote.sendall(b"answer after the client's EOF")
    remote.close()
    assert read_all(local) == b"answer after the client's EOF"
    worker.join(timeout=5)
    assert not worker.is_alive()
    local.close()


class NamedHost:
    def __init__(self, name: str):
        self.name = name


def test_on_hosts_runs_everywhere_at_once_and_keeps_failures_per_host() -> None:
    hosts = [NamedHost(name) for name in ("a", "b", "c")]
    everyone_there = threading.Barrier(3, timeout=5)

    def action(host: NamedHost) -> str:
        everyone_there.wait()  # only passes if all three run at the same time
        if host.name == "b":
            raise RemoteHostError("host 'b': disk full")
        return host.name.upper()

    result = on_hosts(hosts, "probe", action)  # type: ignore[arg-type]
    assert [outcome.ok for outcome in result.outcomes] == [True, False, True]
    assert result.outcomes[0].value == "A"
    summary = result.summary()
    assert summary.splitlines()[0] == "probe: 2 of 3 hosts ok"
    assert "  b (0.0s): FAILED: host 'b': disk full" in summary
    assert on_hosts(hosts[:1], "one", lambda h: 1).outcomes[0].value == 1  # type: ignore[arg-type]


def test_on_hosts_lets_bugs_through_with_their_traceback() -> None:
    def buggy(host: NamedHost) -> None:
        raise KeyError("a bug, not a host failure")

    with pytest.raises(KeyError):
        on_hosts([NamedHost("a")], "buggy", buggy)  # type: ignore[arg-type]
    assert issubclass(RemoteHostError, HarnessError)


class EchoHost:
    """open_channel_to answers with an upper-casing echo, or refuses while `refuse` is set."""

    name = "node-a"

    def __init__(self) -> None:
        self.targets: list = []
        self.refuse = False

    def open_channel_to(self, target, origin=("127.0.0.1", 0), timeout_s=10.0):
        self.targets.append(target)
        if self.refuse:
            raise RemoteHostError(f"host 'node-a' could not connect to {target}: Connect failed")
        ours, theirs = socket.socketpair()

        def echo() -> None:
            with theirs:
                data = b""
                while chunk := theirs.recv(1024):
                    data += chunk
                theirs.sendall(data.upper())

        threading.Thread(target=echo, daemon=True).start()
        return SocketChannel(ours)


def test_a_unix_socket_forward_relays_each_connection_to_the_target(tmp_path) -> None:
    host = EchoHost()
    path = tmp_path / "console-shell.sock"
    path.write_text("stale")
    target = UnixTarget("/srv/gvm/runs/r1/console-shell.sock")
    with PortForward(host, target, local_path=path) as forward:
        for message in (b"root\n", b"uname -r\n"):
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(5)
                client.connect(str(path))
                client.sendall(message)
                client.shutdown(socket.SHUT_WR)
                assert client.makefile("rb").read() == message.upper()
        assert host.targets == [target, target] and forward.failures == []
        host.refuse = True
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(str(path))
            assert client.recv(1) == b""
        deadline = time.monotonic() + 5
        while not forward.failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "Connect failed" in forward.failures[0]
    assert forward.closed and not path.exists()
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(FileNotFoundError):
        client.connect(str(path))
    forward.close()  # twice is fine
