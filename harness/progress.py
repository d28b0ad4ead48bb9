"""Progress for long steps: one line per step, and a live status line while a command runs.

On a terminal the status line is redrawn in place; elsewhere (CI, pipes) a plain line is printed at
most every `quiet_interval_s` seconds, so logs stay short but a silent hang is still visible.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet_interval_s: float = 30.0):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.quiet_interval_s = quiet_interval_s
        self._last_status = 0.0
        self._status_shown = False

    def say(self, message: str) -> None:
        self._clear_status()
        print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.say(f"==> {title}")
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.say(f"    {title}: failed after {format_duration(time.monotonic() - started)}")
            raise
        self.say(f"    {title}: done in {format_duration(time.monotonic() - started)}")

    def status(self, text: str, started: float) -> None:
        """Show what a running command is doing now; cheap enough to call for every output line."""
        now = time.monotonic()
        line = f"    [{format_duration(now - started)}] {text}"
        if self.live:
            if now - self._last_status >= 0.2:
                self.stream.write("\r\x1b[K" + line[:150])
                self.stream.flush()
                self._status_shown = True
                self._last_status = now
        elif now - self._last_status >= self.quiet_interval_s:
            print(line[:200], file=self.stream, flush=True)
            self._last_status = now

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False
