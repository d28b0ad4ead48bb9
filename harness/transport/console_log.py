"""Logs that grow (a console QEMU writes, a tail copied from a host, QEMU's own output): read one
whole whatever state it is in, cut its last lines for a message, wait until a line shows up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

POLL_S = 0.1
TAIL_LINES = 10


class MarkerTimeout(Exception):
    """The marker did not appear in time; `tail` holds the log's last lines."""

    def __init__(self, marker: str, timeout_s: float, tail: list[str]):
        super().__init__(f"no '{marker}' within {timeout_s:.0f}s; last lines: {tail}")
        self.tail = tail


def read_log(path: Path) -> str:
    """The log's text so far; empty before the file exists."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def log_tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log, for error messages."""
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(kept) if kept else "(the log is empty)"


def wait_for_marker(log: Path, marker: str, timeout_s: float, check: Callable[[], None],
                    waiting: Callable[[float], None] = lambda started: None) -> float:
    """Seconds until `marker` is in `log`. `check` runs between looks and raises when the
    producer died (fail fast, not at the deadline); `waiting` gets the start time, for progress."""
    started = time.monotonic()
    while marker not in read_log(log):
        check()
        if time.monotonic() - started > timeout_s:
            raise MarkerTimeout(marker, timeout_s, read_log(log).splitlines()[-5:])
        waiting(started)
        time.sleep(POLL_S)
    return time.monotonic() - started
