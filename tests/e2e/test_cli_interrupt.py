"""Ctrl-C during a real `harness run` stops the guest's QEMU, leaves a junit.xml that says so and
exits 130."""

import os
import xml.etree.ElementTree as ElementTree
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.config import DEFAULT_CONFIG
from tests.configs import shipped_config

pytestmark = pytest.mark.e2e
REPO = DEFAULT_CONFIG.parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_the_probe_stops_qemu(tmp_path: Path, guest_kernel, stop_signal) -> None:
    data = shipped_config(tmp_path / "runs")
    data["probe"]["rounds"] = 10000
    config = tmp_path / "interrupt.yaml"
    config.write_text(yaml.safe_dump(data))
    process = subprocess.Popen([sys.executable, "-m", "harness", "--config", str(config), "run"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = tmp_path / "runs" / "latest" / "qemu.pid"
    deadline = time.monotonic() + 600
    while not (pid_file.is_file() and pid_file.read_text().strip()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.2)
    qemu_pid = int(pid_file.read_text())
    time.sleep(8)  # inside the probe rounds by now
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "interrupted" in output
    assert not alive(qemu_pid), f"QEMU {qemu_pid} survived the interrupt"
    suite = ElementTree.parse(tmp_path / "runs" / "latest" / "junit.xml").getroot()
    assert suite.get("errors") == "1" and suite.find("testcase").get("name") == "interrupted"
    assert "INTERRUPTED" in (tmp_path / "runs" / "latest" / "summary.md").read_text()
