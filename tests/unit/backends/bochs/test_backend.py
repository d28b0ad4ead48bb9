from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from harness.backends.bochs.backend import (NESTED_BOOT_S, BochsBackend, guest_config,
                                            required_qemu_tree)
from harness.backends.registry import parse_config
from harness.config import DEFAULT_CONFIG
from harness.errors import HarnessError
from harness.transport.remote_host import RemoteHostSpec


def config_with_bochs(**bochs: str):
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["bochs_host"] = {"kernel": "bzImage-dsm", **bochs}
    return parse_config(DEFAULT_CONFIG.parent / "bochs.yaml", data)


def test_the_bochs_machine_becomes_the_one_kvm_host_judged_over_ssh(tmp_path: Path) -> None:
    config = config_with_bochs(qemu_tree="gvm-qemu")
    spec = RemoteHostSpec("bochs", "127.0.0.1", port=40122, key_file=tmp_path / "client_key",
                          known_hosts=tmp_path / "known_hosts", work_dir="/tmp/gvm-harness")
    judged = BochsBackend().judged_config(config)
    nested = guest_config(judged, SimpleNamespace(remote=SimpleNamespace(spec=spec)),
                          "/tmp/gvm-harness/artifacts/qemu-x/x86_64-softmmu/qemu-system-x86_64")
    (host,) = nested.hosts
    assert (host.address, host.port, host.key_file, host.known_hosts, host.is_local) == \
        ("127.0.0.1", 40122, tmp_path / "client_key", tmp_path / "known_hosts", False)
    assert (nested.vm.accel, nested.vm.qemu_binary) == (
        "kvm", "/tmp/gvm-harness/artifacts/qemu-x/x86_64-softmmu/qemu-system-x86_64")
    assert nested.vm.vcpus == config.vm.vcpus and nested.guest == config.guest
    assert nested.probe.transports == ("ssh",)
    assert not nested.checks.rate_vs_host_clock and config.checks.rate_vs_host_clock
    assert nested.timeouts.boot_s == NESTED_BOOT_S


def test_no_qemu_tree_is_said_before_anything_runs(tmp_path: Path) -> None:
    assert required_qemu_tree(config_with_bochs(qemu_tree="/opt/gvm-qemu")) == \
        Path("/opt/gvm-qemu")
    with pytest.raises(HarnessError, match=r"bochs_host.qemu_tree is not set; point it at a QEMU"):
        required_qemu_tree(config_with_bochs())


def test_no_config_asks_for_bochs_by_itself_and_nothing_reattaches(tmp_path: Path) -> None:
    backend = BochsBackend()
    assert not backend.wants(config_with_bochs(qemu_tree="gvm-qemu"))
    with pytest.raises(HarnessError, match="ended with the command that started it"):
        backend.attach(config_with_bochs(), SimpleNamespace(path=tmp_path), {}, forwards=False)
