"""The judge against kernels that are broken on purpose, through the ordinary CLI: each gives
FAIL and exit 1 naming the check that should catch it, and a junit.xml; the shipped series passes
in the same test run (tests/e2e/test_jiffies_suite.py and the CLI tests)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.run_folder import RunFolder
from tests.configs import shipped_config

pytestmark = pytest.mark.e2e
FAULTY = Path(__file__).resolve().parents[1] / "faulty_series"


def run_with(tmp_path: Path, **changes) -> tuple[int, dict, Path]:
    data = shipped_config(tmp_path / "runs")
    data["probe"].update(rounds=5, duration_s=30, transports=["ssh"])
    for key, value in changes.items():
        section, _, name = key.partition("__")
        target = data["guest"]["kernel"] if section == "kernel" else data[section]
        target[name] = value
    config = tmp_path / "faulty.yaml"
    config.write_text(yaml.safe_dump(data))
    status = main(["--config", str(config), "run"])
    run = RunFolder.newest_with(tmp_path / "runs", "verdict.json")
    assert run is not None, "no verdict was written"
    return status, json.loads(run.file("verdict.json").read_text()), run.path


def failed(verdict: dict) -> set[tuple[str, str]]:
    return {(check["transport"], check["name"]) for check in verdict["checks"]
            if not check["passed"]}


@pytest.fixture(scope="module", autouse=True)
def shipped_series_afterwards(cluster_config):
    """The cache's tree goes back to the shipped series for whatever runs next."""
    yield
    assert main(["--config", str(cluster_config.path), "patch"]) == 0


def test_a_kernel_that_drops_a_tick_now_and_then_fails_the_tick_count(tmp_path) -> None:
    status, verdict, _ = run_with(tmp_path, kernel__patches=str(FAULTY / "drop-tick"))
    assert status == 1
    assert ("ssh-stream", "ticks counted") in failed(verdict), verdict["checks"]
    detail = next(c["detail"] for c in verdict["checks"] if c["name"] == "ticks counted"
                  and c["transport"] == "ssh-stream")
    assert "lost" in detail


def test_a_vcpu_that_reads_an_old_copy_fails_stale_reads_and_is_named(tmp_path) -> None:
    status, verdict, _ = run_with(tmp_path, kernel__patches=str(FAULTY / "held-back-cpu"))
    assert status == 1
    assert ("ssh-stream", "stale reads") in failed(verdict), verdict["checks"]
    detail = next(c["detail"] for c in verdict["checks"] if c["name"] == "stale reads"
                  and c["transport"] == "ssh-stream")
    assert "vCPU 1" in detail


def test_a_kernel_that_panics_at_boot_is_a_fail_with_its_panic_line_and_a_junit(tmp_path) -> None:
    status, verdict, run = run_with(
        tmp_path, guest__cmdline="console=ttyS0 panic=-1 rdinit=/nothing init=/nothing")
    assert status == 1
    (check,) = verdict["checks"]
    assert check["name"] == "guest kernel" and "Kernel panic - not syncing" in check["detail"]
    suite = ElementTree.parse(run / "junit.xml").getroot()
    assert suite.get("failures") == "1"
