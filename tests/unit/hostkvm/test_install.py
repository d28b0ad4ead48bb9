"""Installing a whole host kernel and rebooting into it, against a fake host whose reboot is
scripted on a fake clock: the happy path, a host that never goes down or never comes back, and a
host that comes back with its old kernel."""

from __future__ import annotations

import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.hostkvm.install import (
    BOOT_ID, HostInstallError, KernelArtifacts, RebootTimeout, WrongKernelBooted,
    bzimage_version, grub_entry, install_kernel, wait_for_reboot)
from harness.transport.remote_host import HostUnreachable, RemoteResult
from tests.fakes import FakeClock

RELEASE = "4.9.76+"
BUILD = "#3 SMP Tue Nov 24 15:00:00 UTC 2026"

GRUB_CFG = """\
### BEGIN /etc/grub.d/10_linux ###
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-abcd' {
	linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=abcd ro quiet
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-abcd' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-13-amd64-advanced-abcd' {
		linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=abcd ro quiet
	}
	menuentry 'Debian GNU/Linux, with Linux 4.9.76+ (recovery mode)' --class debian $menuentry_id_option 'gnulinux-4.9.76+-recovery-abcd' {
		linux	/boot/vmlinuz-4.9.76+ root=UUID=abcd ro single
	}
	menuentry 'Debian GNU/Linux, with Linux 4.9.76+' --class debian $menuentry_id_option 'gnulinux-4.9.76+-advanced-abcd' {
		linux	/boot/vmlinuz-4.9.76+ root=UUID=abcd ro quiet
		initrd	/boot/initrd.img-4.9.76+
	}
}
### END /etc/grub.d/10_linux ###
"""
ENTRY = "gnulinux-advanced-abcd>gnulinux-4.9.76+-advanced-abcd"


def fake_bzimage(path: Path, version: str) -> Path:
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x100)  # the string lives at 0x100 + 0x200
    encoded = version.encode() + b"\0"
    data[0x300:0x300 + len(encoded)] = encoded
    path.write_bytes(bytes(data))
    return path


@dataclass
class RebootingHost:
    """Answers as an up host until `reboot`; then, on the fake clock, keeps answering with the
    old boot id for `drop_after` s, is unreachable for `down_for` s, and comes back running
    `next_release`/`next_build` (None: never goes down / never comes back)."""

    clock: FakeClock
    drop_after: float | None = 5.0
    down_for: float | None = 60.0
    next_release: str = RELEASE
    next_build: str = BUILD
    grub_default: str = "GRUB_DEFAULT=saved"
    tar_listing: str = f"lib/modules/{RELEASE}/\n"
    fail_step: str | None = None  # a substring of the command that exits 1
    name: str = "h0"
    commands: list[str] = field(default_factory=list)
    closes: int = 0
    rebooted_at: float | None = None

    def close(self) -> None:
        self.closes += 1

    def _state(self) -> str:
        if self.rebooted_at is None:
            return "old"
        elapsed = self.clock.now - self.rebooted_at
        if self.drop_after is None or elapsed < self.drop_after:
            return "old"
        if self.down_for is None or elapsed < self.drop_after + self.down_for:
            return "down"
        return "new"

    def run(self, command, timeout_s=60.0, check=False, as_root=False) -> RemoteResult:
        text = command if isinstance(command, str) else shlex.join(command)
        state = self._state()
        if state == "down":
            raise HostUnreachable(f"host '{self.name}' (root@10.0.0.1:22): cannot connect: "
                                  "[Errno 111] Connection refused")
        self.commands.append(text)
        status, out = 0, ""
        if text == "uname -r":
            out = self.next_release if state == "new" else "6.1.0-13-amd64"
        elif text == "uname -v":
            out = self.next_build if state == "new" else "#1 SMP Debian"
        elif text == BOOT_ID:
            out = "new-boot" if state == "new" else "old-boot"
        elif text.startswith("tar -tf"):
            out = self.tar_listing
            status = 0 if out else 1
        elif "GRUB_DEFAULT" in text:
            out = self.grub_default
        elif text == "cat /boot/grub/grub.cfg":
            out = GRUB_CFG
        elif "reboot ||" in text:
            self.rebooted_at = self.clock.now
        if self.fail_step and self.fail_step in text:
            status = 1
        result = RemoteResult(self.name, text, status, out + "\n", "oops" if status else "")
        if check:
            result.check()
        return result


