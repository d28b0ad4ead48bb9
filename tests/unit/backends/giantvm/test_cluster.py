"""The GiantVM cluster lifecycle against fake hosts: preflight, start order, the rendezvous
markers, a node dying, stopping with a host gone, and the dmesg scan after the run marker.
Nothing here needs VT-x, GiantVM's QEMU or a second machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.backends.base import BootSpec
from harness.backends.giantvm.cluster import (
    ClusterPreflightError, GiantVMCluster)
from harness.backends.giantvm.lines import (
    GiantVMLauncher, GiantVMSpecError, NodePlacement)
from harness.transport.console_log import log_tail
from harness.transport.remote_process import exit_recording_argv
from tests.fakes import FakeClock, FakeHost, FakeProcess

QEMU = "/opt/giantvm/qemu-system-x86_64"
RUN = "20261124-1600-gvm"


def make_launcher(hosts=("h0", "h1"), ips=("10.0.0.1", "10.0.0.2"), vcpus=2) -> GiantVMLauncher:
    return GiantVMLauncher(
        qemu_binary=QEMU,
        boot=BootSpec(kernel=Path("/srv/gvm/artifacts/k/bzImage"),
                      initrd=Path("/srv/gvm/artifacts/i/initramfs.cpio"),
                      cmdline="console=ttyS0", vcpus=vcpus, memory_mb=512),
        nodes=tuple(NodePlacement(host, ip, f"/srv/gvm/runs/{RUN}/node{i}")
                    for i, (host, ip) in enumerate(zip(hosts, ips))),
        ssh_port=21022)


def good_log(launcher: GiantVMLauncher, index: int) -> list[bytes]:
    """Node `index`'s QEMU output in three chunks, the last line split across two of them."""
    lines = "".join(f"{line}\n" for line in ["CPU Info", *launcher.qemu_markers(index)]).encode()
    cut = len(lines) - 8
    return [lines[:20], lines[20:cut], lines[cut:]]


def two_hosts() -> tuple[list, FakeHost, FakeHost]:
    events: list = []
    return (events, FakeHost("h0", ["10.0.0.1"], events=events),
            FakeHost("h1", ["10.0.0.2"], events=events))


def make_cluster(launcher, hosts, tmp_path, clock=None, **overrides) -> GiantVMCluster:
    clock = clock or FakeClock()
    values = dict(launcher=launcher, hosts={host.name: host for host in hosts},
                  local_dir=tmp_path / RUN, run_id=RUN, clock=clock, sleep=clock.sleep,
                  marker_timeout_s=30.0, poll_interval_s=1.0)
    return GiantVMCluster(**{**values, **overrides})


def script_good(cluster: GiantVMCluster, *hosts: FakeHost) -> None:
    for index, node in enumerate(cluster.launcher.nodes):
        for host in hosts:
            if host.name == node.host:
                host.script[cluster.process_name(index)] = (good_log(cluster.launcher, index),
                                                             None)


# -- preflight ------------------------------------------------------------------------------


def test_preflight_passes_and_reports_what_it_saw(tmp_path) -> None:
    _, h0, h1 = two_hosts()
    h0.listeners = ["0.0.0.0:22"]
    report = make_cluster(make_launcher(), [h0, h1], tmp_path).preflight()
    assert [facts.host for facts in report] == ["h0", "h1"]
    assert report[0].addresses == ("127.0.0.1", "10.0.0.1")
    assert report[0].listeners == (("*", 22),) and report[0].qemu_binary_ok


def test_preflight_names_the_host_and_the_fix_for_every_problem(tmp_path) -> None:
    _, h0, h1 = two_hosts()
    h1.ips = ["10.0.0.9"]  # node 1's address is not on h1
    h0.listeners = ["10.0.0.1:37710", "127.0.0.1:21022"]  # DSM port and SSH forward busy
    h1.has_binary = False
    h1.missing_files = ("/srv/gvm/artifacts/i/initramfs.cpio",)
    with pytest.raises(ClusterPreflightError) as caught:
        make_cluster(make_launcher(), [h0, h1], tmp_path).preflight()
    message = str(caught.value)
    assert "host 'h1': the guest's /srv/gvm/artifacts/i/initramfs.cpio are missing; upload " \
           "them first" in message
    assert "host 'h1' does not have node 1's iplist address 10.0.0.2 (it has 127.0.0.1, " \
           "10.0.0.9)" in message and "`ip addr add`" in message
    assert "host 'h0': 10.0.0.1:37710 is in use, but node 0 needs 10.0.0.1:37710 for its DSM" \
        in message
    assert "127.0.0.1:21022 is in use" in message and "pick another ssh_port" in message
    assert f"host 'h1': the GiantVM QEMU {QEMU} is missing or not executable" in message
    assert "h0" in message and "`ss -Htlnp`" in message


def test_a_wildcard_listener_blocks_the_io_router_port(tmp_path) -> None:
    _, h0, h1 = two_hosts()
    h1.listeners = ["*:40001"]
    with pytest.raises(ClusterPreflightError, match=r"host 'h1': \*:40001 is in use, but node 1 "
                                                    r"needs 10.0.0.2:40001 for its I/O router"):
        make_cluster(make_launcher(), [h0, h1], tmp_path).preflight()


def test_an_unreachable_host_fails_preflight_and_the_others_are_still_checked(tmp_path) -> None:
    events, h0, h1 = two_hosts()
    h1.down = True
    h0.has_binary = False
    with pytest.raises(ClusterPreflightError) as caught:
        make_cluster(make_launcher(), [h0, h1], tmp_path).preflight()
    assert "host 'h1' could not be checked" in str(caught.value)
    assert "No route to host" in str(caught.value)
    assert "host 'h0': the GiantVM QEMU" in str(caught.value)
    assert not any(event[1] == "start_detached" for event in events)


def test_a_node_of_this_run_already_running_is_refused(tmp_path) -> None:
    _, h0, h1 = two_hosts()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path)
    h1.processes[cluster.process_name(1)] = FakeProcess([])
    with pytest.raises(ClusterPreflightError, match=r"host 'h1': node 1 of run .* already runs "
                                                    r"as process group 1000.*kill -TERM -1000"):
        cluster.preflight()


def test_nodes_on_a_host_without_a_connection_are_refused(tmp_path) -> None:
    _, h0, _ = two_hosts()
    with pytest.raises(GiantVMSpecError, match=r"host\(s\) h1, which have no connection"):
        make_cluster(make_launcher(), [h0], tmp_path)


# -- start ----------------------------------------------------------------------------------


def test_the_exit_recording_wrapper_is_shell_safe() -> None:
    argv = exit_recording_argv(["qemu", "-local-cpu", "1,start=0,iplist=a b"], "/w/x y/qemu.exit")
    assert argv[3:] == ["qemu", "-local-cpu", "1,start=0,iplist=a b"]
    assert "'/w/x y/qemu.exit'" in argv[2]


def test_log_tail() -> None:
    assert log_tail("") == "(the log is empty)"
    assert log_tail("".join(f"{i}\n" for i in range(40)), 3) == "37\n38\n39"


