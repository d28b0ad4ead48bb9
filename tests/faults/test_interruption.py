"""Interruption, through the CLI in a process of its own: Ctrl-C, SIGTERM and SIGKILL while the
guest boots, SIGKILL while make builds, and QEMU killed under a running probe. Afterwards no
process the harness started runs, the exit code says whose fault it was, and the run folder says
what happened (findings 3 and 4 of issue 14, and what held up: every phase stops everything).
The real-QEMU tests reuse the cached kernel (the `guest_kernel` fixture builds it once)."""

from __future__ import annotations

import fcntl
import signal
from pathlib import Path

import pytest

from harness.run_folder import OUTCOME_FILE
from tests.faults.gvm_process import Gvm, kernel_tree, real_guest_config, tree_config
from tests.processes import group_alive, kill_group, wait_until_gone

pytestmark = pytest.mark.faults


def started_qemu(harness: Gvm, runs: Path) -> int:
    """QEMU's pid (its own process group) once the harness has started it."""
    pid_file = runs / "latest" / "qemu.pid"
    harness.wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip() != "",
                     "QEMU started")
    return int(pid_file.read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_while_the_guest_boots_stops_qemu_and_is_noted(tmp_path, guest_kernel,
                                                                   stop_signal) -> None:
    harness = Gvm.start(real_guest_config(tmp_path), "run")
    qemu = started_qemu(harness, tmp_path / "runs")
    harness.process.send_signal(stop_signal)
    status, output = harness.finish()
    try:
        assert status == 130, output
        assert "interrupted: every QEMU this command started has been stopped" in output
        assert not group_alive(qemu), f"QEMU {qemu} survived {stop_signal.name}"
        outcome = (tmp_path / "runs" / "latest" / OUTCOME_FILE).read_text()
        assert outcome.startswith("interrupted (Ctrl-C or SIGTERM)")
    finally:
        kill_group(qemu)


@pytest.mark.e2e
def test_a_harness_killed_with_sigkill_while_the_guest_boots_takes_qemu_with_it(
        tmp_path, guest_kernel) -> None:
    harness = Gvm.start(real_guest_config(tmp_path), "run")
    qemu = started_qemu(harness, tmp_path / "runs")
    harness.process.kill()
    harness.finish()
    try:
        assert wait_until_gone(qemu), f"QEMU {qemu} outlived the SIGKILLed harness"
    finally:
        kill_group(qemu)


@pytest.mark.e2e
def test_qemu_killed_under_the_probe_is_named_and_is_not_a_verdict(tmp_path,
                                                                   guest_kernel) -> None:
    harness = Gvm.start(real_guest_config(tmp_path, rounds=100000, duration_s=0,
                                          transports=["ssh"]), "run")
    qemu = started_qemu(harness, tmp_path / "runs")
    try:
        harness.wait_for_text("probe jiffies over ssh")
        kill_group(qemu)  # the host's side failing, not the kernel under test
        status, output = harness.finish()
        assert status == 2, output
        assert "QEMU exited with -9" in output and "Traceback" not in output, output
        assert (tmp_path / "runs" / "latest" / OUTCOME_FILE).read_text() \
            .startswith("error: QEMU exited with -9")
    finally:
        kill_group(qemu)


def test_a_harness_killed_with_sigkill_while_make_runs_leaves_no_make_and_the_lock_held_until_then(
        tmp_path) -> None:
    """make runs in a session of its own; a compiler that ignores SIGTERM stands in for one that
    takes a while to stop. Without the tether it would run on; without the inherited lock a
    waiting run would start building under it."""
    build = "echo $$$$ > $(CURDIR)/make-job.pid; trap '' TERM; while :; do sleep 1; done"
    tree = kernel_tree(tmp_path / "linux", recipe=build)
    harness = Gvm.start(tree_config(tmp_path, tree, None), "build")
    job_pid = tree / "make-job.pid"
    harness.wait_for(lambda: job_pid.is_file() and job_pid.read_text().strip() != "",
                     "make started")
    group = int(Path(f"/proc/{int(job_pid.read_text())}/stat").read_text()
                .rsplit(")", 1)[1].split()[2])
    harness.process.kill()
    harness.finish()
    try:
        with (tmp_path / "cache" / "lock").open("a+") as lock:
            with pytest.raises(BlockingIOError):  # make's job runs on for now, and holds it
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert wait_until_gone(group), f"make's group {group} outlived the harness"
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free with the last of them
    finally:
        kill_group(group)
