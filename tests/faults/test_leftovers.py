"""What a run leaves behind, through the CLI: secrets only the user can read, and guests that
`up` left running found and stopped even when newer runs came after them (findings 5 and 6 of
issue 14). Two real guests from the cached kernel."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from harness.guest_session import SESSION_FILE
from tests.faults.gvm_process import gvm, real_guest_config
from tests.processes import group_alive, kill_group

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def secrets_of(run: Path) -> list[Path]:
    """The files of a run that hold the guest's keys or root password (public keys are not)."""
    return [run / "initramfs.cpio", run / SESSION_FILE, run / "keys",
            *sorted(path for path in (run / "keys").iterdir() if path.suffix != ".pub")]


def test_every_guest_up_left_is_listed_and_stopped_and_its_secrets_are_private(
        tmp_path, guest_kernel) -> None:
    config = real_guest_config(tmp_path)
    runs = []
    try:
        for _ in range(2):  # the second run hides the first from `latest`
            status, output = gvm(config, "up")
            assert status == 0, output
            run = (tmp_path / "runs" / "latest").resolve()
            runs.append((run, int((run / "qemu.pid").read_text())))
        for run, _ in runs:
            for secret in secrets_of(run):
                mode = stat.S_IMODE(secret.stat().st_mode)
                assert mode & 0o077 == 0, f"{secret} is {oct(mode)}"
        status, output = gvm(config, "status")
        assert status == 0, output
        for run, qemu in runs:
            assert f"{run}: guest running on localhost (pid {qemu})" in output, output
        status, output = gvm(config, "down", "--all")
        assert status == 0, output
        for run, qemu in runs:
            assert f"stopped the guest of {run}" in output
            assert not group_alive(qemu), f"the guest of {run} still runs"
        assert "guest running" not in gvm(config, "status")[1]
    finally:
        for _, qemu in runs:
            kill_group(qemu)
