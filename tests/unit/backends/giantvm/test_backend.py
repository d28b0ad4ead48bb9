"""The GiantVM backend against fake hosts: selecting the ATOMIC_INC method, starting the cluster
from a config, finding it again from its record. The launch itself is tested in test_cluster.py
and test_lines.py; `deploy` in tests/unit/hostkvm/test_deploy.py."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from harness.backends.base import BootSpec, StartSpec
from harness.backends.giantvm import backend as giantvm_backend
from harness.backends.giantvm.backend import GiantVMBackend, launcher_for, select_atomic_inc_mode
from harness.backends.giantvm.cluster import ClusterError
from harness.backends.giantvm.guest import ClusterRecord
from harness.progress import Progress
from harness.run_folder import RunFolder
from tests.configs import giantvm_config as config_with
from tests.fakes import fake_hosts, fake_uploads, opener
from tests.unit.backends.giantvm.test_cluster import good_log

@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder.create(tmp_path / "runs", "giantvm-2node")


def test_an_unpatched_kvm_is_named_with_the_fix(tmp_path) -> None:
    _, hosts = fake_hosts()
    hosts["h1"].kvm_mode = None
    with pytest.raises(ClusterError, match=r"h1 .*runs a kvm without ATOMIC_INC .*harness deploy"):
        select_atomic_inc_mode(list(hosts.values()), "local_first")
    assert hosts["h0"].kvm_mode == "local_first"


def test_start_selects_the_method_uploads_and_starts_node_0_first(tmp_path, run,
                                                                  monkeypatch) -> None:
    config = config_with(tmp_path, atomic_inc_mode="local_first")
    events, hosts = fake_hosts()
    uploads: list = []
    monkeypatch.setattr(giantvm_backend, "upload_artifacts", fake_uploads(uploads))
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)
    launcher = launcher_for(config, boot, run.path.name)
    for index, name in enumerate(("h0", "h1")):
        hosts[name].script[f"gvm-{run.path.name}-node{index}"] = (good_log(launcher, index), None)

    backend = GiantVMBackend(opener=opener(hosts))
    guest = backend.start(StartSpec(config, boot, run, Progress()))
    state = guest.record()
    try:
        assert [host.kvm_mode for host in hosts.values()] == ["local_first", "local_first"]
        assert uploads == [(["h0", "h1"], ["bzImage", "initramfs.cpio"])]
        starts = [event for event in events if event[1] == "start_detached"]
        assert [(event[0], event[2]) for event in starts] == [
            ("h0", f"gvm-{run.path.name}-node0"), ("h1", f"gvm-{run.path.name}-node1")]
        node1_line = starts[1][3]
        assert "/srv/gvm/artifacts/0/bzImage" in node1_line
        assert "2,start=2,iplist=10.0.0.1 10.0.0.2" in node1_line
        launch = json.loads(run.file("launch.json").read_text())
        assert launch["atomic_inc_mode"] == "local_first"
        assert launch["nodes"][1]["work_dir"] == f"/srv/gvm/runs/{run.path.name}/node1"
        assert ClusterRecord.from_dict(json.loads(json.dumps(asdict(state)))) == state
    finally:
        guest.stop()
        guest.detach()

    again = backend.attach(config, run, asdict(state), forwards=False)
    assert [process.process_name for process in again.processes] == [
        process.process_name for process in state.processes]
    assert again.exit_status() is not None  # both were stopped above


def test_a_failed_start_leaves_no_connection_open(tmp_path, run, monkeypatch) -> None:
    config = config_with(tmp_path)
    _, hosts = fake_hosts()
    hosts["h0"].kvm_mode = None
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", "", 4, 1024)
    with pytest.raises(ClusterError, match="without ATOMIC_INC"):
        GiantVMBackend(opener=opener(hosts)).start(StartSpec(config, boot, run, Progress()))
    assert all(host.closes == 1 and not host.processes for host in hosts.values())


def test_as_built_leaves_a_kvm_without_the_parameter_alone_and_the_record_names_it(
        tmp_path, run, monkeypatch) -> None:
    """moharaka's original branches compile the method in: nothing is written to any host."""
    config = config_with(tmp_path, atomic_inc_mode="as_built", host_modules=None)
    events, hosts = fake_hosts()
    for host in hosts.values():
        host.kvm_mode = None
    monkeypatch.setattr(giantvm_backend, "upload_artifacts", fake_uploads([]))
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)
    launcher = launcher_for(config, boot, run.path.name)
    for index, name in enumerate(("h0", "h1")):
        hosts[name].script[f"gvm-{run.path.name}-node{index}"] = (good_log(launcher, index), None)

    guest = GiantVMBackend(opener=opener(hosts)).start(StartSpec(config, boot, run, Progress()))
    try:
        mode_commands = [event[2] for event in events
                         if event[1] == "run" and "atomic_inc_mode" in event[2]]
        assert len(mode_commands) == 2 and not any("printf" in text for text in mode_commands)
        assert json.loads(run.file("launch.json").read_text())["atomic_inc_mode"] == "as_built"
        assert GiantVMBackend().atomic_inc_mode(config) == "as_built"
    finally:
        guest.stop()
        guest.detach()


def test_as_built_on_a_kvm_whose_method_is_chosen_at_run_time_is_refused(tmp_path) -> None:
    _, hosts = fake_hosts()
    hosts["h0"].kvm_mode = None
    hosts["h1"].kvm_mode = "local_first"
    with pytest.raises(ClusterError, match=r"h1.*chosen at run time .*reads 'local_first'.*"
                                           r"set send_all or local_first"):
        select_atomic_inc_mode(list(hosts.values()), "as_built")
    assert hosts["h1"].kvm_mode == "local_first"
