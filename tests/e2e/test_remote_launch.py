"""The stock-QEMU guest on a remote host: booted over SSH on a network-namespace host (real sshd,
real QEMU under TCG, the real guest kernel), reached through local forwards of its serial console
and SSH, probed and judged, then stopped without leaving anything behind.

The namespace hosts share this machine's file system (see netns_hosts.py), so "remote" files can be
checked on disk; the local run folder and the host's work dir are different directories, so the
tailed console log and the local serial socket never alias QEMU's own.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.stages import rootfs
from harness.stages.judge import check_samples
from harness.transport.serial_console import SerialConsole
from harness.hostkvm.modules import DeployError
from harness.transport.artifacts import UploadError
from harness.errors import BootError, ConsoleError, GuestSSHError, HarnessError
from harness.transport.guest_ssh import GuestSSH, SSHTarget
from harness.backends.base import BootSpec
from harness.backends.remote_qemu import RemoteQemuGuest, RemoteQemuLauncher, free_remote_port
from harness.stages.probe import JiffiesProbe
from harness.transport.remote_process import STATUS_CACHE_S
from harness.transport.remote_host import (
    HostKeyError, HostUnreachable, RemoteHost, RemoteHostError, RemoteHostSpec)
from tests.e2e.netns_hosts import NetnsHost, NetnsLab, lab_or_skip

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT_S = 180.0
LOGIN_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 30.0
QEMU_COMM = "qemu-system-x86"  # /proc/<pid>/comm is cut at 15 characters


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    with lab_or_skip(tmp_path_factory.mktemp("netns"), count=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> rootfs.Initramfs:
    return rootfs.build_initramfs(tmp_path_factory.mktemp("initramfs"))


@pytest.fixture(scope="module")
def boot(guest_kernel, initramfs, cluster_config) -> BootSpec:
    return BootSpec(kernel=Path(guest_kernel.build.bzimage.path), initrd=initramfs.path,
                    cmdline=cluster_config.guest.cmdline, vcpus=cluster_config.vm.vcpus,
                    memory_mb=cluster_config.vm.memory_mb)


def host_spec(lab: NetnsLab, host: NetnsHost, **overrides) -> RemoteHostSpec:
    values = dict(name=host.name, address=host.address, key_file=lab.client_key,
                  known_hosts=lab.known_hosts, work_dir=str(host.work_dir), connect_timeout_s=5.0)
    return RemoteHostSpec(**{**values, **overrides})


def launcher_for(remote: RemoteHost, boot: BootSpec, local_dir: Path, qemu_binary: str,
                 remote_ssh_port: int | None = None) -> RemoteQemuLauncher:
    local_dir.mkdir(parents=True, exist_ok=True)
    return RemoteQemuLauncher(host=remote, qemu_binary=qemu_binary, boot=boot,
                              local_dir=local_dir, accelerator="tcg",
                              remote_ssh_port=remote_ssh_port or free_remote_port(remote))


def wait_until(condition: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f}s"
        time.sleep(interval_s)


def wait_for_ready(guest: RemoteQemuGuest) -> str:
    """The pipeline's readiness wait: READY_MARKER in the (local, tailed) kernel console log."""
    log = guest.endpoints.kernel_console_log
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while rootfs.READY_MARKER not in (text := log.read_text(errors="replace")):
        status = guest.exit_status()
        assert status is None, f"QEMU exited with {status}: {guest.qemu_log_tail()}"
        assert time.monotonic() < deadline, f"no ready marker within {BOOT_TIMEOUT_S:.0f}s; " \
                                            f"console tail: {text[-500:]!r}"
        time.sleep(0.1)
    return text


def open_console(guest: RemoteQemuGuest, initramfs: rootfs.Initramfs,
                 transcript: Path) -> SerialConsole:
    console = SerialConsole(guest.endpoints.shell_socket, transcript, COMMAND_TIMEOUT_S)
    console.login("root", initramfs.credentials.root_password, LOGIN_TIMEOUT_S)
    return console


def open_ssh(guest: RemoteQemuGuest, initramfs: rootfs.Initramfs) -> GuestSSH:
    credentials = initramfs.credentials
    ssh = GuestSSH(SSHTarget(guest.endpoints.ssh_host, guest.endpoints.ssh_port, "root",
                             credentials.client_key, credentials.host_key_type,
                             credentials.host_key_base64), COMMAND_TIMEOUT_S)

    def still_booting() -> None:
        status = guest.exit_status()
        if status is not None:
            raise BootError(f"QEMU exited with {status}")

    ssh.connect(LOGIN_TIMEOUT_S, still_booting=still_booting)
    return ssh


