"""CLI exit codes: 0 done/pass, 1 a verdict or shipped model failed, 2 a harness error with a message."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import DEFAULT_CONFIG, REPO_ROOT
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


def _orphan(runs: Path, name: str) -> "subprocess.Popen":
    """A run whose 'QEMU' (a sleep in its own session) outlived a killed harness."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    run = runs / name
    run.mkdir(parents=True)
    (run / "session.json").write_text(json.dumps({
        "kind": "local-qemu", "vcpus": 4, "vcpus_per_node": 2, "hz": 250,
        "access": {"root_password": "x", "client_key": "k", "host_key_type": "t",
                   "host_key_base64": "b"},
        "state": {"pid": process.pid, "accelerator": "tcg", "host": "localhost",
                  "kernel_console_log": str(run / "console-kernel.log"),
                  "shell_socket": str(run / "console-shell.sock"), "ssh_port": 1}}))
    return process


def test_status_lists_every_run_and_down_all_stops_every_orphan(config_file: Path, tmp_path,
                                                                 capsys) -> None:
    runs = tmp_path / "runs"
    older, newer = _orphan(runs, "20261129-100000-a"), _orphan(runs, "20261129-110000-b")
    (runs / "20261129-120000-other").mkdir()
    (runs / "20261129-120000-other" / "session.json").write_text('{"kind": "vmware"}')
    try:
        assert main(["--config", str(config_file), "status"]) == 0
        out = capsys.readouterr().out
        assert f"20261129-100000-a: guest running on localhost (pid {older.pid})" in out
        assert f"20261129-110000-b: guest running on localhost (pid {newer.pid})" in out
        assert "20261129-120000-other: unknown (" in out  # named, not a failed status
        assert main(["--config", str(config_file), "down", "--all"]) == 0
        assert older.wait(timeout=10) is not None and newer.wait(timeout=10) is not None
        assert main(["--config", str(config_file), "status"]) == 0
        assert capsys.readouterr().out.count("guest stopped") == 2
    finally:
        for process in (older, newer):
            process.kill()
            process.wait()


def test_help_version_and_config_after_the_command(config_file: Path, capsys) -> None:
    assert main([]) == 2
    assert "exit codes:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("gvm ")
    assert main(["status", "--config", str(config_file)]) == 0
    assert "no guest started yet" in capsys.readouterr().out


def test_quiet_and_verbose_work_before_and_after_the_command(config_file: Path, capsys) -> None:
    assert main(["-q", "--config", str(config_file), "patch"]) == 0
    assert "==> apply" not in capsys.readouterr().err
    assert main(["--config", str(config_file), "patch", "-v"]) == 0
    assert "==> apply" in capsys.readouterr().err


def test_status_json_names_the_tree_the_series_and_every_guest(config_file: Path,
                                                               tmp_path: Path, capsys) -> None:
    orphan = _orphan(tmp_path / "runs", "20261129-100000-a")
    try:
        assert main(["--config", str(config_file), "status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
    finally:
        orphan.kill()
        orphan.wait()
    assert status["series"].endswith("linux-6.1") and status["linux"].startswith("6.1")
    assert status["guests"] == [{"run": str(tmp_path / "runs" / "20261129-100000-a"),
                                 "state": "running", "where": "localhost", "pid": orphan.pid,
                                 "problem": None}]


def _broken_tree_config(tmp_path: Path) -> Path:
    data = shipped_config(tmp_path / "runs")
    (tmp_path / "not-a-kernel").mkdir()
    data["guest"]["kernel"]["source"] = str(tmp_path / "not-a-kernel")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_run_that_stops_before_its_verdict_still_leaves_junit_and_reports(tmp_path: Path,
                                                                           capsys) -> None:
    assert main(["--config", str(_broken_tree_config(tmp_path)), "run"]) == 2
    run = tmp_path / "runs" / "latest"
    suite = ElementTree.parse(run / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    assert suite.get("hostname") and suite.get("timestamp") and suite.get("time")
    error = suite.find("testcase/error")
    assert error is not None and "not-a-kernel" in error.text
    assert "ERROR" in (run / "summary.md").read_text()
    assert "not-a-kernel" in (run / "report.html").read_text()


def test_an_interrupted_run_leaves_an_interrupted_junit(config_file: Path, monkeypatch,
                                                        tmp_path: Path) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("harness.suite.run_suite", interrupted)
    assert main(["--config", str(config_file), "run"]) == 130
    suite = ElementTree.parse(tmp_path / "runs" / "latest" / "junit.xml").getroot()
    assert suite.find("testcase").get("name") == "interrupted"


def test_gc_keeps_the_newest_latest_and_running_guests(config_file: Path, tmp_path: Path,
                                                       capsys) -> None:
    runs = tmp_path / "runs"
    for name in ("20250101-000000-a", "20250102-000000-b", "20250103-000000-c"):
        (runs / name).mkdir(parents=True)
        (runs / name / "initramfs.cpio").write_bytes(b"x" * 4096)
        for path in (runs / name / "initramfs.cpio", runs / name):
            os.utime(path, (1735689600, 1735689600))  # written in January 2025
    (runs / "20250102-120000-building").mkdir()  # written just now: another run's, in use
    orphan = _orphan(runs, "20240101-000000-running")
    (runs / "latest").symlink_to("20250101-000000-a")
    try:
        assert main(["--config", str(config_file), "gc", "--keep", "1", "--dry-run"]) == 0
        assert len(list(runs.iterdir())) == 6
        assert main(["--config", str(config_file), "gc", "--keep", "1"]) == 0
    finally:
        orphan.kill()
        orphan.wait()
    assert sorted(p.name for p in runs.iterdir()) == [
        "20240101-000000-running", "20250101-000000-a", "20250102-120000-building",
        "20250103-000000-c", "latest"]
    assert "deleted " + str(runs / "20250102-000000-b") in capsys.readouterr().err


def test_tab_completion_through_argcomplete_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete", reason="argcomplete is optional: pip install -e "
                                              "'.[completion]'")
    completions = tmp_path / "completions"
    subprocess.run([sys.executable, "-m", "harness"], check=False, cwd=REPO_ROOT, timeout=60,
                   capture_output=True,
                   env={**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": "gvm gc --",
                        "COMP_POINT": "9", "_ARGCOMPLETE_IFS": " ",
                        "_ARGCOMPLETE_STDOUT_FILENAME": str(completions)})
    offered = completions.read_text().split()
    assert {"--keep", "--older-than", "--dry-run", "--config", "--quiet"} <= set(offered)


def test_without_a_default_config_the_error_says_to_pass_one(monkeypatch, capsys,
                                                              tmp_path: Path) -> None:
    monkeypatch.setattr("harness.cli.DEFAULT_CONFIG", tmp_path / "vm_configs" / "local.yaml")
    assert main(["status"]) == 2
    assert "no --config given, and this installation has no default config" in \
        capsys.readouterr().err
