"""The GiantVM stages against fake hosts: deploy (modules or kernel), selecting the ATOMIC_INC
method, starting the cluster from a config, finding it again from session.json, and turning the
hosts' kernel logs into verdict checks. The launch itself is tested in launch/test_giantvm*.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.backends.giantvm import backend as giantvm_pipeline
from harness.config import REPO_ROOT, parse_config
from harness.hostkvm.modules import DeployError, ModuleInstall, ModuleSnapshot, UploadResult
from harness.hostkvm.install import KernelInstall
from harness.backends.base import BootSpec
from harness.backends.giantvm.lines import DmesgFinding
from harness.backends.giantvm.cluster import ClusterError, HostDmesg
from harness.progress import Progress
from harness.transport.remote_host import ParallelResult, HostOutcome
from harness.run_folder import RunFolder
from tests.configs import shipped_config
from tests.fakes import FakeHost
from tests.unit.backends.giantvm.test_cluster import good_log

EXAMPLE = REPO_ROOT / "vm_configs" / "giantvm-2node.yaml"


def config_with(tmp_path: Path, **giantvm):
    """The 2-node example, its hosts renamed to the fakes' and its files in tmp_path."""
    data = shipped_config(tmp_path / "runs", EXAMPLE.name)
    for index, host in enumerate(data["hosts"]):
        host.update(name=f"h{index}", address=f"10.0.0.{index + 1}", work_dir="/srv/gvm")
    data["giantvm"]["nodes"] = [{"host": "h0", "ip": "10.0.0.1"}, {"host": "h1", "ip": "10.0.0.2"}]
    modules = {"kvm_ko": str(tmp_path / "kvm.ko"), "kvm_intel_ko": str(tmp_path / "kvm-intel.ko")}
    data["giantvm"]["host_modules"] = modules
    data["giantvm"].update(giantvm)
    data["giantvm"] = {key: value for key, value in data["giantvm"].items() if value is not None}
    return parse_config(tmp_path / "cluster.yaml", data)


def fake_hosts() -> tuple[list, dict[str, FakeHost]]:
    events: list = []
    hosts = {"h0": FakeHost("h0", ["10.0.0.1"], events=events),
             "h1": FakeHost("h1", ["10.0.0.2"], events=events)}
    return events, hosts


def opener(hosts: dict[str, FakeHost]):
    return lambda host_config: hosts[host_config.name]


def fake_uploads(calls: list):
    def upload_artifacts(hosts, files):
        calls.append(([host.name for host in hosts], [Path(f).name for f in files]))
        return ParallelResult("upload", tuple(
            HostOutcome(host.name, 0.1, value=tuple(
                UploadResult(host.name, Path(f), f"/srv/gvm/artifacts/{index}/{Path(f).name}",
                             str(index), 1, True) for index, f in enumerate(files)))
            for host in hosts))
    return upload_artifacts


@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder.create(tmp_path / "runs", "giantvm-2node")


def test_deploy_without_the_built_modules_stops_before_connecting(tmp_path, run) -> None:
    config = config_with(tmp_path)
    events, hosts = fake_hosts()
    with pytest.raises(DeployError, match=r"kvm.ko and .*kvm-intel.ko not found; build the host "
                                          r"kvm first \(`harness host-build"):
        giantvm_pipeline.deploy_host_kvm(config, run, Progress(), opener(hosts))
    assert events == []


def test_deploy_modules_uploads_once_and_installs_with_the_method(tmp_path, run,
                                                                  monkeypatch) -> None:
    (tmp_path / "kvm.ko").write_bytes(b"kvm")
    (tmp_path / "kvm-intel.ko").write_bytes(b"intel")
    config = config_with(tmp_path, atomic_inc_mode="local_first")
    _, hosts = fake_hosts()
    uploads: list = []
    installs: list = []

    def install(host, kvm_ko, kvm_intel_ko, state_dir, params):
        installs.append((host.name, kvm_ko, kvm_intel_ko, state_dir, params))
        if host.name == "h1":
            raise DeployError("installing kvm modules on host 'h1' failed: insmod: Invalid "
                              "module format; the previous modules were loaded again")
        return ModuleInstall(host.name, ModuleSnapshot((), ()), {}, (), ())

    monkeypatch.setattr(giantvm_pipeline, "upload_artifacts", fake_uploads(uploads))
    monkeypatch.setattr(giantvm_pipeline, "install_kvm_modules", install)
    with pytest.raises(DeployError, match=r"1 of 2 hosts ok(.|\n)*h1 .*FAILED: .*Invalid module"):
        giantvm_pipeline.deploy_host_kvm(config, run, Progress(), opener(hosts))
    assert uploads == [(["h0", "h1"], ["kvm.ko", "kvm-intel.ko"])]
    assert sorted(installs) == [
        (name, "/srv/gvm/artifacts/0/kvm.ko", "/srv/gvm/artifacts/1/kvm-intel.ko",
         "/srv/gvm/state", {"atomic_inc_mode": "local_first"}) for name in ("h0", "h1")]
    report = json.loads(run.file("deploy.json").read_text())
    assert [(entry["host"], entry["error"] is None) for entry in report] == [("h0", True),
                                                                             ("h1", False)]
    assert all(host.closes == 1 for host in hosts.values())


