"""Process groups as the tests see them from outside: is any member still running, wait for the
group to be gone, and clean up after a test that failed half way."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def group_alive(group: int) -> bool:
    """Does any process of `group` still run (zombies do not count)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def wait_until_gone(group: int, timeout_s: float = 30.0) -> bool:
    """Whether the group was gone before the deadline (a bound for a hang, not a speed target)."""
    deadline = time.monotonic() + timeout_s
    while group_alive(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
