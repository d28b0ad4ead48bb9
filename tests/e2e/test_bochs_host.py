"""A Bochs-emulated host started, reached over SSH and stopped by the harness, for real.

The first test boots the harness's own guest kernel as the Bochs machine's kernel: it has no KVM,
but it shows that Bochs offers VMX with EPT and VPID and that the harness drives the machine. The
second needs a Linux-DSM host kernel (GiantVM master + host_patches/giantvm-master, tinyconfig +
host_patches/bochs-host.config) named by GVM_BOCHS_HOST_KERNEL: the patched kvm runs there, and
the ATOMIC_INC method is switched through the same code the GiantVM pipeline uses. The third also
needs a GiantVM QEMU build tree, named by GVM_GIANTVM_QEMU (built statically: the Bochs machine
has no shared libraries besides dropbear's): the harness's pipeline boots its patched guest under
KVM on that machine, as on any remote host, and runs the jiffies suite over SSH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.backends.bochs.host import start_bochs_host
from harness import suite
from harness.backends.bochs.backend import BochsBackend
from harness.backends.registry import load_config
from harness.backends.bochs.config import BochsHostConfig
from harness.transport.artifacts import QEMU_BUILD_BINARY, sha256_file, upload_file
from harness.backends.giantvm.backend import select_atomic_inc_mode
from harness.backends.bochs.machine import ISOLINUX_BIN
from harness.progress import Progress
from harness.run_folder import RunFolder
from tests.configs import shipped_config

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    shutil.which("bochs") is None or shutil.which("xorriso") is None
    or not ISOLINUX_BIN.is_file(),
    reason="Bochs, xorriso or isolinux is not installed (./gvm setup installs them)")]

HOST_KERNEL_ENV = "GVM_BOCHS_HOST_KERNEL"
GIANTVM_QEMU_ENV = "GVM_GIANTVM_QEMU"
needs_host_kernel = pytest.mark.skipif(
    not os.environ.get(HOST_KERNEL_ENV),
    reason=f"{HOST_KERNEL_ENV} is not set: point it at a Linux-DSM build (its O= directory, or "
           "the bzImage) of host_patches/giantvm-master on tinyconfig + "
           "host_patches/bochs-host.config")


def linux_dsm_kernel() -> Path:
    path = Path(os.environ[HOST_KERNEL_ENV])
    return path / "arch/x86/boot/bzImage" if path.is_dir() else path


def bochs_config(kernel: Path, memory_mb: int) -> BochsHostConfig:
    return BochsHostConfig(kernel=kernel, memory_mb=memory_mb, cpus=1, ips=50_000_000,
                           clock_sync="slowdown", cmdline="console=ttyS0 panic=-1",
                           boot_timeout_s=600)


def test_the_harness_starts_reaches_and_stops_a_bochs_machine_with_vmx(guest_kernel,
                                                                      tmp_path) -> None:
    run = RunFolder.create(tmp_path / "runs", "bochs")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(256 << 10))
    host = start_bochs_host(bochs_config(Path(guest_kernel.build.bzimage.path), 256), run,
                            Progress())
    try:
        facts = host.facts()
        upload = upload_file(host.remote, payload, "/tmp/gvm-harness/payload.bin")
        on_the_machine = host.remote.run("sha256sum /tmp/gvm-harness/payload.bin",
                                         check=True).stdout.split()[0]
    finally:
        host.stop()
    assert upload.uploaded and on_the_machine == sha256_file(payload)
    assert facts.kernel_release == guest_kernel.build.kernel_release
    assert set(facts.cpu_flags) == {"vmx", "ept", "vpid"}
    assert not facts.dev_kvm and facts.atomic_inc_mode is None  # this kernel has no KVM
    assert host.process.exit_status() is not None
    assert "GVM-HARNESS: guest ready" in run.file("bochs-serial.log").read_text(errors="replace")


@needs_host_kernel
def test_linux_dsm_in_bochs_runs_the_patched_kvm_and_switches_the_method(tmp_path) -> None:
    run = RunFolder.create(tmp_path / "runs", "bochs-dsm")
    host = start_bochs_host(bochs_config(linux_dsm_kernel(), 1024), run,
                            Progress())
    try:
        before = host.facts()
        select_atomic_inc_mode([host.remote], "local_first")
        after = host.facts()
    finally:
        host.stop()
    assert before.kernel_release.startswith("4.9.76")
    assert before.dev_kvm and set(before.cpu_flags) == {"vmx", "ept", "vpid"}
    assert (before.atomic_inc_mode, after.atomic_inc_mode) == ("send_all", "local_first")


def stripped_qemu_tree(tree: Path, copy: Path) -> Path:
    """The tree's binary without debug info (44 MB -> 13 MB): the emulated machine receives
    and hashes well under 1 MB/s."""
    (copy / "x86_64-softmmu").mkdir(parents=True)
    subprocess.run(["objcopy", "--strip-debug", str(tree / QEMU_BUILD_BINARY),
                    str(copy / QEMU_BUILD_BINARY)], check=True)
    (copy / "pc-bios").symlink_to(tree / "pc-bios")
    return copy


def nested_guest_config(tmp_path: Path) -> Path:
    """The shipped local config with a Bochs machine that boots Linux-DSM and has a QEMU build
    to run the guest with; 2 vCPUs and 128 MB keep the nested boot short."""
    data = shipped_config(tmp_path / "runs")
    qemu_tree = stripped_qemu_tree(Path(os.environ[GIANTVM_QEMU_ENV]), tmp_path / "gvm-qemu")
    data["bochs_host"] = {"kernel": str(linux_dsm_kernel()), "memory_mb": 1024,
                          "qemu_tree": str(qemu_tree)}  # the other keys: the defaults
    data["vm"].update(vcpus=2, nodes=1, memory_mb=128)
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@needs_host_kernel
@pytest.mark.skipif(not os.environ.get(GIANTVM_QEMU_ENV),
                    reason=f"{GIANTVM_QEMU_ENV} is not set: point it at a GiantVM QEMU 2.8 tree "
                           "built with --static --target-list=x86_64-softmmu")
def test_the_patched_guest_under_kvm_on_the_linux_dsm_host_keeps_jiffies(guest_kernel,
                                                                         tmp_path) -> None:
    """Single node, so the VM has no DSM: the patched kvm answers hypercall 10 with -KVM_ENOSYS
    (-1000) and the guest must fall back to counting jiffies itself, at HZ."""
    config = load_config(nested_guest_config(tmp_path))
    assert config.section(BochsHostConfig) is not None
    progress = Progress()
    run = RunFolder.create(config.run_root, "bochs-l1")
    verdict = suite.boot_and_judge(config, Path(guest_kernel.build.bzimage.path), guest_kernel.hz,
                                   run, progress, backend=BochsBackend())
    lines = suite.atomic_inc_lines(run.file("console-kernel.log"))
    assert lines[0] == "ATOMIC_INC: enabled"
    assert any("ATOMIC_INC: disabled: hypercall returned -1000" in line for line in lines), lines
    assert verdict.passed, run.file("verdict.txt").read_text()
    names = {check.name for check in verdict.checks}
    assert "ticks counted" in names and "rate vs host clock" not in names