def qemu_processes(lab: NetnsLab, host: NetnsHost) -> list[int]:
    return [pid for pid in lab.pids(host)
            if _read(Path(f"/proc/{pid}/comm")).strip() == QEMU_COMM]


def group_members(lab: NetnsLab, host: NetnsHost, group: int) -> list[int]:
    members = []
    for pid in lab.pids(host):
        fields = _read(Path(f"/proc/{pid}/stat")).rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == group and fields[0] != "Z":
            members.append(pid)
    return members


def assert_nothing_left(lab: NetnsLab, host: NetnsHost, remote: RemoteHost,
                        guest: RemoteQemuGuest) -> None:
    state = guest.state
    assert group_members(lab, host, state.pid) == []  # nothing runs at once
    # Zombies count for pgrep until init reaps them (this container's init takes a moment).
    wait_until(lambda: remote.run(["pgrep", "-g", str(state.pid)]).exit_status == 1, 10.0,
               "pgrep -g finding no member of the group")
    wait_until(lambda: qemu_processes(lab, host) == [], 10.0, "every QEMU being reaped")
    assert not Path(f"{host.work_dir}/proc/{state.process_name}.pid").exists()
    assert remote.running_pid(state.process_name) is None
    assert not guest.endpoints.shell_socket.exists(), "the local serial socket is still there"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", guest.endpoints.ssh_port), timeout=2).close()
    assert guest.tail is not None and not guest.tail.running


@dataclass
class Booted:
    lab: NetnsLab
    host: NetnsHost
    remote: RemoteHost
    launcher: RemoteQemuLauncher
    guest: RemoteQemuGuest
    console_text: str


@pytest.fixture(scope="module")
def booted(lab, boot, initramfs, cluster_config,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    host = lab.hosts[0]
    remote = RemoteHost(host_spec(lab, host))
    launcher = launcher_for(remote, boot, tmp_path_factory.mktemp("run"),
                            cluster_config.vm.qemu_binary)
    started = time.monotonic()
    guest = launcher.start()
    try:
        text = wait_for_ready(guest)
        print(f"remote boot to ready marker: {time.monotonic() - started:.1f}s")
        yield Booted(lab, host, remote, launcher, guest, text)
    finally:
        guest.stop()
        remote.close()


def test_the_launch_runs_qemu_on_the_remote_host_with_its_own_paths(booted) -> None:
    launcher, guest, host = booted.launcher, booted.guest, booted.host
    state = guest.state
    assert state.remote_run_dir.startswith(f"{host.work_dir}/runs/")
    (line,) = launcher.command_lines()
    assert line[line.index("-kernel") + 1] == launcher.remote_kernel
    assert Path(launcher.remote_kernel).read_bytes() == launcher.boot.kernel.read_bytes()
    assert Path(launcher.remote_initrd).read_bytes() == launcher.boot.initrd.read_bytes()
    # QEMU runs in the host's namespace, as the group the pid file names.
    qemu_pid = int(Path(state.remote_run_dir, "qemu.pid").read_text())
    assert qemu_pid in booted.lab.pids(host) and qemu_pid in qemu_processes(booted.lab, host)
    assert qemu_pid in group_members(booted.lab, host, state.pid)
    assert booted.remote.running_pid(state.process_name) == state.pid
    assert guest.exit_status() is None and guest.accelerator == "tcg"
    # The tailed log is a byte-for-byte prefix of QEMU's own file on the host.
    assert "Linux version" in booted.console_text
    local = guest.endpoints.kernel_console_log.read_bytes()
    assert Path(state.remote_console_log).read_bytes().startswith(local)
    assert guest.endpoints.kernel_console_log != Path(state.remote_console_log)


def test_a_second_start_of_the_same_run_is_refused(booted) -> None:
    with pytest.raises(BootError, match=r"QEMU did not start on host 'h1'.*already running "
                                        r"as process group.*stop it first"):
        booted.launcher.start()
    assert booted.guest.exit_status() is None


def test_the_forwarded_serial_console_logs_in_and_runs_commands(booted, initramfs,
                                                                  tmp_path) -> None:
    console = open_console(booted.guest, initramfs, tmp_path / "console-shell.log")
    try:
        assert console.run("hostname").check("hostname") == "gvm-guest"
        result = console.run("printf 'a\\nb\\n'; (exit 7)")
        assert (result.output.splitlines(), result.exit_status) == (["a", "b"], 7)
    finally:
        console.close()
    forward = booted.guest.console.shell_forward
    assert forward is not None and forward.failures == []


def test_the_forwarded_ssh_reaches_the_same_guest_with_every_vcpu(booted, initramfs, tmp_path,
                                                                   cluster_config) -> None:
    ssh = open_ssh(booted.guest, initramfs)
    console = open_console(booted.guest, initramfs, tmp_path / "console-shell.log")
    try:
        assert ssh.run("nproc").check("nproc").strip() == str(cluster_config.vm.vcpus)
        boot_id = ssh.run("cat /proc/sys/kernel/random/boot_id").check("boot_id")
        assert re.fullmatch(r"[0-9a-f-]{36}", boot_id)
        assert console.run("cat /proc/sys/kernel/random/boot_id").check("boot_id") == boot_id
    finally:
        ssh.close()
        console.close()


def test_jiffies_probed_over_both_forwards_pass_the_checks(booted, initramfs, tmp_path,
                                                            guest_kernel, cluster_config) -> None:
    ssh = open_ssh(booted.guest, initramfs)
    console = open_console(booted.guest, initramfs, tmp_path / "console-shell.log")
    try:
        samples = []
        for transport, runner in (("ssh", ssh), ("serial", console)):
            probe = JiffiesProbe(runner, transport, cluster_config.vm.vcpus,
                                 cluster_config.vm.vcpus_per_node)
            samples += probe.sample(rounds=8, interval_s=0.2)
    finally:
        ssh.close()
        console.close()
    assert {(s.transport, s.vcpu) for s in samples} == {
        (t, v) for t in ("ssh", "serial") for v in range(cluster_config.vm.vcpus)}
    verdict = check_samples(samples, guest_kernel.hz, cluster_config.checks)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]


