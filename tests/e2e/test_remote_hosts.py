"""The SSH transport and the deploy against real OpenSSH servers on network-namespace hosts.

Three namespaces on a private bridge stand in for cluster hosts (see netns_hosts.py). They share
this machine's kernel and file system, so a "remote" file can be checked directly on disk and a
"remote" process is a local process inside that namespace.
"""

from __future__ import annotations

import re

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness.transport.artifacts import (
    QEMU_BUILD_FIRMWARE, UploadError, artifact_path, sha256_file, upload_artifacts, upload_file,
    upload_qemu_build)
from harness.backends.base import BootSpec
from harness.backends.giantvm.lines import (
    GiantVMLauncher, GiantVMSpecError, NodePlacement, busy_ports, check_node_addresses,
    parse_ip_addr, parse_listeners)
from harness.transport.remote_host import HostKeyError, HostUnreachable, RemoteHost, RemoteHostError, RemoteHostSpec, RemoteTimeout
from harness.transport.forward import TcpTarget, UnixTarget
from harness.transport.parallel import ParallelResult, on_hosts
from tests.e2e.netns_hosts import NetnsHost, NetnsLab, lab_or_skip

pytestmark = pytest.mark.e2e

ECHO_SERVER = """\
import socket, sys
kind, where, ready = sys.argv[1:4]
if kind == "tcp":
    host, port = where.rsplit(":", 1)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
else:
    server = socket.socket(socket.AF_UNIX)
    server.bind(where)
server.listen(4)
print("listening on", where, flush=True)
open(ready, "w").close()
while True:
    connection, _ = server.accept()
    data = b""
    while not data.endswith(b"\\n"):
        chunk = connection.recv(1024)
        if not chunk:
            break
        data += chunk
    connection.sendall(b"pong " + data)
    connection.close()
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    root = tmp_path_factory.mktemp("netns")
    with lab_or_skip(root, count=3) as lab:
        (root / "echo_server.py").write_text(ECHO_SERVER)
        yield lab


def spec(lab: NetnsLab, host: NetnsHost, **overrides) -> RemoteHostSpec:
    values = dict(name=host.name, address=host.address, key_file=lab.client_key,
                  known_hosts=lab.known_hosts, work_dir=str(host.work_dir), connect_timeout_s=5.0)
    return RemoteHostSpec(**{**values, **overrides})


@pytest.fixture
def remotes(lab: NetnsLab) -> Iterator[list[RemoteHost]]:
    hosts = [RemoteHost(spec(lab, host)) for host in lab.hosts]
    yield hosts
    for host in hosts:
        host.close()


def wait_for_file(path: Path, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s}s"
        time.sleep(0.05)


def start_echo_server(lab: NetnsLab, remote: RemoteHost, name: str, kind: str,
                      where: str) -> Path:
    ready = Path(remote.spec.work_dir) / f"{name}.ready"
    ready.unlink(missing_ok=True)
    remote.start_detached(name, [sys.executable, str(lab.root / "echo_server.py"), kind, where,
                                 str(ready)])
    wait_for_file(ready)
    return ready


def test_parallel_command_on_every_host_sees_its_own_address(lab, remotes) -> None:
    result = on_hosts(remotes, "list addresses",
                      lambda host: parse_ip_addr(host.run("ip -4 -o addr show", check=True).stdout))
    assert {outcome.host: outcome.value for outcome in result.outcomes} == {
        host.name: ["127.0.0.1", host.address] for host in lab.hosts}
    assert result.summary().startswith("list addresses: 3 of 3 hosts ok")


def test_one_failing_host_is_reported_by_name_and_the_others_still_run(lab, remotes) -> None:
    dead = RemoteHost(RemoteHostSpec("ghost", lab.unused_address, key_file=lab.client_key,
                                     known_hosts=lab.known_hosts, connect_timeout_s=2.0))
    result = on_hosts([*remotes, dead], "uptime", lambda host: host.run("true", check=True))
    assert [outcome.host for outcome in result.failed] == ["ghost"]
    assert "uptime: 3 of 4 hosts ok" in result.summary()
    assert re.search(r"ghost \(\d+\.\ds\): FAILED: host 'ghost'", result.summary())


def test_unreachable_address_fails_clearly_within_the_connect_timeout(lab) -> None:
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match=rf"{lab.unused_address}:22\).*(no SSH answer "
                                              r"within 3s|cannot connect)"):
        RemoteHost(RemoteHostSpec("ghost", lab.unused_address, key_file=lab.client_key,
                                  known_hosts=lab.known_hosts, connect_timeout_s=3.0)).connect()
    assert time.monotonic() - started < 6.0


def test_unknown_host_key_is_refused_unless_trust_on_first_use_is_asked_for(lab, tmp_path) -> None:
    host = lab.hosts[0]
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match=rf"offered host key ssh-ed25519 SHA256:\S+, which is "
                                           rf"not in {known_hosts}.*ssh-keyscan {host.address}"):
        RemoteHost(spec(lab, host, known_hosts=known_hosts)).connect()
    with RemoteHost(spec(lab, host, known_hosts=known_hosts, trust_on_first_use=True)) as remote:
        assert remote.run("echo hi", check=True).stdout == "hi\n"
    assert known_hosts.read_text() == f"{host.address} {host.host_key_line}\n"
    with RemoteHost(spec(lab, host, known_hosts=known_hosts)) as remote:
        assert remote.run("true").exit_status == 0


def test_changed_host_key_is_refused_even_with_trust_on_first_use(lab, tmp_path) -> None:
    first, second = lab.hosts[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{first.address} {second.host_key_line}\n")
    with pytest.raises(HostKeyError, match=r"offered host key .* but .* pins .*intercepting.*"
                                           rf"ssh-keygen -R '{first.address}'"):
        RemoteHost(spec(lab, first, known_hosts=known_hosts, trust_on_first_use=True)).connect()


def test_commands_have_deadlines_and_report_exit_status(remotes) -> None:
    remote = remotes[0]
    result = remote.run("echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(RemoteHostError, match=r"exited with 3: err"):
        result.check()
    started = time.monotonic()
    with pytest.raises(RemoteTimeout, match=r"`sleep 30` did not finish within 1s"):
        remote.run("sleep 30", timeout_s=1.0)
    assert time.monotonic() - started < 3.0


def values(result: ParallelResult) -> dict:
    assert not result.failed, result.summary()
    return {outcome.host: outcome.value for outcome in result.outcomes}


def test_upload_is_verified_and_skipped_when_unchanged(lab, remotes, tmp_path) -> None:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initramfs.cpio"
    kernel.write_bytes(os.urandom(2 << 20))
    initrd.write_bytes(os.urandom(512 << 10))
    initrd.chmod(0o600)
    first = values(upload_artifacts(remotes, [kernel, initrd]))
    for host in lab.hosts:
        results = first[host.name]
        assert [r.uploaded for r in results] == [True, True]
        for result, local in zip(results, (kernel, initrd)):
            assert result.remote_path == artifact_path(f"{host.work_dir}/artifacts",
                                                       sha256_file(local), local.name)
            assert Path(result.remote_path).read_bytes() == local.read_bytes()
            assert Path(result.remote_path).stat().st_mode & 0o777 == local.stat().st_mode & 0o777
    again = values(upload_artifacts(remotes, [kernel, initrd]))
    assert all(not r.uploaded for results in again.values() for r in results)
    remote, host = remotes[0], lab.hosts[0]
    target = f"{host.work_dir}/boot/bzImage"
    assert upload_file(remote, kernel, target).uploaded
    kernel.write_bytes(b"a rebuilt kernel")
    assert upload_file(remote, kernel, target).uploaded
    assert Path(target).read_bytes() == b"a rebuilt kernel"
    assert not upload_file(remote, kernel, target).uploaded


def test_a_qemu_build_keeps_its_layout_and_runs_on_the_host(remotes, tmp_path) -> None:
    tree = tmp_path / "gvm-qemu"
    (tree / "x86_64-softmmu").mkdir(parents=True)
    (tree / "x86_64-softmmu/qemu-system-x86_64").write_text(
        '#!/bin/sh\ncd "$(dirname "$0")/../pc-bios" && cat bios-256k.bin\n')
    (tree / "pc-bios").mkdir()
    for name in QEMU_BUILD_FIRMWARE:
        (tree / "pc-bios" / name).write_text(f"firmware {name}")
    binary = upload_qemu_build(remotes[0], tree)
    assert remotes[0].run(binary, check=True).stdout == "firmware bios-256k.bin"
    (tree / "pc-bios/efi-e1000.rom").unlink()
    with pytest.raises(UploadError, match=r"not a built QEMU tree: pc-bios/efi-e1000.rom missing"):
        upload_qemu_build(remotes[0], tree)


def test_sshd_killed_during_an_upload_leaves_the_old_file(lab, tmp_path) -> None:
    host = lab.hosts[2]
    target = str(host.work_dir / "deploy" / "bzImage")
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"the kernel that works")
    new.write_bytes(os.urandom(8 << 20))
    with RemoteHost(spec(lab, host)) as remote:
        upload_file(remote, old, target)
        killed = threading.Event()

        def kill_sshd_after_a_megabyte(sent: int, total: int) -> None:
            if sent >= 1 << 20 and not killed.is_set():
                killed.set()
                lab.kill_sshd(host)

        started = time.monotonic()
        try:
            with pytest.raises(UploadError, match=rf"to host 'h3':{target} failed: the SSH "
                                                  rf"connection was lost .*; {target} on host "
                                                  r"'h3' is as it was before"):
                upload_file(remote, new, target, progress=kill_sshd_after_a_megabyte,
                            stall_timeout_s=10.0)
        finally:
            if host.sshd is None:
                lab.start_sshd(host)
        assert killed.is_set() and time.monotonic() - started < 15.0
    assert Path(target).read_bytes() == b"the kernel that works"
    with RemoteHost(spec(lab, host)) as remote:
        assert upload_file(remote, new, target).uploaded
    assert sha256_file(Path(target)) == sha256_file(new)
    assert [p.name for p in Path(target).parent.iterdir()] == ["bzImage"], "a part file was left"


def test_a_connection_lost_mid_command_is_reported_as_such(lab) -> None:
    host = lab.hosts[2]
    with RemoteHost(spec(lab, host)) as remote:
        killer = threading.Timer(0.5, lab.kill_sshd, args=(host,))
        killer.start()
        started = time.monotonic()
        try:
            with pytest.raises(RemoteHostError, match=r"connection was lost while running "
                                                      r"`sleep 20`"):
                remote.run("sleep 20", timeout_s=15)
        finally:
            killer.join()
            lab.start_sshd(host)
        assert time.monotonic() - started < 5.0
        with pytest.raises(RemoteHostError, match=r"SSH connection was lost; reconnect"):
            remote.run("true")


def process_group_members(lab: NetnsLab, host: NetnsHost, group: int) -> list[int]:
    """Live members of a process group in the host's namespace (zombies wait for init)."""
    members = []
    for pid in lab.pids(host):
        try:
            state, _, pgid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgid) == group and state != "Z":
            members.append(pid)
    return members


