"""The remote stock-QEMU launcher without a remote host: its launch line with the host's paths,
the exit-code recording wrapper (run here), the console tail, the unix-socket forward, and how
start/stop/exit_status drive a (fake) host. The real thing runs in tests/e2e/test_remote_launch.py.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from harness.transport.artifacts import artifact_path, sha256_file
from harness.errors import BootError
from harness.backends.base import UNIX_PATH_MAX, BootSpec
from harness.backends.remote_qemu import (
    RemoteGuestState, RemoteQemuGuest, RemoteQemuLauncher, free_remote_port,
    read_existing_command, used_ports)
from harness.transport.remote_process import STATUS_CACHE_S, exit_code
from harness.transport.remote_host import DetachedProcess, HostKeyError, RemoteHost, RemoteHostError, RemoteHostSpec
from harness.transport.forward import TcpTarget, UnixTarget
from tests.fakes import FakeHost, FakeProcess

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0B07E70A:0016 0107E70A:D2F0 01 00000000:00000000 02:0009E2F1 00000000     0        0 2 4
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:4E21 00000000000000000000000000000000:0000 0A
"""


def option_values(line: list[str], option: str) -> list[str]:
    return [line[i + 1] for i, word in enumerate(line) if word == option]


@pytest.fixture
def boot(tmp_path: Path) -> BootSpec:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initramfs.cpio"
    kernel.write_bytes(b"a kernel")
    initrd.write_bytes(b"an initramfs")
    return BootSpec(kernel=kernel, initrd=initrd, cmdline="console=ttyS0 atomic_inc_jiffies=on",
                    vcpus=4, memory_mb=256)


def make_launcher(host, boot: BootSpec, local_dir: Path, **overrides) -> RemoteQemuLauncher:
    values = dict(host=host, qemu_binary="qemu-system-x86_64", boot=boot, local_dir=local_dir,
                  remote_ssh_port=21022)
    return RemoteQemuLauncher(**{**values, **overrides})


def offline_host(work_dir: str = "/srv/gvm") -> RemoteHost:
    return RemoteHost(RemoteHostSpec("node-a", "10.0.0.1", work_dir=work_dir))