def test_a_later_invocation_attaches_over_its_own_connection(booted, initramfs) -> None:
    state = booted.guest.state
    with RemoteHost(host_spec(booted.lab, booted.host)) as other:
        attached = RemoteQemuGuest.attach(other, state)
        try:
            assert attached.exit_status() is None
            assert attached.endpoints.ssh_port != booted.guest.endpoints.ssh_port
            ssh = open_ssh(attached, initramfs)
            try:
                assert ssh.run("nproc").check("nproc").strip() == str(booted.launcher.boot.vcpus)
            finally:
                ssh.close()
        finally:
            attached.close_local()
    assert booted.guest.exit_status() is None


def test_the_guest_outlives_a_lost_connection_and_is_reached_again(booted, initramfs) -> None:
    """sshd dies (all its sessions too); QEMU runs on, and the guest is reached once it is back."""
    lab, host, guest = booted.lab, booted.host, booted.guest
    lab.kill_sshd(host)
    try:
        wait_until(lambda: not booted.remote.connected, 10.0, "the lost connection being seen")
        time.sleep(STATUS_CACHE_S)
        started = time.monotonic()
        with pytest.raises(RemoteHostError, match=r"host 'h1'"):
            guest.exit_status()
        assert time.monotonic() - started < 8.0
        assert qemu_processes(lab, host), "QEMU died with the SSH connection"
    finally:
        lab.start_sshd(host)
    time.sleep(STATUS_CACHE_S)
    assert guest.exit_status() is None  # logged in again
    ssh = open_ssh(guest, initramfs)
    try:
        ssh.run("echo gvm-after-reconnect > /dev/console").check("echo")
    finally:
        ssh.close()
    wait_until(lambda: "gvm-after-reconnect" in guest.endpoints.kernel_console_log.read_text(),
               10.0, "the console tail picking up again")


