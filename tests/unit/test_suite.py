"""The suite with the GiantVM backend, against fake hosts: `boot_guest` starts the cluster and
records it, a later command finds it again from session.json, `close` stops every node, the
hosts' kernel logs become verdict checks, and a dead kernel under test is a FAIL, not an error."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from harness import guest_session, suite
from harness.backends import registry
from harness.backends.base import BootSpec, HostLog
from harness.backends.giantvm import backend as giantvm_backend
from harness.backends.giantvm.backend import GiantVMBackend, launcher_for
from harness.backends.giantvm.guest import GiantVMGuest
from harness.backends.registry import backend_for, load_config
from harness.config import REPO_ROOT
from harness.errors import HarnessError, KernelUnderTestError
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages import rootfs
from harness.stages.verdict import CheckResult
from harness.transport.remote_host import RemoteHostError
from tests.configs import giantvm_config as config_with
from tests.fakes import fake_hosts, fake_uploads, opener
from tests.unit.backends.giantvm.test_cluster import good_log


@pytest.fixture
def cluster_run(tmp_path, monkeypatch):
    config = config_with(tmp_path)
    events, hosts = fake_hosts()
    run = RunFolder.create(config.run_root, config.name)
    registered = tuple(replace(entry, backend=GiantVMBackend(opener=opener(hosts)))
                       if entry.backend.kind == "giantvm" else entry
                       for entry in registry.REGISTERED)
    monkeypatch.setattr(registry, "REGISTERED", registered)
    monkeypatch.setattr(giantvm_backend, "upload_artifacts", fake_uploads([]))
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)
    launcher = launcher_for(config, boot, run.path.name)
    for index, name in enumerate(("h0", "h1")):
        hosts[name].script[f"gvm-{run.path.name}-node{index}"] = (good_log(launcher, index), None)
    hosts["h0"].console = f"Linux version 6.1\n{rootfs.READY_MARKER}\n".encode()
    (tmp_path / "bzImage").write_bytes(b"kernel")
    return config, events, hosts, run


def test_boot_records_the_cluster_and_a_later_command_stops_every_node(cluster_run) -> None:
    config, events, hosts, run = cluster_run
    session = guest_session.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    assert isinstance(session.guest, GiantVMGuest)
    assert session.guest.accelerator == "kvm" and session.guest.where == "h0"
    assert session.record.kind == "giantvm"
    session.detach()
    assert all(process.alive for host in hosts.values() for process in host.processes.values())

    saved = json.loads(run.file(guest_session.SESSION_FILE).read_text())
    assert saved["kind"] == "giantvm"
    assert [p["host"] for p in saved["state"]["processes"]] == ["h0", "h1"]
    assert saved["state"]["kernel"] == "/srv/gvm/artifacts/0/bzImage"

    later = guest_session.attach_session(config, run, forwards=False)
    assert isinstance(later.guest, GiantVMGuest) and later.guest.exit_status() is None
    later.close()
    assert sorted(event[0] for event in events if event[1] == "stop_detached") == ["h0", "h1"]
    assert all(not process.alive for host in hosts.values()
               for process in host.processes.values())


def test_a_cluster_session_needs_a_giantvm_config(cluster_run, tmp_path) -> None:
    config, _, _, run = cluster_run
    session = guest_session.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    session.close()
    with pytest.raises(Exception, match="started a GiantVM cluster, but .*local.yaml does not "
                                        "describe one"):
        guest_session.attach_session(load_config(), run)


def test_host_log_checks_join_the_verdict(cluster_run) -> None:
    config, _, hosts, run = cluster_run
    session = guest_session.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    hosts["h1"].dmesg += "[  101.0] kvm-dsm: DEADLOCK while fetching gfn 0x1234\n"
    try:
        checks = suite.host_log_checks(session.guest.host_logs())
    finally:
        session.close()
    assert [(check.name, check.passed) for check in checks] == [
        ("host kernel log of h0", False), ("host kernel log of h1", False)]
    assert "missing: " in checks[0].detail  # the fakes print no DSM connection lines
    assert "DEADLOCK" in checks[1].detail
    assert json.loads(run.file("host-dmesg.json").read_text())[1]["host"] == "h1"

    passing = CheckResult("x", "ssh", True, 0.0, "", "")
    verdict = suite.judge(suite.Observation([], None), 250, config, run, [passing])
    assert not verdict.passed  # no samples is never a pass, whatever the hosts say
    assert [check.name for check in verdict.checks] == ["jiffies samples", "x"]


def test_host_logs_pass_only_when_nothing_was_found() -> None:
    checks = suite.host_log_checks([
        HostLog("h0", "no BUG", ()),
        HostLog("h1", "no BUG", ("DEADLOCK: kvm-dsm: DEADLOCK gfn 0x1", "missing: node-1 line"))])
    assert [(check.name, check.passed, check.measured) for check in checks] == [
        ("host kernel log of h0", True, 0.0), ("host kernel log of h1", False, 2.0)]
    assert checks[1].detail == "DEADLOCK: kvm-dsm: DEADLOCK gfn 0x1; missing: node-1 line"
    assert checks[1].limit == "no BUG"


def test_a_kernel_that_panics_at_boot_is_a_fail_with_reports(cluster_run) -> None:
    config, _, hosts, run = cluster_run
    hosts["h0"].console = b"Linux version 6.1\nKernel panic - not syncing: VFS: no root\n"
    verdict = suite.boot_and_judge(config, config.path.parent / "bzImage", 250, run, Progress())
    assert not verdict.passed
    assert [(check.name, check.transport) for check in verdict.checks] == [
        ("guest kernel", "console"), ("host kernel log of h0", "dmesg"),
        ("host kernel log of h1", "dmesg")]
    assert "Kernel panic - not syncing" in verdict.checks[0].detail
    assert run.file("junit.xml").is_file() and "FAIL" in run.file("verdict.txt").read_text()
    assert all(not process.alive for host in hosts.values()
               for process in host.processes.values())


def test_a_host_kernel_that_oopses_while_the_guest_boots_ends_the_wait_and_is_named(
        cluster_run, monkeypatch) -> None:
    """The guest never becomes ready (its boot timeout may be an hour); the host's BUG line,
    written after this run's marker, ends the wait at once and the FAIL row names that host."""
    config, _, hosts, run = cluster_run
    hosts["h0"].console = b"Linux version 6.1\nrcu: Hierarchical SRCU implementation.\n"
    marked = hosts["h1"].run

    def run_and_oops(command, **options):
        result = marked(command, **options)
        if "/dev/kmsg" in str(command):
            hosts["h1"].dmesg += ("[  180.0] BUG: unable to handle kernel NULL pointer "
                                  "dereference at 0000000000000068\n")
        return result

    monkeypatch.setattr(hosts["h1"], "run", run_and_oops)
    verdict = suite.boot_and_judge(config, config.path.parent / "bzImage", 250, run, Progress())
    assert not verdict.passed
    assert [(check.name, check.transport) for check in verdict.checks][0] == (
        "host kernel of h1", "dmesg")
    assert "NULL pointer dereference" in verdict.checks[0].detail
    assert "NULL pointer dereference" in verdict.checks[2].detail  # h1's log row says it too
    assert "host kernel of h1" in run.file("verdict.txt").read_text()


