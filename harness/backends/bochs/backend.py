"""The harness's guest under KVM on a Bochs-emulated host: the jiffies suite with a real (if
emulated) VMX host and the patched host kvm, on a machine without VT-x.

The backend boots the Bochs machine, then the Bochs machine becomes the config's one remote host
and the remote-QEMU backend does the rest: upload, detached QEMU, console tail, SSH forward, probe, verdict. What differs is said here:
the QEMU is a static build uploaded from `bochs_host.qemu_tree` (the machine has only the
harness's initramfs), KVM is asked for, SSH is the only probe transport (dropbear forwards no
unix socket, so ttyS1 cannot be reached), and the rate is judged against the guest clock only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness.backends.base import GuestOnBootedHosts, StartSpec
from harness.backends.bochs.config import bochs_host_of
from harness.backends.bochs.host import MachineFacts, RunningBochsHost, start_bochs_host
from harness.backends.remote_qemu import RemoteGuestState, RemoteQemuBackend, RemoteQemuGuest
from harness.config import STOCK_LAUNCHER, ClusterConfig, HostConfig
from harness.errors import HarnessError
from harness.run_folder import RunFolder
from harness.transport.artifacts import upload_qemu_build

# Measured on a 2-core machine: the nested guest is ready 2m37s after QEMU starts.
NESTED_BOOT_S = 900.0
NESTED_SSH_S = 300.0
NESTED_COMMAND_S = 120.0


def required_qemu_tree(config: ClusterConfig) -> Path:
    qemu_tree = bochs_host_of(config).qemu_tree
    if qemu_tree is None:
        raise HarnessError(f"{config.path}: bochs_host.qemu_tree is not set; point it at a QEMU "
                           "build tree (GiantVM's QEMU 2.8, built with --static "
                           "--target-list=x86_64-softmmu) to run the guest on the Bochs machine")
    return qemu_tree


def guest_config(config: ClusterConfig, host: RunningBochsHost, qemu_binary: str) -> ClusterConfig:
    """`config` (as judged_config made it) with the Bochs machine as its one host and KVM."""
    spec = host.remote.spec
    bochs = HostConfig(name=spec.name, address=spec.address, user=spec.user, port=spec.port,
                       key_file=spec.key_file, work_dir=spec.work_dir,
                       known_hosts=spec.known_hosts)
    return replace(config, hosts=(bochs,), backend_sections=(),
                   vm=replace(config.vm, launcher=STOCK_LAUNCHER, accel="kvm",
                              qemu_binary=qemu_binary))


def describe(host: RunningBochsHost, facts: MachineFacts) -> list[str]:
    """What the machine offers KVM, as lines for the user."""
    return [f"kernel {facts.kernel_release}: ready after {host.boot_s:.1f}s, SSH after "
            f"{host.ssh_s:.1f}s more",
            f"CPU flags for kvm-intel: {' '.join(facts.cpu_flags) or 'none'}; /dev/kvm: "
            f"{'yes' if facts.dev_kvm else 'no'}; kvm.atomic_inc_mode: "
            f"{facts.atomic_inc_mode or 'absent (not a patched kvm)'}",
            *(f"    {line}" for line in facts.kvm_log)]


@dataclass
class BochsGuest(GuestOnBootedHosts):
    """The guest under KVM on a Bochs machine: the remote QEMU's guest, and the machine under it,
    which ends with it."""

    machine: RunningBochsHost
    facts: MachineFacts
    guest: RemoteQemuGuest

    @property
    def pid(self) -> int:
        return self.machine.process.pid

    def exit_status(self) -> int | None:
        return self.guest.exit_status()

    def record(self) -> RemoteGuestState:
        return self.guest.record()

    def stop_machines(self) -> None:
        self.machine.stop()

    def detach(self) -> None:
        """A Bochs machine is this command's child: it cannot be left running."""
        self.stop()


@dataclass(frozen=True)
class BochsBackend:
    """Named by `bochs-host --guest` only: no YAML asks for it by itself."""

    kind = "bochs"

    def wants(self, config: ClusterConfig) -> bool:
        return False

    def judged_config(self, config: ClusterConfig) -> ClusterConfig:
        """Longer timeouts, SSH only, and the rate against the guest clock only: the nested
        guest's kvm-clock follows Bochs' emulated TSC, which `clock: sync=slowdown` does not
        hold to the wall clock (250 ticks per guest second were ~390 per host second).
        Asked before the guest is built, so a missing QEMU build is said first."""
        required_qemu_tree(config)
        timeouts = replace(config.timeouts, boot_s=max(config.timeouts.boot_s, NESTED_BOOT_S),
                           ssh_s=max(config.timeouts.ssh_s, NESTED_SSH_S),
                           command_s=max(config.timeouts.command_s, NESTED_COMMAND_S))
        return replace(config, probe=replace(config.probe, transports=("ssh",)),
                       checks=replace(config.checks, rate_vs_host_clock=False),
                       timeouts=timeouts)

    def atomic_inc_mode(self, config: ClusterConfig) -> str | None:
        return None  # the machine's kvm keeps its default; `bochs-host` reports it

    def start(self, spec: StartSpec) -> BochsGuest:
        config, progress = spec.config, spec.progress
        qemu_tree = required_qemu_tree(config)
        machine_run = RunFolder(spec.run.path / "bochs-host")
        machine_run.path.mkdir(exist_ok=True)
        machine = start_bochs_host(bochs_host_of(config), machine_run, progress)
        try:
            facts = machine.facts()
            machine_run.write_json("bochs-host.json", {"boot_s": machine.boot_s,
                                                       "ssh_s": machine.ssh_s,
                                                       "facts": asdict(facts)})
            for line in describe(machine, facts):
                progress.say(f"    {line}")
            if not facts.dev_kvm:
                raise HarnessError("the Bochs machine's kernel has no /dev/kvm; boot a Linux-DSM "
                                   "kernel built with host_patches/bochs-host.config")
            with progress.step(f"upload the QEMU build in {qemu_tree} to the Bochs machine"):
                qemu_binary = upload_qemu_build(machine.remote, qemu_tree)
            nested = guest_config(config, machine, qemu_binary)
            guest = RemoteQemuBackend().start(replace(spec, config=nested))
        except BaseException:
            machine.stop()
            raise
        return BochsGuest(machine, facts, guest)

    def attach(self, config: ClusterConfig, run: RunFolder, record: dict,
               forwards: bool) -> BochsGuest:
        raise HarnessError(f"{run.path} ran its guest on a Bochs machine, which ended with the "
                           "command that started it; there is nothing to reattach to")