def test_detached_process_outlives_the_connection_and_is_stopped_by_another(lab) -> None:
    host = lab.hosts[1]
    with RemoteHost(spec(lab, host)) as starter:
        process = starter.start_detached("sleeper", ["sh", "-c", "sleep 300 & exec sleep 301"])
        with pytest.raises(RemoteHostError, match="already running as process group"):
            starter.start_detached("sleeper", ["sleep", "1"])
    wait_until = time.monotonic() + 5
    while len(process_group_members(lab, host, process.pid)) < 2:
        assert time.monotonic() < wait_until, "the detached pair did not start"
        time.sleep(0.05)
    with RemoteHost(spec(lab, host)) as stopper:  # a later harness invocation
        assert stopper.running_pid("sleeper") == process.pid
        assert stopper.stop_detached("sleeper") == "terminated"
        assert stopper.running_pid("sleeper") is None
        assert stopper.stop_detached("sleeper") == "not running"
    assert process_group_members(lab, host, process.pid) == []
    assert not Path(process.pid_file).exists()


def test_a_process_ignoring_term_is_killed(lab, remotes) -> None:
    host, remote = lab.hosts[1], remotes[1]
    process = remote.start_detached(
        "stubborn", ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
    started = time.monotonic()
    assert remote.stop_detached("stubborn", grace_s=0.5) == "killed"
    assert time.monotonic() - started < 5.0
    assert process_group_members(lab, host, process.pid) == []


def test_a_command_that_cannot_start_says_so(remotes) -> None:
    with pytest.raises(RemoteHostError, match=r"could not start 'broken'.*exited at once"):
        remotes[1].start_detached("broken", ["/nonexistent/qemu-system-x86_64", "-version"])


def test_port_forward_reaches_servers_only_visible_inside_the_namespace(lab, remotes) -> None:
    host, remote = lab.hosts[1], remotes[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free here; the server takes it inside the namespace
    socket_path = str(host.work_dir / "echo.sock")
    try:
        start_echo_server(lab, remote, "echo-tcp", "tcp", f"127.0.0.1:{port}")
        start_echo_server(lab, remote, "echo-unix", "unix", socket_path)
        log = remote.read_file(f"{host.work_dir}/proc/echo-tcp.log")
        assert log == f"listening on 127.0.0.1:{port}\n".encode()
        assert remote.read_file(f"{host.work_dir}/proc/echo-tcp.log", offset=10) == log[10:]
        with pytest.raises(RemoteHostError, match=r"/nonexistent.log does not exist"):
            remote.read_file(f"{host.work_dir}/nonexistent.log")
        remote.run(f"echo more >> {host.work_dir}/proc/echo-tcp.log", check=True)
        assert remote.read_file(f"{host.work_dir}/proc/echo-tcp.log", offset=len(log)) == \
            b"more\n"  # the kept SFTP session reads what is there now
        remote.close()
        assert remote.read_file(f"{host.work_dir}/proc/echo-tcp.log") == log + b"more\n"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for target in (TcpTarget(port), UnixTarget(socket_path)):
            with remote.forward(target) as forward:
                for message in (b"ping\n", b"again\n"):
                    with socket.create_connection(("127.0.0.1", forward.local_port),
                                                  timeout=5) as client:
                        client.sendall(message)
                        client.shutdown(socket.SHUT_WR)
                        assert client.makefile("rb").read() == b"pong " + message
                assert forward.failures == []
    finally:
        remote.stop_detached("echo-tcp")
        remote.stop_detached("echo-unix")
    with remote.forward(TcpTarget(port)) as forward:
        with socket.create_connection(("127.0.0.1", forward.local_port), timeout=5) as client:
            client.settimeout(5)
            assert client.recv(1) == b""
        wait_until = time.monotonic() + 5
        while not forward.failures:
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        assert f"could not connect to 127.0.0.1:{port}" in forward.failures[0]


def test_giantvm_placement_and_ports_checked_on_the_hosts(lab, remotes) -> None:
    first, second = lab.hosts[:2]
    boot = BootSpec(kernel=Path("/w/bzImage"), initrd=Path("/w/initramfs.cpio"),
                    cmdline="console=ttyS0", vcpus=2, memory_mb=256)
    cluster = GiantVMLauncher(
        qemu_binary="qemu-system-x86_64", boot=boot, ssh_port=10022,
        nodes=(NodePlacement(first.name, first.address, str(first.work_dir)),
               NodePlacement(second.name, second.address, str(second.work_dir))))
    addresses = values(on_hosts(remotes[:2], "addresses", lambda h: parse_ip_addr(
        h.run("ip -4 -o addr show", check=True).stdout)))
    check_node_addresses(cluster, addresses)
    swapped = GiantVMLauncher(
        qemu_binary="qemu-system-x86_64", boot=boot, ssh_port=10022,
        nodes=(NodePlacement(first.name, second.address, str(first.work_dir)),
               NodePlacement(second.name, first.address, str(second.work_dir))))
    with pytest.raises(GiantVMSpecError, match=rf"node 0 \({second.address}\) is placed on host "
                                               rf"'h1', which has {first.address}, 127.0.0.1"):
        check_node_addresses(swapped, addresses)

    def listeners() -> dict:
        return values(on_hosts(remotes[:2], "listeners", lambda h: parse_listeners(
            h.run("ss -Htln", check=True).stdout)))

    assert busy_ports(cluster.required_ports(), listeners()) == []
    try:
        start_echo_server(lab, remotes[1], "squatter", "tcp", f"{second.address}:40001")
        assert busy_ports(cluster.required_ports(), listeners()) == [
            f"host 'h2': {second.address}:40001 is in use, but node 1 needs "
            f"{second.address}:40001 for its I/O router (QEMU)"]
    finally:
        remotes[1].stop_detached("squatter")