def test_a_failed_upload_installs_nothing(tmp_path, run, monkeypatch) -> None:
    (tmp_path / "kvm.ko").write_bytes(b"kvm")
    (tmp_path / "kvm-intel.ko").write_bytes(b"intel")
    config = config_with(tmp_path)
    _, hosts = fake_hosts()

    def upload_artifacts(hosts, files):
        return ParallelResult("upload kvm.ko, kvm-intel.ko", (
            HostOutcome("h0", 0.1, value=()),
            HostOutcome("h1", 0.1, error=DeployError("sshd went away"))))

    monkeypatch.setattr(giantvm_pipeline, "upload_artifacts", upload_artifacts)
    monkeypatch.setattr(giantvm_pipeline, "install_kvm_modules",
                        lambda *args: pytest.fail("nothing may be installed"))
    with pytest.raises(DeployError, match=r"sshd went away(.|\n)*nothing was installed on any"):
        giantvm_pipeline.deploy_host_kvm(config, run, Progress(), opener(hosts))


def test_deploy_kernel_installs_and_reboots_every_host(tmp_path, run, monkeypatch) -> None:
    (tmp_path / "bzImage").write_bytes(b"k")
    (tmp_path / "modules.tar.gz").write_bytes(b"m")
    config = config_with(tmp_path, host_modules=None, host_kernel={
        "bzimage": str(tmp_path / "bzImage"), "modules_tarball": str(tmp_path / "modules.tar.gz"),
        "release": "4.9.76+", "boot_mode": "default"})
    _, hosts = fake_hosts()
    calls = []

    def install_kernel(host, artifacts, work_dir, boot_mode):
        calls.append((host.name, artifacts.release, work_dir, boot_mode))
        return KernelInstall(host.name, "4.9.76+", "6.1.0", "/boot/vmlinuz-4.9.76+",
                             "/lib/modules/4.9.76+", "Linux 4.9.76+", boot_mode, 3.0, 60.0)

    monkeypatch.setattr(giantvm_pipeline, "install_kernel", install_kernel)
    report = giantvm_pipeline.deploy_host_kvm(config, run, Progress(), opener(hosts))
    assert sorted(calls) == [(name, "4.9.76+", "/srv/gvm", "default") for name in ("h0", "h1")]
    assert [entry.kernel.release for entry in report] == ["4.9.76+", "4.9.76+"]


def test_deploy_of_a_stock_qemu_config_says_there_is_nothing_to_deploy(tmp_path, run) -> None:
    config = parse_config(tmp_path / "local.yaml", shipped_config(tmp_path / "runs"))
    with pytest.raises(Exception, match="does not use the GiantVM launcher"):
        giantvm_pipeline.deploy_host_kvm(config, run, Progress())


def test_an_unpatched_kvm_is_named_with_the_fix(tmp_path) -> None:
    _, hosts = fake_hosts()
    hosts["h1"].kvm_mode = None
    with pytest.raises(ClusterError, match=r"h1 .*runs a kvm without ATOMIC_INC .*harness deploy"):
        giantvm_pipeline.select_atomic_inc_mode(list(hosts.values()), "local_first")
    assert hosts["h0"].kvm_mode == "local_first"


def test_start_selects_the_method_uploads_and_starts_node_0_first(tmp_path, run,
                                                                  monkeypatch) -> None:
    config = config_with(tmp_path, atomic_inc_mode="local_first")
    events, hosts = fake_hosts()
    uploads: list = []
    monkeypatch.setattr(giantvm_pipeline, "upload_artifacts", fake_uploads(uploads))
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)
    launcher = giantvm_pipeline.launcher_for(config, boot, run.path.name)
    for index, name in enumerate(("h0", "h1")):
        hosts[name].script[f"gvm-{run.path.name}-node{index}"] = (good_log(launcher, index), None)

    guest, state = giantvm_pipeline.start_cluster(config, boot, run, Progress(), opener(hosts))
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
        assert giantvm_pipeline.ClusterState.from_dict(
            json.loads(json.dumps(state.to_dict()))) == state
    finally:
        guest.stop()
        guest.detach()

    again = giantvm_pipeline.attach_cluster(config, state, run, config.vm.vcpus,
                                            config.vm.memory_mb, forwards=False,
                                            opener=opener(hosts))
    assert [process.process_name for process in again.processes] == [
        process.process_name for process in state.processes]
    assert again.exit_status() is not None  # both were stopped above


def test_a_failed_start_leaves_no_connection_open(tmp_path, run, monkeypatch) -> None:
    config = config_with(tmp_path)
    _, hosts = fake_hosts()
    hosts["h0"].kvm_mode = None
    boot = BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", "", 4, 1024)
    with pytest.raises(ClusterError, match="without ATOMIC_INC"):
        giantvm_pipeline.start_cluster(config, boot, run, Progress(), opener(hosts))
    assert all(host.closes == 1 and not host.processes for host in hosts.values())


def test_dmesg_checks_pass_only_for_a_clean_log_with_every_dsm_line() -> None:
    checks = giantvm_pipeline.dmesg_checks([
        HostDmesg("h0"),
        HostDmesg("h1", findings=(DmesgFinding("DEADLOCK", "kvm-dsm: DEADLOCK gfn 0x1"),),
                  missing_markers=("kvm-dsm: node-1 established connection with node-0",)),
        HostDmesg("h2", error="host 'h2': cannot connect")])
    assert [(check.name, check.passed) for check in checks] == [
        ("host kernel log of h0", True), ("host kernel log of h1", False),
        ("host kernel log of h2", False)]
    assert "DEADLOCK: kvm-dsm: DEADLOCK gfn 0x1" in checks[1].detail
    assert "missing: kvm-dsm: node-1 established" in checks[1].detail
    assert checks[1].measured == 2
    assert "unreadable" in checks[2].detail