def test_the_line_is_the_local_launchers_with_the_remote_hosts_paths(boot, tmp_path) -> None:
    launcher = make_launcher(offline_host(), boot, tmp_path / "20261124-1200-local")
    kernel_sha, initrd_sha = sha256_file(boot.kernel), sha256_file(boot.initrd)
    run_dir = "/srv/gvm/runs/20261124-1200-local"
    assert launcher.remote_run_dir == run_dir
    assert launcher.remote_kernel == artifact_path("/srv/gvm/artifacts", kernel_sha, "bzImage")
    (line,) = launcher.command_lines()
    assert line[0] == "qemu-system-x86_64"
    assert option_values(line, "-accel") == ["tcg,thread=multi"]
    assert option_values(line, "-kernel") == [f"/srv/gvm/artifacts/{kernel_sha}/bzImage"]
    assert option_values(line, "-initrd") == [f"/srv/gvm/artifacts/{initrd_sha}/initramfs.cpio"]
    assert option_values(line, "-append") == ["console=ttyS0 atomic_inc_jiffies=on"]
    assert option_values(line, "-serial") == [
        f"file:{run_dir}/console-kernel.log",
        f"unix:{run_dir}/console-shell.sock,server=on,wait=off"]
    assert option_values(line, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:21022-:22"]
    assert option_values(line, "-pidfile") == [f"{run_dir}/qemu.pid"]
    assert option_values(line, "-smp") == ["4"] and option_values(line, "-m") == ["256"]
    assert str(tmp_path) not in " ".join(line), "a local path leaked into the remote line"


def test_kvm_and_the_refused_accelerators(boot, tmp_path) -> None:
    (line,) = make_launcher(offline_host(), boot, tmp_path, accelerator="kvm").command_lines()
    assert "-enable-kvm" in line and "-accel" not in line
    assert option_values(line, "-cpu") == ["host"]
    with pytest.raises(BootError, match=r"accel 'tcg' or 'kvm', not 'auto'"):
        make_launcher(offline_host(), boot, tmp_path, accelerator="auto")
    with pytest.raises(BootError, match=r"remote_ssh_port 0 is not a TCP port"):
        make_launcher(offline_host(), boot, tmp_path, remote_ssh_port=0)
    with pytest.raises(BootError, match=r"local_ssh_port 70000 is not a TCP port"):
        make_launcher(offline_host(), boot, tmp_path, local_ssh_port=70000)


def test_local_endpoints_and_names(boot, tmp_path) -> None:
    launcher = make_launcher(offline_host(), boot, tmp_path / "run", run_id="my run/1")
    assert launcher.name == "my_run_1" and launcher.process_name == "qemu-my_run_1"
    assert launcher.remote_run_dir == "/srv/gvm/runs/my_run_1"
    endpoints = launcher.endpoints
    assert endpoints.kernel_console_log == tmp_path / "run" / "console-kernel.log"
    assert endpoints.shell_socket == tmp_path / "run" / "console-shell.sock"
    assert (endpoints.ssh_host, endpoints.ssh_port) == ("127.0.0.1", 0)
    remote = launcher.remote_endpoints
    assert str(remote.shell_socket) == "/srv/gvm/runs/my_run_1/console-shell.sock"


def test_the_state_records_where_everything_is(boot, tmp_path) -> None:
    launcher = make_launcher(offline_host(), boot, tmp_path / "r1")
    process = DetachedProcess("node-a", "qemu-r1", 4242, "/srv/gvm/proc/qemu-r1.pid",
                              "/srv/gvm/proc/qemu-r1.log")
    state = launcher.state(process)
    assert state == RemoteGuestState(
        host="node-a", process_name="qemu-r1", pid=4242, accelerator="tcg",
        remote_run_dir="/srv/gvm/runs/r1", remote_console_log="/srv/gvm/runs/r1/console-kernel.log",
        remote_shell_socket="/srv/gvm/runs/r1/console-shell.sock", remote_ssh_port=21022,
        remote_qemu_log="/srv/gvm/proc/qemu-r1.log", exit_file="/srv/gvm/runs/r1/qemu.exit",
        local_console_log=str(tmp_path / "r1" / "console-kernel.log"),
        local_shell_socket=str(tmp_path / "r1" / "console-shell.sock"), local_ssh_port=0,
        remote_initrd=launcher.remote_initrd)
    assert state.remote_initrd.startswith("/srv/gvm/artifacts/")
    assert RemoteGuestState(**state.to_dict()) == state


@pytest.mark.parametrize("script, expected", [("exit 3", 3), ("exit 0", 0),
                                              ("kill -KILL $$", -9), ("kill -TERM $$", -15)])
def test_the_wrapper_records_how_qemu_ended(boot, tmp_path, script, expected) -> None:
    """The wrapper runs here with a stand-in for QEMU that ends as QEMU might."""
    fake_qemu = tmp_path / "fake-qemu"
    fake_qemu.write_text(f"#!/bin/sh\n{script}\n")
    fake_qemu.chmod(0o755)
    launcher = make_launcher(offline_host(str(tmp_path / "work")), boot, tmp_path / "r1",
                             qemu_binary=str(fake_qemu))
    argv = launcher.remote_argv()
    assert argv[:2] == ["sh", "-c"] and argv[3:] == launcher.command_lines()[0]
    Path(launcher.remote_run_dir).mkdir(parents=True)
    subprocess.run(argv, timeout=10)
    recorded = Path(launcher.exit_file).read_text()
    assert exit_code(recorded) == expected
    assert sorted(p.name for p in Path(launcher.remote_run_dir).iterdir()) == ["qemu.exit"]


def test_exit_codes_follow_popen() -> None:
    assert [exit_code(text) for text in ("0\n", "1", "137\n", "143")] == [0, 1, -9, -15]


def test_socket_paths_too_long_for_unix_sockets_move_to_tmp_on_both_sides(boot, tmp_path) -> None:
    local_dir = tmp_path / ("r" * 120)
    launcher = make_launcher(offline_host("/srv/" + "w" * 100), boot, local_dir)
    remote_socket = launcher.remote_endpoints.shell_socket
    local_socket = launcher.endpoints.shell_socket
    for socket_path in (remote_socket, local_socket):
        assert socket_path.parent == Path("/tmp") and socket_path.name.endswith("console-shell.sock")
        assert len(str(socket_path).encode()) <= UNIX_PATH_MAX
    assert remote_socket != local_socket
    (line,) = launcher.command_lines()
    assert f"unix:{remote_socket},server=on,wait=off" in option_values(line, "-serial")
    assert launcher.endpoints.kernel_console_log.parent == local_dir


def test_used_ports_and_a_free_remote_port() -> None:
    assert used_ports(PROC_NET_TCP) == {0x4E20, 22, 0x4E21}

    host = node_a(answers={"/proc/net/tcp": PROC_NET_TCP})
    assert free_remote_port(host, 20000, 20002, random.Random(1)) == 20002
    with pytest.raises(RemoteHostError, match=r"no free TCP port between 20000 and 20001"):
        free_remote_port(host, 20000, 20001, random.Random(1))


def node_a(**script) -> FakeHost:
    return FakeHost("node-a", ["10.0.0.1"], console=b"Linux version 6.1\n", **script)


@pytest.fixture
def uploads(monkeypatch) -> list:
    sent = []
    monkeypatch.setattr("harness.backends.remote_qemu.upload_file",
                        lambda host, local, remote, sha256: sent.append((local.name, remote)))
    return sent


def test_start_uploads_starts_waits_and_wires_the_forwards(boot, tmp_path, uploads) -> None:
    host = node_a()
    launcher = make_launcher(host, boot, tmp_path / "r1")
    guest = launcher.start()
    try:
        assert host.kinds()[:3] == ["connect", "running_pid", "run"]
        assert uploads == [("bzImage", launcher.remote_kernel),
                           ("initramfs.cpio", launcher.remote_initrd)]
        prepare = host.calls[2][1]
        assert prepare.startswith("mkdir -p /srv/gvm/runs/r1 && rm -f ")
        assert "/srv/gvm/runs/r1/console-shell.sock" in prepare
        assert "/srv/gvm/runs/r1/qemu.exit" in prepare
        assert host.calls[3] == ("start_detached", "qemu-r1", launcher.remote_argv())
        wait = host.calls[4][1]
        assert "while [ ! -S /srv/gvm/runs/r1/console-shell.sock ]" in wait
        assert "kill -0 1001" in wait
        assert guest.pid == 1001 and guest.accelerator == "tcg"
        shell_forward, ssh_forward = host.forwards
        assert ssh_forward.target == TcpTarget(21022)
        assert shell_forward.target == UnixTarget("/srv/gvm/runs/r1/console-shell.sock")
        endpoints = guest.endpoints
        assert endpoints.ssh_port == 45678 and endpoints.ssh_host == "127.0.0.1"
        assert endpoints.shell_socket == tmp_path / "r1" / "console-shell.sock"
        assert shell_forward.local_path == endpoints.shell_socket
        assert endpoints.kernel_console_log.read_bytes() == host.console  # polled at once
    finally:
        guest.stop()
    assert ssh_forward.closed and shell_forward.closed
    assert guest.tail is not None and not guest.tail.running
    assert (tmp_path / "r1" / "qemu.log").read_bytes() == b"QEMU says hi\n"


def test_a_host_key_failure_stops_start_before_any_upload(boot, tmp_path, uploads) -> None:
    host = node_a(connect_error=HostKeyError("host 'node-a' offered ..."))
    with pytest.raises(HostKeyError):
        make_launcher(host, boot, tmp_path / "r1").start()
    assert host.kinds() == ["connect"] and uploads == []


def test_a_running_guest_of_the_same_run_is_left_alone(boot, tmp_path, uploads) -> None:
    host = node_a(processes={"qemu-r1": FakeProcess([], pid=555)})
    with pytest.raises(BootError, match=r"'qemu-r1' is already running as process group 555"):
        make_launcher(host, boot, tmp_path / "r1").start()
    assert host.kinds() == ["connect", "running_pid"], "its run directory was touched"


def guest_on(host: FakeHost, boot: BootSpec, local_dir: Path) -> RemoteQemuGuest:
    launcher = make_launcher(host, boot, local_dir)
    process = host.start_detached(launcher.process_name, launcher.remote_argv())
    host.events.clear()
    return RemoteQemuGuest(host, launcher.state(process))


def test_exit_status_asks_the_host_at_most_so_often_and_keeps_the_answer(boot, tmp_path) -> None:
    host = node_a()
    guest = guest_on(host, boot, tmp_path)
    assert guest.exit_status() is None and guest.exit_status() is None
    assert host.kinds() == ["running_pid"]
    (qemu,) = host.processes.values()
    qemu.alive, qemu.exit_code = False, "137\n"
    time.sleep(STATUS_CACHE_S + 0.05)
    assert guest.exit_status() == -9
    assert guest.exit_status() == -9 and host.kinds() == ["running_pid", "running_pid", "run"]


def test_a_group_gone_without_a_code_is_minus_one(boot, tmp_path) -> None:
    host = node_a()
    guest = guest_on(host, boot, tmp_path)
    (qemu,) = host.processes.values()
    qemu.alive, qemu.exit_code = False, None
    assert guest.exit_status() == -1


def test_a_lost_connection_is_dropped_so_the_next_call_logs_in_again(boot, tmp_path) -> None:
    host = node_a(connected=False)
    guest = guest_on(host, boot, tmp_path)
    assert guest.exit_status() is None
    assert host.kinds() == ["close", "running_pid"]


def test_stop_is_idempotent_and_a_failed_stop_says_how_to_stop_by_hand(boot, tmp_path) -> None:
    host = node_a(stop_error=RemoteHostError("host 'node-a': cannot connect"))
    guest = guest_on(host, boot, tmp_path)
    with pytest.raises(RemoteHostError, match=r"could not stop QEMU on host 'node-a'.*cannot "
                                              r"connect.*process group 1001: `kill -TERM -1001`"):
        guest.stop()
    host.stop_error = None
    guest.stop()  # tries again
    guest.stop()  # and now has nothing to do
    assert host.kinds().count("stop_detached") == 2
    assert guest.stop_outcome == "terminated" and guest.exit_status() == -15


def test_stop_removes_this_runs_initramfs_from_the_host(boot, tmp_path) -> None:
    host = node_a()
    guest = guest_on(host, boot, tmp_path)
    guest.stop()
    initrd = guest.state.remote_initrd
    assert initrd.startswith("/srv/gvm/artifacts/") and initrd.endswith("/initramfs.cpio")
    kinds = host.kinds()
    assert kinds[-1] == "run" and "stop_detached" in kinds[:-1]  # QEMU first, then its keys
    assert host.calls[-1][1].startswith(f"rm -f {initrd} && ")


def test_the_port_listing_reads_only_the_files_a_host_has(tmp_path) -> None:
    present = tmp_path / "tcp"
    present.write_text("listing\n")
    command = read_existing_command([str(present), str(tmp_path / "tcp6")])
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "listing\n")
