"""The GiantVM cluster lifecycle against fake hosts: preflight, start order, the rendezvous
markers, a node dying, stopping with a host gone, and the dmesg scan after the run marker.
Nothing here needs VT-x, GiantVM's QEMU or a second machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.backends.base import BootSpec
from harness.backends.giantvm.cluster import (
    ClusterPreflightError, ClusterStartError, ClusterStopError, GiantVMCluster, HostDmesg)
from harness.backends.giantvm.lines import (
    DMESG_RUN_MARKER, DmesgFinding, GiantVMLauncher, GiantVMSpecError, NodePlacement)
from harness.transport.remote_process import exit_recording_argv, log_tail
from harness.transport.remote_host import RemoteHostError
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


def test_start_marks_dmesg_starts_node_0_first_waits_for_markers_and_opens_node_0(
        tmp_path) -> None:
    events, h0, h1 = two_hosts()
    clock = FakeClock()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path, clock=clock)
    script_good(cluster, h0, h1)
    guest = cluster.start()
    try:
        starts = [event for event in events if event[1] == "start_detached"]
        assert [(event[0], event[2]) for event in starts] == [
            ("h0", cluster.process_name(0)), ("h1", cluster.process_name(1))]
        marks = [index for index, event in enumerate(events) if "/dev/kmsg" in str(event)]
        assert len(marks) == 2 and max(marks) < events.index(starts[0])
        assert DMESG_RUN_MARKER.format(run_id=RUN) in h0.dmesg
        argv = starts[0][3]
        assert argv[:2] == ["sh", "-c"] and argv[3:] == cluster.command_lines()[0]
        assert f"/srv/gvm/runs/{RUN}/node0/qemu.exit" in argv[2]
        # three chunks per log: the markers were complete only after the third read
        assert len(clock.sleeps) == 2
        shell_forward, ssh_forward = h0.forwards
        assert ssh_forward.target.port == 21022 and not h1.forwards
        endpoints = guest.endpoints
        assert endpoints.ssh_port == 45678
        assert endpoints.kernel_console_log.read_bytes() == h0.console
        assert shell_forward.local_path == endpoints.shell_socket
        assert guest.exit_status() is None
    finally:
        guest.stop()
    assert (tmp_path / RUN / "qemu-node1.log").read_text().endswith("connect_io_router done\n")
    assert not guest.endpoints.shell_socket.exists()


def test_the_exit_recording_wrapper_is_shell_safe() -> None:
    argv = exit_recording_argv(["qemu", "-local-cpu", "1,start=0,iplist=a b"], "/w/x y/qemu.exit")
    assert argv[3:] == ["qemu", "-local-cpu", "1,start=0,iplist=a b"]
    assert "'/w/x y/qemu.exit'" in argv[2]


def test_a_node_dying_during_the_rendezvous_stops_all_and_shows_its_log_tail(tmp_path) -> None:
    events, h0, h1 = two_hosts()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path)
    script_good(cluster, h0, h1)
    h0.script[cluster.process_name(0)] = ([b"QEMU nums: 2, Total CPU nums: 2, CPU per QEMU: 1\n"
                                           b"connect_io_router...\n"], None)
    h1.script[cluster.process_name(1)] = (
        [b"CPU Info\n", b"kvm_put_msrs: Assertion `ret == n' failed.\n"], 1)
    with pytest.raises(ClusterStartError) as caught:
        cluster.start()
    message = str(caught.value)
    assert "node 1 on host 'h1' exited (1) before the I/O router rendezvous was done" in message
    assert "kvm_put_msrs: Assertion" in message
    stopped = {event[0] for event in events if event[1] == "stop_detached"}
    assert stopped == {"h0", "h1"}
    assert not h0.processes[cluster.process_name(0)].alive


def test_a_rendezvous_that_never_completes_times_out_naming_the_missing_markers(
        tmp_path) -> None:
    events, h0, h1 = two_hosts()
    clock = FakeClock()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path, clock=clock)
    script_good(cluster, h0, h1)
    h1.script[cluster.process_name(1)] = ([b"connect_io_router...\n"], None)
    with pytest.raises(ClusterStartError) as caught:
        cluster.start()
    message = str(caught.value)
    assert "within 30s" in message and "37710+i and 40000+i" in message
    assert "node 1 on host 'h1' still lacks" in message and "'connect_io_router done'" in message
    assert "node 0" not in message.split("within")[1]
    assert clock.now >= 30.0
    assert {event[0] for event in events if event[1] == "stop_detached"} == {"h0", "h1"}


def test_a_start_failure_on_node_1_stops_node_0(tmp_path) -> None:
    events, h0, h1 = two_hosts()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path)

    def refuse(name, argv, as_root=False, timeout_s=15.0):
        raise RemoteHostError("host 'h1': could not start: exited at once")

    h1.start_detached = refuse  # type: ignore[method-assign]
    with pytest.raises(ClusterStartError, match=r"node 1 did not start on host 'h1'"):
        cluster.start()
    assert [event[0] for event in events if event[1] == "stop_detached"] == ["h0"]


# -- status and stop ------------------------------------------------------------------------


def started(tmp_path, clock=None):
    events, h0, h1 = two_hosts()
    clock = clock or FakeClock()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path, clock=clock)
    script_good(cluster, h0, h1)
    return events, h0, h1, cluster, cluster.start()


def test_exit_status_is_the_first_stopped_nodes_and_is_kept(tmp_path) -> None:
    clock = FakeClock()
    _, h0, h1, cluster, guest = started(tmp_path, clock)
    try:
        clock.now += 1
        assert guest.exit_status() is None
        process = h1.processes[cluster.process_name(1)]
        process.alive, process.exit_code = False, "137\n"
        assert guest.exit_status() is None, "asked again within STATUS_CACHE_S"
        clock.now += 1
        assert guest.exit_status() == -9
        h0.processes[cluster.process_name(0)].alive = False
        clock.now += 1
        assert guest.exit_status() == -9
    finally:
        guest.stop()


def test_stop_with_one_host_unreachable_stops_the_rest_and_reports_it(tmp_path) -> None:
    events, h0, h1, cluster, guest = started(tmp_path)
    h1.down = True
    with pytest.raises(ClusterStopError) as caught:
        guest.stop()
    message = str(caught.value)
    assert "1 of 2 GiantVM nodes could not be stopped" in message
    assert "node 1 on host 'h1'" in message and "No route to host" in message
    assert "`kill -TERM -1001`" in message
    assert not h0.processes[cluster.process_name(0)].alive
    assert guest.stops[0].outcome == "terminated" and guest.exit_status() == -15
    h1.down = False
    guest.stop()  # retries node 1 only
    guest.stop()  # nothing left to do
    stops = [event[0] for event in events if event[1] == "stop_detached"]
    assert stops.count("h0") == 1 and stops.count("h1") == 2
    assert (tmp_path / RUN / "qemu-node0.log").exists()
    assert (tmp_path / RUN / "qemu-node1.log").exists()


def test_stop_twice_is_safe(tmp_path) -> None:
    events, _, _, _, guest = started(tmp_path)
    guest.stop()
    guest.stop()
    assert len([event for event in events if event[1] == "stop_detached"]) == 2


# -- dmesg ----------------------------------------------------------------------------------


def test_dmesg_findings_only_after_the_run_marker_and_missing_dsm_lines(tmp_path) -> None:
    _, h0, h1, cluster, guest = started(tmp_path)
    guest.stop()
    h0.dmesg += ("[  101.0] kvm_dsm_init: Enable kvm dsm mode, this kvm instance will be node-0\n"
                 "[  101.5] kvm-dsm: node-0 established connection with node-1 [10.0.0.2:37711]\n"
                 "[  150.0] kvm_dsm_fetch: DEADLOCK gfn 1234\n")
    h1.dmesg += "[  101.0] kvm_dsm_init: Enable kvm dsm mode, this kvm instance will be node-1\n"
    reports = {report.host: report for report in guest.dmesg_findings()}
    assert [finding.kind for finding in reports["h0"].findings] == ["DEADLOCK"]
    assert reports["h0"].missing_markers == ()
    assert reports["h1"].findings == (), "the BUG line before the marker was counted"
    assert reports["h1"].missing_markers == (
        "kvm-dsm: node-1 established connection with node-0",)


def test_dmesg_of_an_unreachable_host_is_an_error_entry(tmp_path) -> None:
    _, h0, h1, _, guest = started(tmp_path)
    guest.stop()
    h1.down = True
    reports = {report.host: report for report in guest.dmesg_findings()}
    assert reports["h0"].error is None
    assert "No route to host" in (reports["h1"].error or "")


def test_two_nodes_on_one_loopback_host(tmp_path) -> None:
    events: list = []
    host = FakeHost("h0", ["10.0.0.1"], events=events)
    launcher = make_launcher(hosts=("h0", "h0"), ips=("127.0.0.1", "127.0.0.1"))
    cluster = make_cluster(launcher, [host], tmp_path)
    script_good(cluster, host)
    guest = cluster.start()
    guest.stop()
    assert [event[2] for event in events if event[1] == "start_detached"] == [
        cluster.process_name(0), cluster.process_name(1)]
    assert len([event for event in events if "/dev/kmsg" in str(event)]) == 1


def test_log_tail() -> None:
    assert log_tail("") == "(the log is empty)"
    assert log_tail("".join(f"{i}\n" for i in range(40)), 3) == "37\n38\n39"


def test_host_dmesg_problems_name_findings_missing_lines_and_unreadable_logs() -> None:
    assert HostDmesg("h0").problems() == ()
    found = HostDmesg("h1", findings=(DmesgFinding("DEADLOCK", "kvm-dsm: DEADLOCK gfn 0x1"),),
                      missing_markers=("kvm-dsm: node-1 established connection with node-0",))
    assert found.problems() == ("DEADLOCK: kvm-dsm: DEADLOCK gfn 0x1",
                                "missing: kvm-dsm: node-1 established connection with node-0")
    assert HostDmesg("h2", error="host 'h2': cannot connect").problems() == (
        "unreadable: host 'h2': cannot connect",)
