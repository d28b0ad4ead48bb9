"""Progress for long steps: one line per step, and a live status line while a step runs.

On a terminal the status line is redrawn in place, cut to the terminal's width, and its timer
ticks by itself (a step waiting on a silent command still shows it is alive). Elsewhere (CI,
pipes) step lines carry the wall-clock time and a status line is printed at most every
`quiet_interval_s` seconds, so logs stay short but a silent hang is still visible.

Verbosity (`gvm -q` / `gvm -v`): quiet shows only results, errors and failed steps (an indented
line is a step's detail and is hidden); verbose prints every status text as its own line.
"""

from __future__ import annotations

import enum
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

TICK_S = 1.0
REDRAW_S = 0.2


class Verbosity(enum.IntEnum):
    QUIET = -1
    NORMAL = 0
    VERBOSE = 1


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


@dataclass
class _Status:
    text: str
    started: float


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet_interval_s: float = 30.0,
                 verbosity: Verbosity = Verbosity.NORMAL,
                 width: Callable[[], int] = lambda: shutil.get_terminal_size((80, 24)).columns,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], str] = lambda: time.strftime("%H:%M:%S")):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.quiet_interval_s = quiet_interval_s
        self.verbosity = verbosity
        self._width = width
        self._clock = clock
        self._wall_clock = wall_clock
        self._last_status = 0.0
        self._status_shown = False
        self._current: _Status | None = None
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None

    def say(self, message: str) -> None:
        if self.verbosity is Verbosity.QUIET and message.startswith(" "):
            return
        with self._lock:
            self._clear_status()
            print(message, file=self.stream, flush=True)
            self._draw()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self._step_line(f"==> {title}")
        started = self._clock()
        outer, self._current = self._current, _Status(title, started)
        self._start_ticker()
        try:
            yield
        except BaseException:
            self._current = outer
            self._step_line(f"    {title}: failed after "
                            f"{format_duration(self._clock() - started)}", always=True)
            raise
        self._current = outer
        self._step_line(f"    {title}: done in {format_duration(self._clock() - started)}")

    def status(self, text: str, started: float) -> None:
        """Show what a running command is doing now; cheap enough to call for every output line."""
        if self.verbosity is Verbosity.QUIET:
            return
        now = self._clock()
        with self._lock:
            self._current = _Status(text, started)
            if self.verbosity is Verbosity.VERBOSE:
                self.say(self._stamped(self.status_line(now)))
            elif self.live:
                if now - self._last_status >= REDRAW_S:
                    self._draw()
            elif now - self._last_status >= self.quiet_interval_s:
                print(self._stamped(self.status_line(now))[:200], file=self.stream, flush=True)
                self._last_status = now

    def status_line(self, now: float) -> str:
        """The status as drawn: the elapsed time, then the text, cut to the terminal's width (one
        column spare: a full line wraps on some terminals and leaves a stale line behind)."""
        current = self._current
        if current is None:
            return ""
        line = f"    [{format_duration(now - current.started)}] {current.text}"
        return line[:max(self._width() - 1, 20)]

    def _step_line(self, line: str, always: bool = False) -> None:
        if self.verbosity is Verbosity.QUIET and not always:
            return
        with self._lock:
            self._clear_status()
            print(self._stamped(line), file=self.stream, flush=True)

    def _stamped(self, line: str) -> str:
        """Off a terminal, a line says when it was printed: CI logs show where time went."""
        return line if self.live else f"[{self._wall_clock()}] {line}"

    def _draw(self) -> None:
        if not self.live or self._current is None or self.verbosity is not Verbosity.NORMAL:
            return
        now = self._clock()
        self.stream.write("\r\x1b[K" + self.status_line(now))
        self.stream.flush()
        self._status_shown = True
        self._last_status = now

    def _start_ticker(self) -> None:
        """On a terminal, redraw the status every second while a step runs."""
        if not self.live or self._ticker is not None or self.verbosity is not Verbosity.NORMAL:
            return
        self._ticker = threading.Thread(target=self._tick, name="progress-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(TICK_S)
            with self._lock:
                self._draw()

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False
