"""The pipeline with the GiantVM launcher, against fake hosts: `boot_guest` starts the cluster and
records it, a later command finds it again from session.json, `close` stops every node, and the
hosts' kernel logs become verdict checks."""

from __future__ import annotations

import json

import pytest

from harness import suite as pipeline
from harness.backends.giantvm import backend as giantvm_pipeline
from harness.stages import rootfs
from harness.stages.judge import CheckResult
from harness.config import load_config
from harness.backends.base import BootSpec
from harness.backends.giantvm.cluster import GiantVMGuest
from harness.progress import Progress
from harness.run_folder import RunFolder
from tests.unit.backends.giantvm.test_cluster import good_log
from tests.unit.backends.giantvm.test_backend import config_with, fake_hosts, fake_uploads


@pytest.fixture
def cluster_run(tmp_path, monkeypatch):
    config = config_with(tmp_path)
    events, hosts = fake_hosts()
    run = RunFolder.create(config.run_root, config.name)
    monkeypatch.setattr(giantvm_pipeline, "open_host", lambda host: hosts[host.name])
    monkeypatch.setattr(giantvm_pipeline, "upload_artifacts", fake_uploads([]))
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)
    launcher = giantvm_pipeline.launcher_for(config, boot, run.path.name)
    for index, name in enumerate(("h0", "h1")):
        hosts[name].script[f"gvm-{run.path.name}-node{index}"] = (good_log(launcher, index), None)
    hosts["h0"].console = f"Linux version 6.1\n{rootfs.READY_MARKER}\n".encode()
    (tmp_path / "bzImage").write_bytes(b"kernel")
    return config, events, hosts, run


def test_boot_records_the_cluster_and_a_later_command_stops_every_node(cluster_run) -> None:
    config, events, hosts, run = cluster_run
    session = pipeline.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    assert isinstance(session.guest, GiantVMGuest)
    assert session.record.accelerator == "kvm" and session.record.host == "h0"
    session.detach()
    assert all(process.alive for host in hosts.values() for process in host.processes.values())

    saved = json.loads(run.file(pipeline.SESSION_FILE).read_text())
    assert [p["host"] for p in saved["cluster"]["processes"]] == ["h0", "h1"]
    assert saved["cluster"]["kernel"] == "/srv/gvm/artifacts/0/bzImage"

    later = pipeline.attach_session(config, run, forwards=False)
    assert isinstance(later.guest, GiantVMGuest) and later.guest.exit_status() is None
    later.close()
    assert sorted(event[0] for event in events if event[1] == "stop_detached") == ["h0", "h1"]
    assert all(not process.alive for host in hosts.values()
               for process in host.processes.values())


def test_a_cluster_session_needs_a_giantvm_config(cluster_run, tmp_path) -> None:
    config, _, _, run = cluster_run
    session = pipeline.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    session.close()
    with pytest.raises(Exception, match="started a GiantVM cluster, but .*local.yaml does not "
                                        "describe one"):
        pipeline.attach_session(load_config(), run)


def test_host_log_checks_join_the_verdict(cluster_run) -> None:
    config, _, hosts, run = cluster_run
    session = pipeline.boot_guest(config, config.path.parent / "bzImage", 250, run, Progress())
    hosts["h1"].dmesg += "[  101.0] kvm-dsm: DEADLOCK while fetching gfn 0x1234\n"
    try:
        checks = pipeline.host_log_checks(session)
    finally:
        session.close()
    assert [(check.name, check.passed) for check in checks] == [
        ("host kernel log of h0", False), ("host kernel log of h1", False)]
    assert "missing: " in checks[0].detail  # the fakes print no DSM connection lines
    assert "DEADLOCK" in checks[1].detail
    assert json.loads(run.file("host-dmesg.json").read_text())[1]["host"] == "h1"

    passing = CheckResult("x", "ssh", True, 0.0, "", "")
    verdict = pipeline.judge([], 250, config, run, [passing])
    assert not verdict.passed  # no samples is never a pass, whatever the hosts say
    assert [check.name for check in verdict.checks] == ["jiffies samples", "x"]