def test_an_old_boots_bug_line_does_not_end_the_wait(cluster_run) -> None:
    """Only lines after this run's marker count: the fakes' dmesg starts with yesterday's BUG."""
    config, _, _, run = cluster_run
    session = guest_session.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    try:
        assert session.guest.host_kernel_failure() is None
    finally:
        session.close()


def test_a_stop_that_fails_after_the_probe_still_writes_the_verdict(cluster_run) -> None:
    config, _, hosts, run = cluster_run
    session = guest_session.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    hosts["h1"].stop_error = RemoteHostError("host 'h1': could not stop 'gvm-node1'")
    observation = suite.Observation([], None)
    baseline = suite.Baseline(0.0, {}, 0.0)
    with pytest.raises(HarnessError, match="could not stop .*\n.*verdict was written before"):
        suite.judge_after_stop(session, Progress(), True, observation, baseline)
    assert json.loads(run.file("verdict.json").read_text())["passed"] is False  # no samples
    assert run.file("junit.xml").is_file()


class _BrokenRunner:
    def run(self, command, timeout_s=None):
        raise ConnectionResetError(104, "Connection reset by peer")


def _session_with(tmp_path, exit_status, console: str) -> guest_session.GuestSession:
    from tests.unit.backends.test_registry import ScriptedGuest
    from harness.backends.base import GuestEndpoints
    log = tmp_path / "console-kernel.log"
    log.write_text(console)
    guest = ScriptedGuest(GuestEndpoints(log, tmp_path / "sock", "127.0.0.1", 1))
    guest.exit_status = lambda: exit_status  # type: ignore[method-assign]
    record = guest_session.SessionRecord("scripted", {}, guest_session.GuestAccess("pw", "k", "t", "b"), 2, 2, 250)
    session = guest_session.GuestSession(record, guest, RunFolder(tmp_path), load_config())
    session.open_ssh = lambda timeout_s=None: _BrokenRunner()  # type: ignore[method-assign]
    return session