@pytest.fixture
def artifacts(tmp_path) -> KernelArtifacts:
    tarball = tmp_path / "modules.tar.gz"
    tarball.write_bytes(b"not really a tarball")
    return KernelArtifacts(
        fake_bzimage(tmp_path / "bzImage", f"{RELEASE} (gvm@build) {BUILD}"), tarball, RELEASE)


def install(host: RebootingHost, artifacts: KernelArtifacts, **overrides):
    sent: list = []
    values = dict(work_dir="/srv/gvm", upload=lambda h, local, remote, sha: sent.append(
        (local.name, remote)), drop_timeout_s=60.0, return_timeout_s=300.0, clock=host.clock,
        sleep=host.clock.sleep)
    return install_kernel(host, artifacts, **{**values, **overrides}), sent


def test_happy_path_uploads_installs_reboots_once_and_checks_the_build(artifacts) -> None:
    host = RebootingHost(FakeClock())
    result, sent = install(host, artifacts)
    assert [name for name, _ in sent] == ["bzImage", "modules.tar.gz"]
    assert all(remote.startswith("/srv/gvm/artifacts/") for _, remote in sent)
    commands = "\n".join(host.commands)
    for fragment in ("depmod -a 4.9.76+", "/boot/vmlinuz-4.9.76+.gvm-part",
                     "update-initramfs -c -k 4.9.76+", "update-grub",
                     f"grub-reboot '{ENTRY}'", "mv \"$tmp/lib/modules/4.9.76+\" "
                     "/lib/modules/4.9.76+"):
        assert fragment in commands
    order = [next(i for i, c in enumerate(host.commands) if key in c)
             for key in ("tar -tf", "depmod", "update-initramfs", "update-grub", "grub-reboot",
                         "reboot ||")]
    assert order == sorted(order)
    assert result.release == RELEASE and result.previous_release == "6.1.0-13-amd64"
    assert result.boot_entry == ENTRY and result.boot_mode == "once"
    assert result.down_after_s == pytest.approx(5.0) and 65.0 <= result.back_after_s <= 80.0
    assert host.commands[-2:] == ["uname -r", "uname -v"]
    assert host.closes >= 2, "the lost connection was not dropped before trying again"
    assert max(host.clock.sleeps) <= 30.0  # the backoff is capped


def test_boot_mode_default_uses_grub_set_default(artifacts) -> None:
    host = RebootingHost(FakeClock())
    install(host, artifacts, boot_mode="default", initramfs=False)
    assert f"grub-set-default '{ENTRY}'" in host.commands
    assert not any("update-initramfs" in command for command in host.commands)


def test_a_host_that_never_comes_back_times_out_with_what_to_do(artifacts) -> None:
    host = RebootingHost(FakeClock(), down_for=None)
    with pytest.raises(RebootTimeout) as caught:
        install(host, artifacts)
    message = str(caught.value)
    assert "did not answer over SSH within 300s" in message
    assert "Connection refused" in message and "power cycle boots its previous kernel" in message
    assert 300.0 <= host.clock.now <= 340.0


def test_a_host_that_never_goes_down_times_out(artifacts) -> None:
    host = RebootingHost(FakeClock(), drop_after=None)
    with pytest.raises(RebootTimeout, match=r"still answers with the same boot id 60s after "
                                            r"`reboot`: it did not reboot"):
        install(host, artifacts)


