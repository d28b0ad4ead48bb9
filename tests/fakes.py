"""Fakes shared by unit tests that stand in for a boundary (a port forward, the clock)."""

from dataclasses import dataclass


@dataclass
class FakeForward:
    target: object
    local_port: int
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class FakeClock:
    """`clock()` reads it; `clock.sleep(s)` advances it instantly and records the sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
