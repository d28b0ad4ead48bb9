"""The guest workloads' shell commands, run for real in this machine's busybox sh."""

import subprocess
import time
from pathlib import Path

import pytest

from harness.config import WORKLOADS
from harness.stages.workloads import (
    HOG_PIDS,
    SLEEPER_PIDS,
    TICK_MOVER_FILE,
    TickMoverState,
    report,
    start_commands,
    stop_commands,
)
from harness.transport.exec import CommandResult


def busybox(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/busybox", "sh", "-c", command], check=False,
                          capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("name, pids", [("cpu-hog", HOG_PIDS), ("nanosleep", SLEEPER_PIDS)])
def test_pinned_loops_start_on_every_vcpu_and_stop_by_pid(name, pids) -> None:
    (start,) = start_commands((name,), vcpus=2, seconds=30)
    assert "taskset -c $c" in start and "seq 0 1" in start
    assert busybox(start).returncode == 0
    started = Path(pids).read_text().split()
    try:
        assert len(started) == 2
        time.sleep(0.2)
        assert all(running(pid) for pid in started)
    finally:
        (stop,) = stop_commands((name,))
        assert busybox(stop).returncode == 0
    time.sleep(0.5)
    assert not any(running(pid) for pid in started)


def test_the_nanosleep_loop_sleeps_instead_of_spinning() -> None:
    (start,) = start_commands(("nanosleep",), vcpus=1, seconds=30)
    assert busybox(start).returncode == 0
    (pid,) = Path(SLEEPER_PIDS).read_text().split()
    try:
        time.sleep(1.0)
        utime, stime = (int(field) for field in
                        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        assert utime + stime < 50, "the sleeping shell itself used half of the second"
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "SR"
    finally:
        busybox(stop_commands(("nanosleep",))[0])


def running(pid: str) -> bool:
    """Alive and not a zombie (killed orphans wait for init to reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_page_writer_and_the_tick_mover_are_switched_by_their_proc_files() -> None:
    writer, mover = start_commands(("page-writer", "tick-mover"), 4, 10)
    assert writer.endswith("echo '1000' > /proc/gvm_jiffies_page_writer")
    assert mover.endswith(f"echo '20000 10' > {TICK_MOVER_FILE}")  # ends by itself after 10 s
    assert stop_commands(("page-writer", "tick-mover")) == [
        "echo '0' > /proc/gvm_jiffies_page_writer", f"echo '0' > {TICK_MOVER_FILE}"]
    assert start_commands((), 4, 10) == [] and stop_commands(()) == []


def test_a_guest_kernel_without_the_series_file_is_named_in_the_error() -> None:
    (mover,) = start_commands(("tick-mover",), 4, 10)
    result = busybox(mover)
    assert result.returncode == 1
    assert f"the guest kernel has no {TICK_MOVER_FILE}: tick-mover needs" in result.stderr


class FakeGuest:
    """The guest's proc files as the series prints them."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        path = command.removeprefix("cat ")
        return CommandResult(self.files.get(path, ""), 0 if path in self.files else 1)


def test_the_verdict_names_each_workload_with_what_it_did() -> None:
    guest = FakeGuest({TICK_MOVER_FILE: "period_us=20000 moves=997 timekeeper=2\n",
                       "/proc/gvm_jiffies_page_writer": "period_us=1000 cpu=-1 writes=18220\n"})
    assert report(("cpu-hog", "tick-mover", "page-writer", "nanosleep"), guest) == (
        "cpu-hog", "tick-mover (997 handovers)", "page-writer (18220 writes)", "nanosleep")
    assert report(("tick-mover",), FakeGuest({})) == ("tick-mover (? handovers)",)


def test_the_verdict_names_the_vcpus_that_kept_the_tick_a_period() -> None:
    mover = ("period_us=20000 moves=250 timekeeper=1 took=0:63,1:63,2:62,3:62 "
             "kept=0:0,1:40,2:61,3:5\n")
    assert report(("tick-mover",), FakeGuest({TICK_MOVER_FILE: mover})) == (
        "tick-mover (250 handovers, kept a period by vCPUs 1,2,3)",)
    state = TickMoverState.parse(mover)
    assert state == TickMoverState(250, {0: 63, 1: 63, 2: 62, 3: 62}, {0: 0, 1: 40, 2: 61, 3: 5})
    idle = "period_us=20000 moves=8 timekeeper=-1 took=0:2,1:2 kept=0:0,1:0\n"
    assert report(("tick-mover",), FakeGuest({TICK_MOVER_FILE: idle})) == (
        "tick-mover (8 handovers, kept a period by vCPUs none)",)
    assert TickMoverState.parse("period_us=20000 moves=997 timekeeper=2\n") is None


def test_every_workload_the_config_accepts_has_commands() -> None:
    for name in WORKLOADS:
        assert start_commands((name,), 2, 5) and stop_commands((name,)), name