def test_a_reboot_faster_than_the_first_probe_is_seen_by_the_boot_id() -> None:
    clock = FakeClock()
    host = RebootingHost(clock, drop_after=0.0, down_for=0.0)
    host.rebooted_at = 0.0
    waited = wait_for_reboot(host, "old-boot", 10, 10, clock, clock.sleep)
    assert waited.down_after_s == 0.0 and clock.sleeps == []


def test_the_old_kernel_after_reboot_is_named_as_such(artifacts) -> None:
    host = RebootingHost(FakeClock(), next_release="6.1.0-13-amd64")
    with pytest.raises(WrongKernelBooted, match=r"runs kernel 6.1.0-13-amd64, not 4.9.76\+: it "
                                                r"booted its old kernel.*GRUB_DEFAULT=saved"):
        install(host, artifacts)


def test_the_same_release_from_another_build_is_refused(artifacts) -> None:
    host = RebootingHost(FakeClock(), next_build="#1 SMP Mon Jan 1 00:00:00 UTC 2018")
    with pytest.raises(WrongKernelBooted, match=r"runs release 4.9.76\+ but build '#1 SMP Mon"):
        install(host, artifacts)


def test_grub_default_not_saved_stops_before_the_reboot(artifacts) -> None:
    host = RebootingHost(FakeClock(), grub_default="GRUB_DEFAULT=0")
    with pytest.raises(HostInstallError, match=r"need GRUB_DEFAULT=saved.*'GRUB_DEFAULT=0'.*"
                                               r"nothing was rebooted"):
        install(host, artifacts)
    assert host.rebooted_at is None


def test_a_tarball_without_the_release_is_refused_before_installing(artifacts) -> None:
    host = RebootingHost(FakeClock(), tar_listing="")
    with pytest.raises(HostInstallError, match=r"no lib/modules/4.9.76\+/.*modules_install"):
        install(host, artifacts)
    assert not any("depmod" in command for command in host.commands)


def test_a_failing_step_names_it(artifacts) -> None:
    host = RebootingHost(FakeClock(), fail_step="depmod")
    with pytest.raises(HostInstallError, match=r"unpacking the modules into /lib/modules/4.9.76\+"
                                               r" failed \(exit status 1: oops\)\. Nothing was "
                                               r"rebooted"):
        install(host, artifacts)


def test_a_bzimage_of_another_release_is_refused(tmp_path, artifacts) -> None:
    other = KernelArtifacts(fake_bzimage(tmp_path / "other", f"4.9.77 (a@b) {BUILD}"),
                            artifacts.modules_tarball, RELEASE)
    with pytest.raises(HostInstallError, match=r"is release 4.9.77, not 4.9.76\+"):
        install(RebootingHost(FakeClock()), other)


def test_bzimage_version_and_release_names(tmp_path) -> None:
    version = bzimage_version(fake_bzimage(tmp_path / "b", f"{RELEASE} (gvm@build) {BUILD}"))
    assert version is not None
    assert (version.release, version.built_by, version.version) == (RELEASE, "gvm@build", BUILD)
    (tmp_path / "x").write_bytes(b"\0" * 0x400)
    assert bzimage_version(tmp_path / "x") is None
    with pytest.raises(HostInstallError, match="not a kernel release"):
        KernelArtifacts(tmp_path / "b", tmp_path / "x", "4.9 76")


def test_grub_entry_skips_recovery_and_other_kernels() -> None:
    assert grub_entry(GRUB_CFG, RELEASE) == ENTRY
    assert grub_entry(GRUB_CFG, "6.1.0-13-amd64") == "gnulinux-simple-abcd"
    assert grub_entry(GRUB_CFG, "4.9.7") is None
    top_level = "menuentry 'X' $menuentry_id_option 'x-id' {\n\tlinux /vmlinuz-4.9.76+ ro\n}\n"
    assert grub_entry(top_level, RELEASE) == "x-id"
