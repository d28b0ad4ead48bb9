"""One folder per run holding everything it produced; `latest` points at the newest."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, KernelUnderTestError

OUTCOME_FILE = "outcome.txt"


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def create(cls, root: Path, config_name: str) -> "RunFolder":
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
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
    def all_with(cls, root: Path, name: str) -> "list[RunFolder]":
        """Every run that holds `name`, newest first."""
        if not root.is_dir():
            return []
        runs = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()),
                      key=lambda p: p.name, reverse=True)
        return [cls(p) for p in runs if (p / name).is_file()]

    @classmethod
    def newest_with(cls, root: Path, name: str) -> "RunFolder | None":
        """The newest run that holds `name`: `latest` may be a build-only or model-check run."""
        return next(iter(cls.all_with(root, name)), None)

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