@pytest.mark.parametrize("exit_status, console, error, message", [
    (-9, "Linux version 6.1\n", "BootError", r"QEMU exited with -9.*ends with \['Linux version"),
    (0, "Kernel panic - not syncing: Fatal exception\n", "KernelUnderTestError",
     "the guest kernel failed: 'Kernel panic - not syncing'"),
    (None, "Linux version 6.1\n", "ProbeError",
     "probing over ssh failed while the guest still runs: ConnectionResetError"),
])
def test_a_probe_that_loses_its_guest_says_whose_fault_it_is(tmp_path, exit_status, console,
                                                             error, message) -> None:
    session = _session_with(tmp_path, exit_status, console)
    session.config = replace(session.config, probe=replace(session.config.probe,
                                                           transports=("ssh",)))
    with pytest.raises(Exception, match=message) as raised:
        suite.probe_guest(session, Progress())
    assert type(raised.value).__name__ == error


def test_host_counters_become_rates_over_the_observation() -> None:
    before = {"h0": {"atomic_inc_sent": 100, "atomic_inc_stale": 0}, "h1": {}}
    after = {"h0": {"atomic_inc_sent": 600, "atomic_inc_stale": 0},
             "h1": {"atomic_inc_applied": 40}}
    assert suite.host_rates(before, after, 2.0) == {
        "h0": {"atomic_inc_sent": 250.0, "atomic_inc_stale": 0.0},
        "h1": {"atomic_inc_applied": 0.0}}  # a counter first seen at the end counts from there


def test_maxcpus_on_the_guest_command_line_is_how_many_vcpus_are_read() -> None:
    assert guest_session.vcpus_brought_up(4, "console=ttyS0 maxcpus=1 panic=-1") == 1
    assert guest_session.vcpus_brought_up(2, "maxcpus=8") == 2
    assert guest_session.vcpus_brought_up(4, "console=ttyS0 nomaxcpus=1") == 4


def test_the_hosts_reached_before_the_build_are_the_remote_ones_that_exist_yet(
        tmp_path, monkeypatch) -> None:
    reached: list[list[str]] = []
    monkeypatch.setattr(suite, "preflight_hosts",
                        lambda hosts, source: reached.append([host.name for host in hosts]))
    monkeypatch.setenv("GVM_EMULATED_HOST_KERNEL", str(tmp_path / "l1-bzImage"))
    monkeypatch.setenv("GVM_GIANTVM_QEMU", str(tmp_path / "qemu"))
    for name in ("local.yaml", "giantvm-emulated-2node.yaml"):  # this machine; booted by the run
        config = load_config(REPO_ROOT / "vm_configs" / name)
        suite.reach_hosts(config, backend_for(config), Progress())
    cluster = config_with(tmp_path)
    suite.reach_hosts(cluster, backend_for(cluster), Progress())
    assert reached == [["h0", "h1"]]


def test_a_guest_death_on_a_platform_with_a_known_defect_says_so_in_the_verdict(tmp_path) -> None:
    """The emulated hosts' QEMU without the injection fix can kill a healthy guest; the FAIL row
    must carry that doubt instead of blaming the kernel alone."""
    session = _session_with(tmp_path, None, "traps: PANIC: double fault, error_code: 0x0\n"
                                            "Kernel panic - not syncing: Fatal exception\n")
    session.guest.platform_caveat = lambda: "the hosts' emulator lacks the fix"  # type: ignore[method-assign]
    with pytest.raises(KernelUnderTestError) as raised:
        session.raise_if_dead()
    verdict = suite.kernel_failure(raised.value, session.config, session.run)
    row = verdict.checks[0]
    assert not verdict.passed and row.name == "guest kernel"
    assert row.detail == (f"the guest kernel failed: 'Kernel panic - not syncing'; see "
                          f"{tmp_path / 'console-kernel.log'}. But the hosts' emulator lacks "
                          "the fix")
