"""`harness deploy`: the patched Linux-DSM kvm onto every GiantVM node's host, either as kvm.ko +
kvm-intel.ko swapped into the running kernel (modules.install_kvm_modules, rolled back on that host
if anything fails) or as a whole kernel installed and rebooted into (install.install_kernel).
Deploying is a step of its own, as provisioning is in labgrid: a kernel install reboots the hosts,
which no `run` should do behind the user's back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from harness.backends.giantvm.config import GiantVMConfig, giantvm_of, node_hosts
from harness.config import ClusterConfig
from harness.hostkvm.install import KernelArtifacts, KernelInstall, install_kernel
from harness.hostkvm.modules import (ATOMIC_INC_PARAM, DeployError, ModuleInstall,
                                     install_kvm_modules)
from harness.hosts import OpenHost, close_hosts, connect_hosts
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.transport.artifacts import upload_artifacts
from harness.transport.remote_host import RemoteHost
from harness.transport.parallel import ParallelResult, on_hosts

STATE_DIR = "state"  # under the hosts' work_dir: what the module install must remember


@dataclass(frozen=True)
class HostDeploy:
    host: str
    seconds: float
    modules: ModuleInstall | None = None
    kernel: KernelInstall | None = None
    error: str | None = None


def deploy_host_kvm(config: ClusterConfig, run: RunFolder, progress: Progress,
                    opener: OpenHost | None = None) -> list[HostDeploy]:
    """Install the configured host kvm on every node's host; raise with every host's outcome if
    any failed (each failed host was put back as it was by the install itself)."""
    giantvm = giantvm_of(config)
    if giantvm.host_modules is None and giantvm.host_kernel is None:
        raise DeployError(f"{config.path}: giantvm has neither host_modules nor host_kernel; "
                          "name what `harness host-build` made for the hosts")
    wanted = ([giantvm.host_modules.kvm_ko, giantvm.host_modules.kvm_intel_ko]
              if giantvm.host_modules else
              [giantvm.host_kernel.bzimage, giantvm.host_kernel.modules_tarball])  # type: ignore
    missing = [str(path) for path in wanted if not path.is_file()]
    if missing:
        raise DeployError(f"{' and '.join(missing)} not found; build the host kvm first "
                          "(`harness host-build --tree <Linux-DSM tree>`)")
    hosts = connect_hosts(node_hosts(config), opener)
    try:
        if giantvm.host_modules is not None:
            result = _deploy_modules(list(hosts.values()), wanted, giantvm.atomic_inc_mode,
                                     progress)
        else:
            result = _deploy_kernel(list(hosts.values()), giantvm, progress)
    finally:
        close_hosts(hosts.values())
    report = [HostDeploy(outcome.host, outcome.seconds, error=str(outcome.error))
              if not outcome.ok else
              HostDeploy(outcome.host, outcome.seconds,
                         modules=outcome.value if isinstance(outcome.value, ModuleInstall)
                         else None,
                         kernel=outcome.value if isinstance(outcome.value, KernelInstall)
                         else None)
              for outcome in result.outcomes]
    run.write_json("deploy.json", [asdict(entry) for entry in report])
    progress.say(result.summary())
    if result.failed:
        raise DeployError(f"{result.summary()}\nsee {run.file('deploy.json')}")
    return report


def _deploy_modules(hosts: list[RemoteHost], files: list[Path], mode: str,
                    progress: Progress) -> ParallelResult[ModuleInstall]:
    with progress.step(f"upload {', '.join(path.name for path in files)} to "
                       f"{len(hosts)} hosts"):
        uploads = upload_artifacts(hosts, files)
    if uploads.failed:
        raise DeployError(f"{uploads.summary()}\nnothing was installed on any host")
    remote = {outcome.host: outcome.value for outcome in uploads.outcomes}

    def install(host: RemoteHost) -> ModuleInstall:
        kvm_ko, kvm_intel_ko = (upload.remote_path for upload in remote[host.name] or ())
        return install_kvm_modules(host, kvm_ko, kvm_intel_ko,
                                   f"{host.spec.work_dir}/{STATE_DIR}",
                                   {ATOMIC_INC_PARAM: mode})

    with progress.step(f"swap in the patched kvm modules (atomic_inc_mode={mode})"):
        return on_hosts(hosts, "install kvm modules", install)


def _deploy_kernel(hosts: list[RemoteHost], giantvm: GiantVMConfig,
                   progress: Progress) -> ParallelResult[KernelInstall]:
    kernel = giantvm.host_kernel
    assert kernel is not None
    artifacts = KernelArtifacts(kernel.bzimage, kernel.modules_tarball, kernel.release)
    with progress.step(f"install kernel {kernel.release} on {len(hosts)} hosts and reboot them "
                       f"(boot {kernel.boot_mode})"):
        return on_hosts(hosts, f"install kernel {kernel.release}",
                        lambda host: install_kernel(host, artifacts, host.spec.work_dir,
                                                    boot_mode=kernel.boot_mode))  # type: ignore
