"""The guest workloads' shell commands, run for real in this machine's busybox sh."""

import subprocess
import time
from pathlib import Path

from harness.stages.workloads import HOG_PIDS, start_commands, stop_commands


def test_cpu_hogs_start_on_every_vcpu_and_stop_by_pid() -> None:
    (start,) = start_commands(("cpu-hog",), vcpus=2, seconds=30)
    assert "taskset -c $c" in start and "seq 0 1" in start
    subprocess.run(["/bin/busybox", "sh", "-c", start], check=True, timeout=10)
    pids = open(HOG_PIDS).read().split()
    try:
        assert len(pids) == 2
        time.sleep(0.2)
        assert all(running(pid) for pid in pids)
    finally:
        (stop,) = stop_commands(("cpu-hog",))
        subprocess.run(["/bin/busybox", "sh", "-c", stop], check=True, timeout=10)
    time.sleep(0.5)
    assert not any(running(pid) for pid in pids)


def running(pid: str) -> bool:
    """Alive and not a zombie (killed orphans wait for init to reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_page_writer_is_switched_by_its_proc_file() -> None:
    assert start_commands(("page-writer",), 4, 10) == ["echo '1000' > /proc/gvm_jiffies_page_writer"]
    assert stop_commands(("page-writer",)) == ["echo '0' > /proc/gvm_jiffies_page_writer"]
    assert start_commands((), 4, 10) == [] and stop_commands(()) == []
