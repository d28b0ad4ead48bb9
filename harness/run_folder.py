"""One folder per run holding everything it produced; `latest` points at the newest."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
