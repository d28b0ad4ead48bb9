"""The GiantVM stages of the pipeline: the hosts the nodes run on, the host kvm they need, and the
distributed guest started on them, found again by a later command, and judged by their logs.

- `deploy_host_kvm` (`harness deploy`): the patched Linux-DSM kvm goes onto every node's host,
  either as kvm.ko + kvm-intel.ko swapped into the running kernel (deploy.install_kvm_modules,
  rolled back on that host if anything fails) or as a whole kernel installed and rebooted into
  (host_install.install_kernel). Deploying is a step of its own, as provisioning is in labgrid:
  a kernel install reboots the hosts, which no `run` should do behind the user's back.
- `start_cluster` (`up`, `run`): selects the ATOMIC_INC method on every host through
  /sys/module/kvm/parameters/atomic_inc_mode (which only the patched kvm has, so this is also the
  check that `deploy` was done), uploads the guest kernel and initramfs to the same
  content-addressed path on every host, and starts the nodes (launch/giantvm_cluster.py).
- `attach_cluster` (`probe`, `down`, `status`): the same cluster again from session.json.
- `dmesg_checks`: every host's kernel log after the run marker, as verdict checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from harness.stages.judge import CheckResult
from harness.config import ClusterConfig, GiantVMConfig, HostConfig
from harness.hostkvm.modules import (ATOMIC_INC_PARAM, ModuleInstall, DeployError, install_kvm_modules,
                            upload_artifacts)
from harness.errors import HarnessError
from harness.hostkvm.install import KernelArtifacts, KernelInstall, install_kernel
from harness.backends.base import BootSpec
from harness.backends.giantvm.lines import GiantVMLauncher, NodePlacement
from harness.backends.giantvm.cluster import (ClusterError, GiantVMCluster, GiantVMGuest, HostDmesg,
                                            NodeProcess)
from harness.progress import Progress
from harness.transport.remote_host import ParallelResult, RemoteHost, RemoteHostSpec, on_hosts
from harness.run_folder import RunFolder

NODE_RUNS = "runs"  # under the hosts' work_dir: runs/<run id>/node<i>
STATE_DIR = "state"  # under the hosts' work_dir: what the module install must remember
MODE_FILE = f"/sys/module/kvm/parameters/{ATOMIC_INC_PARAM}"

OpenHost = Callable[[HostConfig], RemoteHost]


def open_host(host: HostConfig) -> RemoteHost:
    return RemoteHost(RemoteHostSpec.of(host))


def giantvm_of(config: ClusterConfig) -> GiantVMConfig:
    if config.giantvm is None:
        raise HarnessError(f"{config.path} does not use the GiantVM launcher (vm.launcher: "
                           "giantvm); there is no host kvm to deploy for a stock QEMU")
    return config.giantvm


def node_hosts(config: ClusterConfig) -> list[HostConfig]:
    """Each host that runs a node, once, in the order of its first node."""
    names = dict.fromkeys(node.host for node in giantvm_of(config).nodes)
    return [config.host(name) for name in names]


def connect_hosts(config: ClusterConfig,
                  opener: OpenHost | None = None) -> dict[str, RemoteHost]:
    """Log in to every node's host at once; if any fails, none stays connected."""
    hosts = {host.name: (opener or open_host)(host) for host in node_hosts(config)}
    result = on_hosts(list(hosts.values()), "connect", lambda host: host.connect())
    if result.failed:
        close_hosts(hosts.values())
        raise ClusterError(result.summary())
    return hosts


def close_hosts(hosts: Iterable[RemoteHost]) -> None:
    for host in hosts:
        host.close()


# -- deploy --------------------------------------------------------------------------------------

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
    hosts = connect_hosts(config, opener)
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


