"""Stopping a detached local process group: TERM first, KILL for one that ignores it, no zombie;
and a group this harness started goes with it when the harness is killed (SIGKILL too)."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import REPO_ROOT
from harness.transport.local_process import stop_process_group
from tests.processes import group_alive


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


# A harness in miniature, run as its own process so the test can SIGKILL it: it starts a process
# group through LocalProcess (or a build through run_logged under a held lock) and waits.
HARNESS = """
import fcntl, sys
from pathlib import Path
from harness.progress import Progress
from harness.transport.local_process import LocalProcess, inherited_by_builds, run_logged
log, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "build":
    with open(sys.argv[3], "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with inherited_by_builds(lock.fileno()):
            run_logged(["sh", "-c", sys.argv[4]], log, Progress())
process = LocalProcess.start(["sh", "-c", "sleep 300 & sleep 300 & wait"], log)
if mode == "untether":
    process.untether()
print(process.pid, flush=True)
sys.stdin.read()
"""


def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def harness(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HARNESS, str(tmp_path / "log"), *args],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_a_started_group_dies_with_a_harness_killed_by_sigkill(tmp_path: Path) -> None:
    process = harness(tmp_path, "tethered")
    group = int(process.stdout.readline())
    assert group_alive(group)
    process.kill()
    process.wait()
    wait_until(lambda: not group_alive(group), f"process group {group} outlived its harness")


def test_an_untethered_group_outlives_its_harness(tmp_path: Path) -> None:
    process = harness(tmp_path, "untether")
    group = int(process.stdout.readline())
    process.kill()
    process.wait()
    try:
        time.sleep(1.0)  # a tethered group is signalled at once (the test above)
        assert group_alive(group)
    finally:
        os.killpg(group, signal.SIGKILL)


def test_a_killed_harness_build_holds_the_lock_until_its_last_process_is_gone(
        tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    build = "trap '' TERM; echo building; while :; do sleep 1; done"  # outlives TERM: KILLed
    process = harness(tmp_path, "build", str(lock), build)
    wait_until(lambda: "building" in (tmp_path / "log").read_text()
               if (tmp_path / "log").is_file() else False, "the build did not start")
    process.kill()
    process.wait()
    with lock.open("a+") as handle:
        with pytest.raises(BlockingIOError):  # the build still runs, and still holds it
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        wait_until(lambda: take(handle), "the build's lock was never freed")  # tether KILLs it


def take(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
