"""CLI exit codes: 0 done/pass, 1 a verdict or shipped model failed, 2 a harness error with a message."""

import shutil
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import DEFAULT_CONFIG
from tests.configs import shipped_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    data = shipped_config(tmp_path / "runs")
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


def test_plan_prints_each_nodes_line_and_ports_without_running_anything(capsys) -> None:
    assert main(["--config", str(DEFAULT_CONFIG.parent / "giantvm-2node.yaml"), "plan"]) == 0
    out = capsys.readouterr().out
    node0, node1 = out.split("# node 1 on node1\n")
    for line, start in ((node0, 0), (node1, 2)):
        assert f"-local-cpu '2,start={start},iplist=10.10.1.1 10.10.1.2'" in line
        assert "-machine q35,kernel-irqchip=off -smp 4 -m 1024" in line
        assert "--enable-kvm -cpu host" in line and "-shm-path" not in line
    assert "-serial" in node0 and "e1000" in node0
    assert "-serial" not in node1.split("# TCP")[0] and "-netdev" not in node1
    assert "#   node1 10.10.1.2:37711 node 1 DSM (host kernel)" in out
    assert "#   node1 10.10.1.2:40001 node 1 I/O router (QEMU)" in out


def test_deploy_with_a_stock_qemu_config_exits_2(config_file: Path, capsys) -> None:
    assert main(["--config", str(config_file), "deploy"]) == 2
    assert "does not use the GiantVM launcher" in capsys.readouterr().err


def test_a_bochs_guest_without_a_qemu_tree_exits_2_before_building(tmp_path: Path,
                                                                    capsys) -> None:
    data = shipped_config(tmp_path / "runs")
    data["bochs_host"] = {"kernel": str(tmp_path / "bzImage-dsm")}
    path = tmp_path / "bochs.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["--config", str(path), "bochs-host", "--guest"]) == 2
    assert "bochs_host.qemu_tree is not set" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
