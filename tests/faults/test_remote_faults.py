"""Remote hosts, through the CLI, against OpenSSH servers in network namespaces (the e2e suites'
netns_hosts.py): a host whose key changed is refused before anything is built, with the exact
`ssh-keygen -R` line; a guest on a remote host keeps its initramfs (the guest's keys) private
there and takes it away when it stops (findings 6 and 7 of issue 14, and the early preflight)."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configs import shipped_config
from tests.e2e.netns_hosts import NetnsLab, lab_or_skip
from tests.faults.gvm_process import gvm, kernel_tree, snapshot, tree_config, write_config

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    with lab_or_skip(tmp_path_factory.mktemp("netns"), count=1) as lab:
        yield lab


def host_entry(lab: NetnsLab, known_hosts: Path) -> dict:
    host = lab.hosts[0]
    return {"name": host.name, "address": host.address, "user": "root",
            "key_file": str(lab.client_key), "known_hosts": str(known_hosts),
            "work_dir": str(host.work_dir)}


def test_a_host_whose_key_changed_is_refused_before_the_build_with_the_line_to_fix_it(
        tmp_path, lab) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    address = lab.hosts[0].address
    known_hosts = tmp_path / "known_hosts"  # pins a key the host does not have
    known_hosts.write_text(f"{address} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    tree = kernel_tree(tmp_path / "linux")
    pristine = snapshot(tree)
    config = tree_config(tmp_path, tree, None, hosts=[host_entry(lab, known_hosts)])
    status, output = gvm(config, "run")
    assert status == 2, output
    assert f"ssh-keygen -R '{address}' -f {known_hosts}" in output, output
    assert "nothing was built or started" in output and "Traceback" not in output
    assert snapshot(tree) == pristine
    assert not list((tmp_path / "runs").glob("*/build.log"))


@pytest.mark.e2e
def test_a_remote_guests_initramfs_is_private_there_and_gone_after_down(tmp_path, lab,
                                                                       guest_kernel) -> None:
    data = shipped_config(tmp_path / "runs")
    data["hosts"] = [host_entry(lab, lab.known_hosts)]
    config = write_config(tmp_path / "remote.yaml", data)
    artifacts = lab.hosts[0].work_dir / "artifacts"
    status, output = gvm(config, "up")
    try:
        assert status == 0, output
        (initramfs,) = artifacts.glob("*/initramfs.cpio")  # the host's files are local ones
        assert stat.S_IMODE(initramfs.stat().st_mode) == 0o600
    finally:
        status, output = gvm(config, "down")
    assert status == 0, output
    assert not list(artifacts.glob("*/initramfs.cpio")), "the guest's keys stayed on the host"
    assert list(artifacts.glob("*/bzImage")), "the kernel is kept for the next run"
    assert "guest running" not in gvm(config, "status")[1]
