"""CLI exit codes: 0 done/pass, 1 a verdict or shipped model failed, 2 a harness error with a message."""

import shutil
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import DEFAULT_CONFIG


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["run_dir"] = str(tmp_path / "runs")
    data["guest"]["kernel"]["patches"] = str(DEFAULT_CONFIG.parent / data["guest"]["kernel"]["patches"])
    data["guest"]["kernel"]["config"]["fragments"] = [
        str(DEFAULT_CONFIG.parent / f) for f in data["guest"]["kernel"]["config"]["fragments"]]
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_config_exits_2_with_the_reason(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("vm: {vcpus: zero}\nguest: {kernel: {source: x}}\n")
    assert main(["--config", str(tmp_path / "bad.yaml"), "status"]) == 2
    assert "vm.vcpus: expected a whole number" in capsys.readouterr().err


def test_probe_without_a_run_exits_2(config_file: Path, capsys) -> None:
    assert main(["--config", str(config_file), "probe"]) == 2
    assert "start one with `up`" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("spin") is None, reason="spin is not installed (./gvm setup)")
def test_model_check_passes_for_a_shipped_variant(config_file: Path, capsys) -> None:
    assert main(["--config", str(config_file), "model-check", "--nodes", "2",
                 "--variant", "shipped_local_first"]) == 0
    out = capsys.readouterr().out
    assert "shipped_local_first" in out and "FAIL" not in out
    assert (config_file.parent / "runs" / "latest" / "model-check.txt").is_file()
