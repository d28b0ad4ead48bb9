"""Every workload of probe.workloads at once, through the ordinary CLI: the shipped series passes
and the verdict names each workload with what it did."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import WORKLOADS
from harness.run_folder import RunFolder
from tests.configs import shipped_config

pytestmark = pytest.mark.e2e


def test_a_run_with_every_workload_passes_and_names_what_each_did(tmp_path: Path) -> None:
    data = shipped_config(tmp_path / "runs")
    data["probe"].update(rounds=5, duration_s=20, transports=["ssh"], workloads=list(WORKLOADS))
    config = tmp_path / "workloads.yaml"
    config.write_text(yaml.safe_dump(data))
    status = main(["--config", str(config), "run"])
    run = RunFolder.newest_with(tmp_path / "runs", "verdict.json")
    assert run is not None, f"no verdict (exit {status})"
    verdict = json.loads(run.file("verdict.json").read_text())
    assert status == 0 and verdict["passed"], [c for c in verdict["checks"] if not c["passed"]]
    named = verdict["context"]["workloads"]
    assert [name.split(" ")[0] for name in named] == list(WORKLOADS)
    handovers = re.fullmatch(r"tick-mover \((\d+) handovers, kept a period by vCPUs ([\d,]+)\)",
                             named[2])
    writes = re.fullmatch(r"page-writer \((\d+) writes\)", named[1])
    assert handovers and int(handovers.group(1)) > 100, named
    # cpu-hog keeps every vCPU busy, so each did the tick for a whole period after its turn
    assert handovers.group(2) == ",".join(str(v) for v in range(data["vm"]["vcpus"])), named
    assert writes and int(writes.group(1)) > 1000, named
    assert "tick-mover (" in run.file("verdict.txt").read_text()
