"""Which QEMU emulates the hosts, and whether a run must warn that a guest double fault may be
the emulator's: read from a real `--version` of small stand-in programs."""

from pathlib import Path

import pytest

from harness.backends.emulated.emulator import FIX_TAG, probe_emulator
from harness.errors import SetupError


def program(tmp_path: Path, body: str) -> str:
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_debians_qemu_has_no_fix_and_the_warning_says_what_to_build(tmp_path) -> None:
    emulator = probe_emulator(program(tmp_path, "echo 'QEMU emulator version 7.2.22 "
                                                "(Debian 1:7.2+dfsg-7+deb12u18+b3)'; "
                                                "echo 'Copyright (c) 2003-2022'"))
    assert emulator.version == "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    assert not emulator.has_injection_fix
    warning = emulator.warning()
    assert warning is not None
    assert "double fault" in warning and "host_patches/emulator-qemu/build" in warning
    assert "emulated_hosts.emulator" in warning


def test_the_built_qemu_has_the_fix_and_needs_no_warning(tmp_path) -> None:
    emulator = probe_emulator(program(tmp_path, f"echo 'QEMU emulator version 7.2.22 ({FIX_TAG})'"))
    assert emulator.has_injection_fix and emulator.warning() is None


def test_a_missing_or_broken_emulator_is_a_setup_error(tmp_path) -> None:
    with pytest.raises(SetupError, match=r"emulator /nowhere/qemu is not installed; run ./gvm setup"):
        probe_emulator("/nowhere/qemu")
    with pytest.raises(SetupError, match=r"--version' failed \(exit 3\): no such machine"):
        probe_emulator(program(tmp_path, "echo 'no such machine' >&2; exit 3"))