# -- start and attach ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterState:
    """What session.json keeps of a started cluster for a later `probe` or `down`."""

    run_id: str
    kernel: str  # the guest's bzImage and initramfs, as paths on the hosts
    initrd: str
    processes: tuple[NodeProcess, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClusterState:
        return cls(data["run_id"], data["kernel"], data["initrd"],
                   tuple(NodeProcess(**process) for process in data["processes"]))


def launcher_for(config: ClusterConfig, boot: BootSpec, run_id: str) -> GiantVMLauncher:
    """The launch lines for this config; `boot` names files as they are on the hosts."""
    giantvm = giantvm_of(config)
    return GiantVMLauncher(
        qemu_binary=config.vm.qemu_binary, boot=boot, machine=giantvm.machine,
        ssh_port=giantvm.ssh_port,
        nodes=tuple(NodePlacement(node.host, node.ip,
                                  f"{config.host(node.host).work_dir}/{NODE_RUNS}/{run_id}/"
                                  f"node{index}")
                    for index, node in enumerate(giantvm.nodes)))


def select_atomic_inc_mode(hosts: Sequence[RemoteHost], mode: str) -> None:
    """Write the method into every host's kvm and read it back."""
    def select(host: RemoteHost) -> None:
        result = host.run(f"[ -e {MODE_FILE} ] || exit 3; printf %s {mode} > {MODE_FILE} && "
                          f"cat {MODE_FILE}", timeout_s=15, as_root=True)
        if result.exit_status == 3:
            raise DeployError(f"host '{host.name}' runs a kvm without ATOMIC_INC ({MODE_FILE} "
                              "does not exist); install the patched one with `harness deploy`")
        result.check()
        if result.stdout.strip() != mode:
            raise DeployError(f"host '{host.name}': {MODE_FILE} reads "
                              f"'{result.stdout.strip()}' after writing '{mode}'")

    result = on_hosts(hosts, f"atomic_inc_mode={mode}", select)
    if result.failed:
        raise ClusterError(result.summary())


def start_cluster(config: ClusterConfig, boot: BootSpec, run: RunFolder, progress: Progress,
                  opener: OpenHost | None = None) -> tuple[GiantVMGuest, ClusterState]:
    """Select the method, upload the guest, start every node; on failure nothing keeps running
    and no connection stays open."""
    giantvm = giantvm_of(config)
    run_id = run.path.name
    hosts = connect_hosts(config, opener)
    try:
        select_atomic_inc_mode(list(hosts.values()), giantvm.atomic_inc_mode)
        with progress.step(f"upload the guest kernel and initramfs to {len(hosts)} hosts"):
            uploads = upload_artifacts(list(hosts.values()), [boot.kernel, boot.initrd])
        if uploads.failed:
            raise ClusterError(uploads.summary())
        kernel, initrd = (upload.remote_path for upload in uploads.outcomes[0].value or ())
        on_hosts_boot = BootSpec(Path(kernel), Path(initrd), boot.cmdline, boot.vcpus,
                                 boot.memory_mb)
        cluster = GiantVMCluster(launcher_for(config, on_hosts_boot, run_id), hosts,
                                 local_dir=run.path, run_id=run_id,
                                 marker_timeout_s=giantvm.rendezvous_timeout_s,
                                 as_root=True)
        run.write_json("launch.json", {
            "launcher": "giantvm", "atomic_inc_mode": giantvm.atomic_inc_mode,
            "nodes": [asdict(node) for node in cluster.launcher.nodes],
            "command_lines": cluster.command_lines()})
        guest = cluster.start()
    except BaseException:
        close_hosts(hosts.values())
        raise
    return guest, ClusterState(run_id, kernel, initrd, tuple(guest.processes))


def attach_cluster(config: ClusterConfig, state: ClusterState, run: RunFolder, vcpus: int,
                   memory_mb: int, forwards: bool,
                   opener: OpenHost | None = None) -> GiantVMGuest:
    boot = BootSpec(Path(state.kernel), Path(state.initrd), config.guest.cmdline, vcpus,
                    memory_mb)
    launcher = launcher_for(config, boot, state.run_id)
    hosts = {host.name: (opener or open_host)(host) for host in node_hosts(config)}
    cluster = GiantVMCluster(launcher, hosts, local_dir=run.path, run_id=state.run_id,
                             as_root=True)
    try:
        return GiantVMGuest.attach(cluster, state.processes, forwards=forwards)
    except BaseException:
        close_hosts(hosts.values())
        raise


# -- after the run -------------------------------------------------------------------------------

def dmesg_checks(findings: Sequence[HostDmesg]) -> list[CheckResult]:
    """One check per host: nothing alarming in its kernel log since the run started, and every
    DSM line its nodes should have printed is there."""
    checks = []
    for host in findings:
        problems = [f"{finding.kind}: {finding.line}" for finding in host.findings]
        problems += [f"missing: {line}" for line in host.missing_markers]
        if host.error is not None:
            problems.append(f"unreadable: {host.error}")
        checks.append(CheckResult(
            name=f"host kernel log of {host.host}", transport="dmesg", passed=not problems,
            measured=float(len(problems)), limit="no DEADLOCK/BUG/WARNING/invalid gfn lines, "
            "every DSM connection line", detail="; ".join(problems[:5]) or "clean"))
    return checks
