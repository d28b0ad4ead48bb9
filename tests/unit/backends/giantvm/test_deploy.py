"""`harness deploy` against fake hosts: kvm modules or a whole kernel onto every node's host,
nothing installed when an upload fails, every host's outcome in deploy.json."""

from __future__ import annotations

import json

import pytest

from harness.backends.giantvm import deploy
from harness.hostkvm.install import KernelInstall
from harness.hostkvm.modules import DeployError, ModuleInstall, ModuleSnapshot
from harness.backends.registry import parse_config
from harness.progress import Progress
from harness.transport.parallel import HostOutcome, ParallelResult
from tests.configs import shipped_config
from harness.run_folder import RunFolder
from tests.configs import giantvm_config as config_with
from tests.fakes import fake_hosts, fake_uploads, opener


@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder.create(tmp_path / "runs", "giantvm-2node")


def test_deploy_without_the_built_modules_stops_before_connecting(tmp_path, run) -> None:
    config = config_with(tmp_path)
    events, hosts = fake_hosts()
    with pytest.raises(DeployError, match=r"kvm.ko and .*kvm-intel.ko not found; build the host "
                                          r"kvm first \(`harness host-build"):
        deploy.deploy_host_kvm(config, run, Progress(), opener(hosts))
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

    monkeypatch.setattr(deploy, "upload_artifacts", fake_uploads(uploads))
    monkeypatch.setattr(deploy, "install_kvm_modules", install)
    with pytest.raises(DeployError, match=r"1 of 2 hosts ok(.|\n)*h1 .*FAILED: .*Invalid module"):
        deploy.deploy_host_kvm(config, run, Progress(), opener(hosts))
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

    monkeypatch.setattr(deploy, "upload_artifacts", upload_artifacts)
    monkeypatch.setattr(deploy, "install_kvm_modules",
                        lambda *args: pytest.fail("nothing may be installed"))
    with pytest.raises(DeployError, match=r"sshd went away(.|\n)*nothing was installed on any"):
        deploy.deploy_host_kvm(config, run, Progress(), opener(hosts))


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

    monkeypatch.setattr(deploy, "install_kernel", install_kernel)
    report = deploy.deploy_host_kvm(config, run, Progress(), opener(hosts))
    assert sorted(calls) == [(name, "4.9.76+", "/srv/gvm", "default") for name in ("h0", "h1")]
    assert [entry.kernel.release for entry in report] == ["4.9.76+", "4.9.76+"]


def test_deploy_of_a_stock_qemu_config_says_there_is_nothing_to_deploy(tmp_path, run) -> None:
    config = parse_config(tmp_path / "local.yaml", shipped_config(tmp_path / "runs"))
    with pytest.raises(Exception, match="does not use the GiantVM launcher"):
        deploy.deploy_host_kvm(config, run, Progress())
