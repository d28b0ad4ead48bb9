"""The Bochs machine's configuration and boot CD, without running Bochs."""

import subprocess
from pathlib import Path

import pytest

from harness.backends.bochs.machine import (BochsLauncher, BochsMachine, CPU_MODEL, ISOLINUX_BIN, bochsrc,
                                  build_iso, isolinux_cfg)


def settings(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if line)


def test_bochsrc_boots_the_cd_with_vmx_and_logs_com1_into_the_run_folder(tmp_path) -> None:
    config = settings(bochsrc(BochsMachine(memory_mb=2048, cpus=2, ips=80_000_000),
                              tmp_path / "boot.iso", tmp_path))
    assert config["cpu"].startswith(f"model={CPU_MODEL}, count=1:2:1, ips=80000000")
    assert config["memory"] == "guest=2048, host=2048"
    assert config["ata0-master"] == f"type=cdrom, path={tmp_path / 'boot.iso'}, status=inserted"
    assert config["boot"] == "cdrom"
    assert config["com1"] == f"enabled=1, mode=file, dev={tmp_path / 'bochs-serial.log'}"
    assert config["display_library"] == 'rfb, options="timeout=0"'  # never waits for a viewer
    assert config["panic"] == "action=fatal"


def test_isolinux_boots_straight_into_the_kernel_with_its_cmdline() -> None:
    cfg = isolinux_cfg("console=ttyS0 kvm-intel.nested=0")
    assert "TIMEOUT 0" in cfg and "PROMPT 0" in cfg
    assert "  APPEND console=ttyS0 kvm-intel.nested=0" in cfg.splitlines()


def test_the_launch_line_runs_bochs_quietly_past_its_debugger(tmp_path) -> None:
    launcher = BochsLauncher(Path("/k"), Path("/i"), "", tmp_path)
    assert launcher.command_lines() == [["bochs", "-q", "-f", str(tmp_path / "bochsrc"),
                                         "-rc", str(tmp_path / "bochs-continue")]]


@pytest.mark.skipif(not ISOLINUX_BIN.is_file(), reason="isolinux is not installed (./gvm setup)")
def test_the_cd_holds_kernel_initrd_and_an_el_torito_boot_record(tmp_path) -> None:
    (tmp_path / "bzImage").write_bytes(b"kernel" * 100)
    (tmp_path / "initramfs.cpio").write_bytes(b"cpio" * 100)
    iso = build_iso(tmp_path / "bzImage", tmp_path / "initramfs.cpio", "console=ttyS0",
                    tmp_path / "boot.iso")
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-ls", "/"], capture_output=True,
                             text=True, check=True).stdout
    for name in ("BZIMAGE", "INITRD", "ISOLINUX.BIN", "ISOLINUX.CFG", "LDLINUX.C32"):
        assert name.lower() in listing.lower()
    report = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"],
                            capture_output=True, text=True, check=True).stdout
    assert "El Torito boot img" in report and "none" in report  # no-emulation boot


def test_several_cpus_boot_without_the_hpet() -> None:
    one = BochsLauncher(Path("/k"), Path("/i"), "console=ttyS0", Path("/r"))
    two = BochsLauncher(Path("/k"), Path("/i"), "console=ttyS0", Path("/r"), BochsMachine(cpus=2))
    assert one.kernel_cmdline == "console=ttyS0"
    assert two.kernel_cmdline == "console=ttyS0 nohpet"
