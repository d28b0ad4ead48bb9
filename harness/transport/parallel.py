"""One action on every host at once, and what each host made of it: the cluster's commands
(connect, upload, install, start, scan) report every host's outcome, not just the first failure."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, Sequence, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")


class NamedHost(Protocol):
    @property
    def name(self) -> str: ...


H = TypeVar("H", bound=NamedHost)


@dataclass(frozen=True)
class HostOutcome(Generic[T]):
    host: str
    seconds: float
    value: T | None = None
    error: HarnessError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ParallelResult(Generic[T]):
    what: str
    outcomes: tuple[HostOutcome[T], ...]

    @property
    def failed(self) -> list[HostOutcome[T]]:
        return [outcome for outcome in self.outcomes if not outcome.ok]

    def summary(self) -> str:
        lines = [f"{self.what}: {len(self.outcomes) - len(self.failed)} of "
                 f"{len(self.outcomes)} hosts ok"]
        for outcome in self.outcomes:
            state = "ok" if outcome.ok else f"FAILED: {outcome.error}"
            lines.append(f"  {outcome.host} ({outcome.seconds:.1f}s): {state}")
        return "\n".join(lines)


def on_hosts(hosts: Sequence[H], what: str, action: Callable[[H], T]) -> ParallelResult[T]:
    """Run `action` on every host at once; HarnessErrors become per-host failures.

    Any other exception is a bug and is raised (after every host finished) with its traceback.
    """
    def timed(host: H) -> HostOutcome[T]:
        started = time.monotonic()
        try:
            value = action(host)
            return HostOutcome(host.name, time.monotonic() - started, value=value)
        except HarnessError as error:
            return HostOutcome(host.name, time.monotonic() - started, error=error)

    with ThreadPoolExecutor(max_workers=max(1, len(hosts)),
                            thread_name_prefix="on-hosts") as pool:
        futures = [pool.submit(timed, host) for host in hosts]
    return ParallelResult(what, tuple(future.result() for future in futures))
