"""The progress line: cut to the terminal, a timer that ticks by itself, timestamps off a
terminal, and what -q and -v show."""

import io
import time

import pytest

from harness.progress import TICK_S, Progress, Verbosity


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_status_line_is_cut_to_the_terminal_width() -> None:
    terminal, clock = Terminal(), Clock()
    progress = Progress(terminal, width=lambda: 40, clock=clock)
    with progress.step("build"):
        clock.now += 1
        progress.status("CC " + "x" * 200, 100.0)
    drawn = [part for part in terminal.getvalue().split("\r\x1b[K") if part.startswith("    [")]
    assert drawn and all(len(line) <= 39 for line in drawn)
    assert drawn[0].startswith("    [1.0s] CC xxx")


def test_the_timer_ticks_while_a_step_is_silent() -> None:
    terminal = Terminal()
    progress = Progress(terminal, width=lambda: 80)
    with progress.step("wait for the guest"):
        deadline = time.monotonic() + 5 * TICK_S
        while "[1." not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "    [1." in terminal.getvalue() and "] wait for the guest" in terminal.getvalue()
    assert "    wait for the guest: done in " in terminal.getvalue()


def test_off_a_terminal_step_lines_carry_the_time() -> None:
    log = io.StringIO()
    progress = Progress(log, wall_clock=lambda: "12:34:56")
    with progress.step("configure"):
        progress.say("    detail")
    assert log.getvalue().splitlines() == ["[12:34:56] ==> configure", "    detail",
                                           "[12:34:56]     configure: done in 0.0s"]


def test_quiet_shows_results_errors_and_failed_steps_only() -> None:
    log = io.StringIO()
    progress = Progress(log, verbosity=Verbosity.QUIET, wall_clock=lambda: "t")
    with pytest.raises(RuntimeError), progress.step("build"):
        progress.say("    a detail")
        progress.status("CC kernel/time.o", 0.0)
        progress.say("VERDICT: PASS")
        raise RuntimeError
    assert log.getvalue().splitlines() == ["VERDICT: PASS", "[t]     build: failed after 0.0s"]


def test_verbose_prints_every_status_text() -> None:
    log, clock = io.StringIO(), Clock()
    progress = Progress(log, verbosity=Verbosity.VERBOSE, clock=clock, wall_clock=lambda: "t")
    for name in ("CC a.o", "CC b.o", "LD vmlinux"):
        progress.status(name, 100.0)
    assert [line.split("] ", 2)[-1] for line in log.getvalue().splitlines()] == \
        ["CC a.o", "CC b.o", "LD vmlinux"]
