"""The GiantVM stages against real OpenSSH servers on two network-namespace hosts, as far as a
machine without VT-x goes: the hosts are logged into, checked and refused for what they really
lack (the patched kvm, GiantVM's QEMU, the uploaded guest), each with its fix, and nothing is left
running or connected. Past that line (a GiantVM QEMU starting) only the fake-host unit tests run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from harness.backends.base import BootSpec, StartSpec
from harness.backends.giantvm.backend import GiantVMBackend, launcher_for
from harness.backends.giantvm.cluster import ClusterError, ClusterPreflightError, GiantVMCluster
from harness.backends.registry import parse_config
from harness.config import ClusterConfig
from harness.backends.giantvm.config import node_hosts
from harness.hosts import HostsUnreachable, close_hosts, connect_hosts
from harness.progress import Progress
from harness.run_folder import RunFolder
from tests.configs import shipped_config
from tests.e2e.netns_hosts import NetnsLab, lab_or_skip

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    with lab_or_skip(tmp_path_factory.mktemp("netns"), count=2) as lab:
        yield lab


@pytest.fixture
def config(lab: NetnsLab, tmp_path: Path) -> ClusterConfig:
    data = shipped_config(tmp_path / "runs", "giantvm-2node.yaml")
    work_dir = tmp_path / "work"  # the namespaces share this file system
    data["hosts"] = [{"name": host.name, "address": host.address, "user": "root",
                      "key_file": str(lab.client_key), "known_hosts": str(lab.known_hosts),
                      "work_dir": str(work_dir)} for host in lab.hosts]
    data["giantvm"]["nodes"] = [{"host": host.name, "ip": host.address} for host in lab.hosts]
    data["giantvm"]["ssh_port"] = 21022
    return parse_config(tmp_path / "giantvm.yaml", data)


def boot_spec(config: ClusterConfig, tmp_path: Path) -> BootSpec:
    (tmp_path / "bzImage").write_bytes(b"not a kernel")
    (tmp_path / "initramfs.cpio").write_bytes(b"not an initramfs")
    return BootSpec(tmp_path / "bzImage", tmp_path / "initramfs.cpio", config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)


def test_a_host_without_the_patched_kvm_is_refused_before_anything_starts(
        config, lab, tmp_path) -> None:
    run = RunFolder.create(config.run_root, config.name)
    with pytest.raises(ClusterError) as refused:
        GiantVMBackend().start(StartSpec(config, boot_spec(config, tmp_path), run, Progress()))
    message = str(refused.value)
    for host in lab.hosts:
        assert f"host '{host.name}' runs a kvm without ATOMIC_INC" in message
    assert "harness deploy" in message
    assert not (tmp_path / "work" / "artifacts").exists()  # nothing was uploaded
    left = {pid: Path(f"/proc/{pid}/comm").read_text().strip()
            for host in lab.hosts for pid in lab.pids(host) if Path(f"/proc/{pid}/comm").exists()}
    assert set(left.values()) <= {"sshd"}, f"left running in the namespaces: {left}"


def test_preflight_on_real_hosts_names_each_missing_piece(config, lab, tmp_path) -> None:
    boot = boot_spec(config, tmp_path)
    hosts = connect_hosts(node_hosts(config))
    try:
        cluster = GiantVMCluster(launcher_for(config, boot, "e2e"), hosts,
                                 local_dir=tmp_path / "local", run_id="e2e")
        with pytest.raises(ClusterPreflightError) as refused:
            cluster.preflight()
    finally:
        close_hosts(hosts.values())
    message = str(refused.value)
    for host in lab.hosts:
        assert (f"host '{host.name}': the GiantVM QEMU {config.vm.qemu_binary} is missing"
                in message)
        assert f"host '{host.name}': the guest's {tmp_path / 'bzImage'}" not in message
    assert "does not have node" not in message  # every node sits on the host with its address
    assert not any(host.connected for host in hosts.values())


def test_an_unreachable_node_host_fails_the_connect_and_closes_the_others(config, lab,
                                                                          tmp_path) -> None:
    unreachable = replace(config.hosts[1], address=lab.unused_address)
    broken = replace(config, hosts=(config.hosts[0], unreachable))
    with pytest.raises(HostsUnreachable, match=rf"connect: 1 of 2 hosts ok(.|\n)*"
                                           rf"{lab.hosts[1].name} .*FAILED"):
        connect_hosts(node_hosts(broken))
