"""Stopping a detached local process group: TERM first, KILL for one that ignores it, no zombie."""

import subprocess
import time

from harness.transport.local_process import stop_process_group


def start(script: str) -> subprocess.Popen:
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.2)  # let the shell install its trap
    return process


def test_a_group_that_honours_term_ends_at_once() -> None:
    process = start("sleep 30 & wait")
    started = time.monotonic()
    stop_process_group(process.pid, lambda: process.poll() is not None, process)
    assert process.poll() == -15 and time.monotonic() - started < 3


def test_a_group_that_ignores_term_is_killed_and_reaped() -> None:
    process = start("trap '' TERM; while :; do sleep 1; done")
    stop_process_group(process.pid, lambda: process.poll() is not None, process)
    assert process.returncode == -9


def test_a_group_already_gone_is_left_alone() -> None:
    process = start("exit 3")
    process.wait()
    stop_process_group(process.pid, lambda: process.poll() is not None, process)
    assert process.returncode == 3
