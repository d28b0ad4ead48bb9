"""The CLI with the guest on a remote host: `run`, then `up`/`status`/`probe`/`down`, against an
OpenSSH server in a network namespace (see netns_hosts.py). Nothing is left running afterwards."""

from pathlib import Path
from typing import Iterator

import pytest
import yaml

from harness.cli import main
from tests.configs import shipped_config
from tests.e2e.netns_hosts import NetnsHost, NetnsLab, lab_or_skip

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    with lab_or_skip(tmp_path_factory.mktemp("netns"), count=1) as lab:
        yield lab


def qemu_in(host: NetnsHost, lab: NetnsLab) -> list[int]:
    return [pid for pid in lab.pids(host)
            if Path(f"/proc/{pid}/comm").exists()
            and Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")]


@pytest.fixture
def remote_config(tmp_path: Path, lab: NetnsLab, guest_kernel) -> list[str]:
    host = lab.hosts[0]
    data = shipped_config(tmp_path / "runs")
    data["probe"]["rounds"] = 5
    data["hosts"] = [{"name": host.name, "address": host.address, "user": "root",
                      "key_file": str(lab.client_key), "known_hosts": str(lab.known_hosts),
                      "work_dir": str(host.work_dir)}]
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(data))
    return ["--config", str(path)]


def test_run_on_a_remote_host(remote_config, lab, capsys) -> None:
    assert main(remote_config + ["run"]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: PASS" in out
    assert qemu_in(lab.hosts[0], lab) == []


def test_up_status_probe_down_on_a_remote_host(remote_config, lab, capsys) -> None:
    assert main(remote_config + ["up"]) == 0
    try:
        assert len(qemu_in(lab.hosts[0], lab)) == 1
        assert main(remote_config + ["status"]) == 0
        assert f"guest running on {lab.hosts[0].name}" in capsys.readouterr().out
        assert main(remote_config + ["probe"]) == 0
        assert "VERDICT: PASS" in capsys.readouterr().out
    finally:
        assert main(remote_config + ["down"]) == 0
    assert qemu_in(lab.hosts[0], lab) == []
