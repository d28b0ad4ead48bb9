"""A shipped config as YAML data that still holds when a test writes it somewhere else: its guest
series and config fragments become absolute paths and its runs go where the test says."""

from pathlib import Path

import yaml

from harness.config import DEFAULT_CONFIG


def shipped_config(run_dir: Path, name: str = DEFAULT_CONFIG.name) -> dict:
    path = DEFAULT_CONFIG.parent / name
    data = yaml.safe_load(path.read_text())
    kernel = data["guest"]["kernel"]
    kernel["patches"] = str((path.parent / kernel["patches"]).resolve())
    kernel["config"]["fragments"] = [str((path.parent / fragment).resolve())
                                     for fragment in kernel["config"]["fragments"]]
    data["run_dir"] = str(run_dir)
    return data
