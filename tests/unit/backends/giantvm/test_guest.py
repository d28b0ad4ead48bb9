"""The running cluster against fake hosts: start order, the rendezvous, exit status, stop, and
the hosts' kernel logs."""

from __future__ import annotations

import pytest

from harness.backends.giantvm.cluster import ClusterStartError, ClusterStopError
from harness.backends.giantvm.guest import HostDmesg, parse_counters, start_guest
from harness.backends.giantvm.lines import DMESG_RUN_MARKER, DmesgFinding
from harness.transport.remote_host import RemoteHostError
from tests.fakes import FakeClock, FakeHost
from tests.unit.backends.giantvm.test_cluster import (RUN, make_cluster, make_launcher,
                                                      script_good, two_hosts)


def test_start_marks_dmesg_starts_node_0_first_waits_for_markers_and_opens_node_0(
        tmp_path) -> None:
    events, h0, h1 = two_hosts()
    clock = FakeClock()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path, clock=clock)
    script_good(cluster, h0, h1)
    guest = start_guest(cluster)
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


def test_a_node_dying_during_the_rendezvous_stops_all_and_shows_its_log_tail(tmp_path) -> None:
    events, h0, h1 = two_hosts()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path)
    script_good(cluster, h0, h1)
    h0.script[cluster.process_name(0)] = ([b"QEMU nums: 2, Total CPU nums: 2, CPU per QEMU: 1\n"
                                           b"connect_io_router...\n"], None)
    h1.script[cluster.process_name(1)] = (
        [b"CPU Info\n", b"kvm_put_msrs: Assertion `ret == n' failed.\n"], 1)
    with pytest.raises(ClusterStartError) as caught:
        start_guest(cluster)
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
        start_guest(cluster)
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
        start_guest(cluster)
    assert [event[0] for event in events if event[1] == "stop_detached"] == ["h0"]


# -- status and stop ------------------------------------------------------------------------


def started(tmp_path, clock=None):
    events, h0, h1 = two_hosts()
    clock = clock or FakeClock()
    cluster = make_cluster(make_launcher(), [h0, h1], tmp_path, clock=clock)
    script_good(cluster, h0, h1)
    return events, h0, h1, cluster, start_guest(cluster)


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


def test_stop_removes_this_runs_initramfs_from_every_host(tmp_path) -> None:
    events, _, _, cluster, guest = started(tmp_path)
    guest.stop()
    initrd = str(cluster.launcher.boot.initrd)
    removals = [event[0] for event in events
                if event[1] == "run" and event[2].startswith(f"rm -f {initrd} && ")]
    assert sorted(removals) == ["h0", "h1"]
    last_stop = max(index for index, event in enumerate(events) if event[1] == "stop_detached")
    assert all(index > last_stop for index, event in enumerate(events)
               if event[1] == "run" and event[2].startswith("rm -f "))


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
    guest = start_guest(cluster)
    guest.stop()
    assert [event[2] for event in events if event[1] == "start_detached"] == [
        cluster.process_name(0), cluster.process_name(1)]
    assert len([event for event in events if "/dev/kmsg" in str(event)]) == 1


def test_host_dmesg_problems_name_findings_missing_lines_and_unreadable_logs() -> None:
    assert HostDmesg("h0").problems() == ()
    found = HostDmesg("h1", findings=(DmesgFinding("DEADLOCK", "kvm-dsm: DEADLOCK gfn 0x1"),),
                      missing_markers=("kvm-dsm: node-1 established connection with node-0",))
    assert found.problems() == ("DEADLOCK: kvm-dsm: DEADLOCK gfn 0x1",
                                "missing: kvm-dsm: node-1 established connection with node-0")
    assert HostDmesg("h2", error="host 'h2': cannot connect").problems() == (
        "unreadable: host 'h2': cannot connect",)


def test_kvm_counters_are_read_from_debugfs_lines() -> None:
    assert parse_counters("atomic_inc_sent 12\natomic_inc_stale 0\ndsm_x n/a\n") == {
        "atomic_inc_sent": 12, "atomic_inc_stale": 0}
