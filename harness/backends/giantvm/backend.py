"""The GiantVM backend: one GiantVM QEMU per node on the hosts that own the nodes' iplist addresses,
started, found again and stopped as one guest (cluster.py does the processes).

`start` selects the ATOMIC_INC method on every host through /sys/module/kvm/parameters/
atomic_inc_mode (which only the patched kvm has, so this is also the check that `deploy` was
done; with `as_built` it checks instead that the hosts' kvm has no such parameter, i.e. that the
method is compiled in, as in moharaka's original branches), uploads the guest kernel and initramfs to the same content-addressed path on every host,
and starts the nodes. `attach` rebuilds the cluster from the guest's record in session.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from harness.backends.base import BootSpec, StartSpec
from harness.backends.giantvm.config import AS_BUILT, LAUNCHER, giantvm_of, node_hosts
from harness.backends.giantvm.cluster import ClusterError, GiantVMCluster
from harness.backends.giantvm.guest import ClusterRecord, GiantVMGuest, start_guest
from harness.backends.giantvm.lines import GiantVMLauncher, NodePlacement
from harness.config import ClusterConfig, HostConfig
from harness.errors import HarnessError
from harness.hostkvm.modules import ATOMIC_INC_PARAM
from harness.hosts import OpenHost, close_hosts, connect_hosts, open_host
from harness.run_folder import RunFolder
from harness.transport.artifacts import upload_artifacts
from harness.transport.remote_host import RemoteHost
from harness.transport.parallel import on_hosts

NODE_RUNS = "runs"  # under the hosts' work_dir: runs/<run id>/node<i>
MODE_FILE = f"/sys/module/kvm/parameters/{ATOMIC_INC_PARAM}"


class AtomicIncModeError(HarnessError):
    """A host's kvm has no ATOMIC_INC, or refused the method asked for."""


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
    """Write the method into every host's kvm and read it back; for `as_built`, check that no
    host's kvm could be told a method (else the verdict would name the wrong one)."""
    def keep_as_built(host: RemoteHost) -> None:
        result = host.run(f"[ -e {MODE_FILE} ] || exit 3; cat {MODE_FILE}", timeout_s=15,
                          as_root=True)
        if result.exit_status == 3:
            return
        result.check()
        raise AtomicIncModeError(f"host '{host.name}' runs a kvm whose method is chosen at run "
                                 f"time ({MODE_FILE} reads '{result.stdout.strip()}'), but "
                                 f"giantvm.atomic_inc_mode is {AS_BUILT}, which is for a kvm "
                                 "with its method compiled in; set send_all or local_first")

    def select(host: RemoteHost) -> None:
        result = host.run(f"[ -e {MODE_FILE} ] || exit 3; printf %s {mode} > {MODE_FILE} && "
                          f"cat {MODE_FILE}", timeout_s=15, as_root=True)
        if result.exit_status == 3:
            raise AtomicIncModeError(f"host '{host.name}' runs a kvm without ATOMIC_INC ({MODE_FILE} "
                              "does not exist); install the patched one with `harness deploy`")
        result.check()
        if result.stdout.strip() != mode:
            raise AtomicIncModeError(f"host '{host.name}': {MODE_FILE} reads "
                              f"'{result.stdout.strip()}' after writing '{mode}'")

    result = on_hosts(hosts, f"atomic_inc_mode={mode}",
                      keep_as_built if mode == AS_BUILT else select)
    if result.failed:
        raise ClusterError(result.summary())


@dataclass(frozen=True)
class GiantVMBackend:
    kind = "giantvm"
    opener: OpenHost = field(default=open_host)

    def wants(self, config: ClusterConfig) -> bool:
        return config.vm.launcher == LAUNCHER

    def judged_config(self, config: ClusterConfig) -> ClusterConfig:
        return config

    def hosts_to_reach(self, config: ClusterConfig) -> list[HostConfig]:
        return node_hosts(config)

    def atomic_inc_mode(self, config: ClusterConfig) -> str | None:
        return giantvm_of(config).atomic_inc_mode

    def start(self, spec: StartSpec) -> GiantVMGuest:
        """Select the method, upload the guest, start every node; on failure nothing keeps
        running and no connection stays open."""
        config, boot, run = spec.config, spec.boot, spec.run
        giantvm = giantvm_of(config)
        run_id = run.path.name
        hosts = connect_hosts(node_hosts(config), self.opener)
        try:
            select_atomic_inc_mode(list(hosts.values()), giantvm.atomic_inc_mode)
            with spec.progress.step(f"upload the guest kernel and initramfs to {len(hosts)} "
                                    "hosts"):
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
                "launcher": LAUNCHER, "atomic_inc_mode": giantvm.atomic_inc_mode,
                "nodes": [node.__dict__ for node in cluster.launcher.nodes],
                "command_lines": cluster.command_lines()})
            nodes = giantvm.nodes
            with spec.progress.step(f"start {len(nodes)} GiantVM nodes on "
                                    f"{', '.join(dict.fromkeys(node.host for node in nodes))}"):
                return start_guest(cluster)
        except BaseException:
            close_hosts(hosts.values())
            raise

    def attach(self, config: ClusterConfig, run: RunFolder, record: dict,
               forwards: bool) -> GiantVMGuest:
        if config.vm.launcher != LAUNCHER:
            raise HarnessError(f"{run.path} started a GiantVM cluster, but {config.path} does "
                               "not describe one; pass the config it was started with")
        state = ClusterRecord.from_dict(record)
        boot = BootSpec(Path(state.kernel), Path(state.initrd), config.guest.cmdline,
                        config.vm.vcpus, config.vm.memory_mb)
        launcher = launcher_for(config, boot, state.run_id)
        hosts = {host.name: self.opener(host) for host in node_hosts(config)}
        cluster = GiantVMCluster(launcher, hosts, local_dir=run.path, run_id=state.run_id,
                                 as_root=True)
        try:
            return GiantVMGuest.attach(cluster, state.processes, forwards=forwards)
        except BaseException:
            close_hosts(hosts.values())
            raise
