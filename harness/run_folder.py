"""One folder per run holding everything it produced; `latest` points at the newest."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError, KernelUnderTestError

STAMP_FORMAT = "%Y%m%d-%H%M%S"
OUTCOME_FILE = "outcome.txt"
IN_USE_S = 600  # `gvm gc` leaves a run folder alone that was written to this recently


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def create(cls, root: Path, config_name: str) -> "RunFolder":
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime(STAMP_FORMAT)
        path = root / f"{stamp}-{config_name}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = root / f"{stamp}-{config_name}-{suffix}"
        path.mkdir()
        latest = root / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(path.name)
        return cls(path)

    @classmethod
    def all(cls, root: Path) -> "list[RunFolder]":
        """Every run folder under `root`, newest first (`latest` is a link, not a run)."""
        if not root.is_dir():
            return []
        runs = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()),
                      key=lambda p: p.name, reverse=True)
        return [cls(p) for p in runs]

    @classmethod
    def all_with(cls, root: Path, name: str) -> "list[RunFolder]":
        """Every run that holds `name`, newest first."""
        return [run for run in cls.all(root) if run.file(name).is_file()]

    @classmethod
    def newest_with(cls, root: Path, name: str) -> "RunFolder | None":
        """The newest run that holds `name`: `latest` may be a build-only or model-check run."""
        return next(iter(cls.all_with(root, name)), None)

    def started_at(self) -> float | None:
        """When the run began (epoch seconds), from the stamp `create` put in its name; None for
        a folder not named by `create`."""
        try:
            return time.mktime(time.strptime(self.path.name[:15], STAMP_FORMAT))
        except ValueError:
            return None

    def age_s(self, now: float) -> float:
        started = self.started_at()
        return now - (started if started is not None else self.path.stat().st_mtime)

    def last_written(self) -> float:
        """The newest modification time of the folder or anything in it (epoch seconds)."""
        return max([self.path.stat().st_mtime] +
                   [p.stat().st_mtime for p in self.path.rglob("*") if not p.is_symlink()])

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*")
                   if p.is_file() and not p.is_symlink())

    def remove(self) -> None:
        shutil.rmtree(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        target = self.file(name)
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return target

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    @contextmanager
    def noting_failure(self) -> Iterator[None]:
        """A command that is interrupted or fails says so in its run folder (outcome.txt) as
        well as on the terminal, so the folder alone tells what happened to the run."""
        try:
            yield
        except KeyboardInterrupt:
            self.file(OUTCOME_FILE).write_text(
                f"interrupted (Ctrl-C or SIGTERM) at {time.strftime('%H:%M:%S')}: every QEMU "
                "this command started was stopped\n")
            raise
        except HarnessError as error:
            blame = "FAIL" if isinstance(error, KernelUnderTestError) else "error"
            self.file(OUTCOME_FILE).write_text(f"{blame}: {error}\n")
            raise


def runs_to_prune(runs: list[RunFolder], keep_newest: int, older_than_s: float | None,
                  now: float, keep: Callable[[RunFolder], bool]) -> list[RunFolder]:
    """The retention rule of `gvm gc`: of `runs` (newest first), everything after the newest
    `keep_newest` that is older than `older_than_s` (when given), that nothing wrote to in the
    last IN_USE_S (another harness may be building into it) and that `keep` does not hold on
    to (a guest that still runs, `latest`)."""
    return [run for run in runs[max(keep_newest, 0):]
            if not keep(run) and (older_than_s is None or run.age_s(now) >= older_than_s)
            and now - run.last_written() >= IN_USE_S]
