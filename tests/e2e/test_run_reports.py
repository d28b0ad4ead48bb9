"""A run whose guest kernel fails to build still leaves junit.xml, report.html and summary.md
(exit 2): CI gets a report for every exit, with the build's reason as an error test case."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from tests.configs import shipped_config

pytestmark = pytest.mark.e2e


def test_a_run_that_fails_to_build_leaves_its_reports(tmp_path: Path, capsys) -> None:
    data = shipped_config(tmp_path / "runs")
    impossible = tmp_path / "impossible.config"
    impossible.write_text("CONFIG_GVM_HARNESS_NO_SUCH_OPTION=y\n")
    kernel_config = data["guest"]["kernel"]["config"]
    # allnoconfig: a build directory of its own, so the shared tinyconfig build stays warm
    kernel_config.update(base="allnoconfig",
                         fragments=kernel_config["fragments"] + [str(impossible)])
    config = tmp_path / "unbuildable.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["--config", str(config), "run"]) == 2
    assert "CONFIG_GVM_HARNESS_NO_SUCH_OPTION=y (got n)" in capsys.readouterr().err
    run = tmp_path / "runs" / "latest"
    suite = ElementTree.parse(run / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    case = suite.find("testcase")
    assert case.get("name") == "BuildError"
    assert "CONFIG_GVM_HARNESS_NO_SUCH_OPTION" in case.find("error").text
    assert (run / "summary.md").read_text().startswith("## gvm-harness ")
    assert "ERROR" in (run / "report.html").read_text()
    assert (run / "build.log").is_file()
