"""A Bochs-emulated host started, reached over SSH and stopped by the harness, for real.

The first test boots the harness's own guest kernel as the Bochs machine's kernel: it has no KVM,
but it shows that Bochs offers VMX with EPT and VPID and that the harness drives the machine. The
second needs a Linux-DSM host kernel (GiantVM master + host_patches/giantvm-master, tinyconfig +
host_patches/bochs-host.config) named by GVM_BOCHS_HOST_KERNEL: the patched kvm runs there, and
the ATOMIC_INC method is switched through the same code the GiantVM pipeline uses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.bochs_host import start_bochs_host
from harness.config import BochsHostConfig
from harness.deploy import sha256_file, upload_file
from harness.giantvm_pipeline import select_atomic_inc_mode
from harness.launch.bochs import ISOLINUX_BIN
from harness.progress import Progress
from harness.run_folder import RunFolder

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    shutil.which("bochs") is None or shutil.which("xorriso") is None
    or not ISOLINUX_BIN.is_file(),
    reason="Bochs, xorriso or isolinux is not installed (./gvm setup installs them)")]

HOST_KERNEL_ENV = "GVM_BOCHS_HOST_KERNEL"


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


@pytest.mark.skipif(not os.environ.get(HOST_KERNEL_ENV),
                    reason=f"{HOST_KERNEL_ENV} is not set: point it at a Linux-DSM bzImage built "
                           "with host_patches/giantvm-master on tinyconfig + "
                           "host_patches/bochs-host.config")
def test_linux_dsm_in_bochs_runs_the_patched_kvm_and_switches_the_method(tmp_path) -> None:
    run = RunFolder.create(tmp_path / "runs", "bochs-dsm")
    host = start_bochs_host(bochs_config(Path(os.environ[HOST_KERNEL_ENV]), 1024), run,
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
