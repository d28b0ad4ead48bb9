"""The harness's guest under KVM on a Bochs-emulated host: the jiffies suite with a real (if
emulated) VMX host and the patched host kvm, on a machine without VT-x.

The Bochs machine becomes the config's one remote host and the ordinary remote-QEMU path does the
rest: upload, detached QEMU, console tail, SSH forward, probe, verdict. What differs is said here:
the QEMU is a static build uploaded from `bochs_host.qemu_tree` (the machine has only the
harness's initramfs), KVM is asked for, SSH is the only probe transport (dropbear forwards no
unix socket, so ttyS1 cannot be reached), and the rate is judged against the guest clock only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from harness import suite as pipeline
from harness.backends.bochs.host import MachineFacts, RunningBochsHost
from harness.stages.judge import Verdict
from harness.config import ClusterConfig, HostConfig
from harness.hostkvm.modules import upload_qemu_build
from harness.errors import HarnessError
from harness.progress import Progress
from harness.run_folder import RunFolder

# Measured on a 2-core machine: the nested guest is ready 2m37s after QEMU starts.
NESTED_BOOT_S = 900.0
NESTED_SSH_S = 300.0
NESTED_COMMAND_S = 120.0


@dataclass(frozen=True)
class NestedGuestResult:
    verdict: Verdict
    atomic_inc_lines: list[str]
    run: RunFolder


def required_qemu_tree(config: ClusterConfig) -> Path:
    if config.bochs_host is None or config.bochs_host.qemu_tree is None:
        raise HarnessError(f"{config.path}: bochs_host.qemu_tree is not set; point it at a QEMU "
                           "build tree (GiantVM's QEMU 2.8, built with --static "
                           "--target-list=x86_64-softmmu) to run the guest on the Bochs machine")
    return config.bochs_host.qemu_tree


def guest_config(config: ClusterConfig, host: RunningBochsHost, qemu_binary: str) -> ClusterConfig:
    """`config` with the Bochs machine as its one host, KVM, and SSH as the only transport."""
    spec = host.remote.spec
    bochs = HostConfig(name=spec.name, address=spec.address, user=spec.user, port=spec.port,
                       key_file=spec.key_file, work_dir=spec.work_dir,
                       known_hosts=spec.known_hosts)
    timeouts = replace(config.timeouts, boot_s=max(config.timeouts.boot_s, NESTED_BOOT_S),
                       ssh_s=max(config.timeouts.ssh_s, NESTED_SSH_S),
                       command_s=max(config.timeouts.command_s, NESTED_COMMAND_S))
    # The nested guest's kvm-clock follows Bochs' emulated TSC, which `clock: sync=slowdown` does
    # not hold to the wall clock: 250 ticks per guest second were ~390 per host second.
    checks = replace(config.checks, rate_vs_host_clock=False)
    return replace(config, hosts=(bochs,), giantvm=None,
                   vm=replace(config.vm, launcher="qemu", accel="kvm", qemu_binary=qemu_binary),
                   probe=replace(config.probe, transports=("ssh",)), checks=checks,
                   timeouts=timeouts)


def run_guest_suite(config: ClusterConfig, host: RunningBochsHost, facts: MachineFacts,
                    kernel: Path, hz: int, progress: Progress) -> NestedGuestResult:
    """Boot the guest under KVM on the machine (`facts`: what it said of itself), probe it over
    SSH, judge it, stop it."""
    qemu_tree = required_qemu_tree(config)
    if not facts.dev_kvm:
        raise HarnessError("the Bochs machine's kernel has no /dev/kvm; boot a Linux-DSM kernel "
                           "built with host_patches/bochs-host.config")
    with progress.step(f"upload the QEMU build in {qemu_tree} to the Bochs machine"):
        qemu_binary = upload_qemu_build(host.remote, qemu_tree)
    nested = guest_config(config, host, qemu_binary)
    run = RunFolder.create(config.run_root, f"{config.name}-bochs-guest")
    session = pipeline.boot_guest(nested, kernel, hz, run, progress)
    try:
        samples = pipeline.probe_guest(session, nested, progress)
        verdict = pipeline.judge(samples, hz, nested, run)
    finally:
        session.close()
    return NestedGuestResult(verdict, pipeline.atomic_inc_lines(run.file("console-kernel.log")),
                             run)