def test_a_qemu_that_cannot_start_is_reported_with_its_output(booted, boot, cluster_config,
                                                              tmp_path) -> None:
    """The running guest already holds its SSH forward port on h1: a second QEMU cannot."""
    launcher = launcher_for(booted.remote, boot, tmp_path / "run", cluster_config.vm.qemu_binary,
                            remote_ssh_port=booted.guest.state.remote_ssh_port)
    if booted.guest.exit_status() is not None:
        pytest.skip("the booted guest is gone, so its port is free")
    started = time.monotonic()
    with pytest.raises(BootError, match=r"(?s)QEMU did not start: host 'h1'.*exited at once:.*"
                                        r"Could not set up host forwarding rule"):
        launcher.start()
    assert time.monotonic() - started < 15.0
    assert booted.remote.running_pid(launcher.process_name) is None
    assert not (tmp_path / "run" / "console-shell.sock").exists()


def test_stop_ends_qemu_on_the_host_and_closes_the_forwards(booted) -> None:
    guest = booted.guest
    started = time.monotonic()
    guest.stop()
    assert time.monotonic() - started < 15.0
    assert guest.stop_outcome == "terminated"
    assert guest.exit_status() == -15
    assert_nothing_left(booted.lab, booted.host, booted.remote, guest)
    guest.stop()  # again: nothing to do
    local = guest.endpoints.kernel_console_log.read_bytes()
    assert local == Path(guest.state.remote_console_log).read_bytes()
    assert (guest.endpoints.kernel_console_log.parent / "qemu.log").is_file()


def test_qemu_killed_after_boot_is_reported_and_commands_fail_clearly(
        lab, boot, initramfs, cluster_config, tmp_path) -> None:
    host = lab.hosts[1]
    with RemoteHost(host_spec(lab, host)) as remote:
        guest = launcher_for(remote, boot, tmp_path / "run", cluster_config.vm.qemu_binary).start()
        try:
            wait_for_ready(guest)
            console = open_console(guest, initramfs, tmp_path / "console-shell.log")
            ssh = open_ssh(guest, initramfs)
            assert ssh.run("true").exit_status == 0
            remote.run(f"kill -KILL $(cat {guest.state.remote_run_dir}/qemu.pid)", check=True)
            wait_until(lambda: guest.exit_status() is not None, 10.0, "exit_status() seeing it")
            assert guest.exit_status() == -9
            started = time.monotonic()
            with pytest.raises(ConsoleError, match=r"serial console .* closed .*did QEMU exit"):
                console.run("true", timeout_s=20)
            with pytest.raises(GuestSSHError):
                ssh.run("true", timeout_s=20)
            assert time.monotonic() - started < 30.0
            console.close()
            ssh.close()
            assert qemu_processes(lab, host) == []
        finally:
            guest.stop()
        assert guest.stop_outcome == "had exited" and guest.exit_status() == -9
        assert_nothing_left(lab, host, remote, guest)


def test_an_unreachable_host_fails_clearly_within_bounded_time(lab, boot, cluster_config,
                                                               tmp_path) -> None:
    remote = RemoteHost(RemoteHostSpec("ghost", lab.unused_address, key_file=lab.client_key,
                                       known_hosts=lab.known_hosts, connect_timeout_s=3.0))
    launcher = RemoteQemuLauncher(host=remote, qemu_binary=cluster_config.vm.qemu_binary,
                                  boot=boot, local_dir=tmp_path, remote_ssh_port=20022)
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match=rf"host 'ghost' \(root@{lab.unused_address}:22\)"):
        launcher.start()
    assert time.monotonic() - started < 8.0
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_pinned_host_key_is_refused_before_anything_is_uploaded(lab, boot, cluster_config,
                                                                        tmp_path) -> None:
    first, second = lab.hosts
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{first.address} {second.host_key_line}\n")
    work_dir = first.directory / "fresh-work"
    remote = RemoteHost(host_spec(lab, first, known_hosts=known_hosts, work_dir=str(work_dir)))
    launcher = launcher_for(remote, boot, tmp_path / "run", cluster_config.vm.qemu_binary,
                            remote_ssh_port=20022)
    with pytest.raises(HostKeyError, match=r"host 'h1' .* offered host key .* but .* pins"):
        launcher.start()
    assert not work_dir.exists(), "something reached the host"
    assert list((tmp_path / "run").iterdir()) == []


def test_errors_are_harness_errors() -> None:
    """The CLI prints HarnessErrors without a traceback; every failure above must be one."""
    for error in (BootError, ConsoleError, GuestSSHError, HostKeyError, HostUnreachable,
                  DeployError, UploadError):
        assert issubclass(error, HarnessError)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
