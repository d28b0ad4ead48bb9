"""What the emulated backend derives from the YAML: which hosts it boots, their private
addresses, the config the GiantVM backend gets once they run, and what session.json keeps."""

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

from harness.backends.emulated.backend import (EmulatedBackend, EmulatedHostRecord,
                                               EmulatedRecord, emulated_names, hosts_as_booted,
                                               private_ip)
from harness.backends.base import BootSpec, StartSpec
from harness.backends.emulated.config import EmulatedHostsConfig
from harness.backends.registry import backend_for, load_config
from harness.config import DEFAULT_CONFIG
from harness.errors import ConfigError, HarnessError, SetupError
from harness.progress import Progress
from harness.run_folder import RunFolder
from tests.configs import shipped_config

EXAMPLE = DEFAULT_CONFIG.parent / "giantvm-emulated-2node.yaml"


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("GVM_EMULATED_HOST_KERNEL", str(tmp_path / "bzImage"))
    monkeypatch.setenv("GVM_GIANTVM_QEMU", str(tmp_path / "qemu"))
    return load_config(EXAMPLE)


def test_the_example_runs_on_the_emulated_backend(config, tmp_path) -> None:
    assert backend_for(config).kind == "emulated"
    assert config.section(EmulatedHostsConfig).kernel == tmp_path / "bzImage"
    assert emulated_names(config) == ["emu0", "emu1"]
    assert [private_ip(config, name) for name in ("emu0", "emu1")] == ["10.9.9.1", "10.9.9.2"]
    judged = EmulatedBackend().judged_config(config)
    assert judged.probe.transports == ("ssh",) and judged.timeouts.boot_s >= 900


def test_an_unset_tree_variable_is_named_when_the_hosts_are_booted(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("GVM_EMULATED_HOST_KERNEL", raising=False)
    monkeypatch.setenv("GVM_GIANTVM_QEMU", "/q")
    config = load_config(EXAMPLE)  # plan, status and down still work
    spec = StartSpec(config, BootSpec(tmp_path / "k", tmp_path / "i", "", 2, 256),
                     RunFolder(tmp_path), Progress())
    with pytest.raises(HarnessError, match=r"emulated_hosts.kernel names "
                                           r"\$GVM_EMULATED_HOST_KERNEL, which is not set"):
        EmulatedBackend().start(spec)
    assert list(tmp_path.iterdir()) == []  # nothing booted, nothing written


def test_an_emulated_address_needs_the_section(tmp_path) -> None:
    data = shipped_config(tmp_path / "runs", EXAMPLE.name)
    del data["emulated_hosts"]
    path = tmp_path / "no-section.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="address 'emulated' needs the emulated_hosts section"):
        load_config(path)


def test_nodes_on_a_real_host_are_refused(config) -> None:
    real = replace(config.hosts[1], address="10.0.0.2")
    with pytest.raises(HarnessError, match="nodes run on emu1, which are not emulated hosts"):
        emulated_names(replace(config, hosts=(config.hosts[0], real)))


def test_once_booted_the_hosts_are_ssh_endpoints_and_the_record_round_trips(config) -> None:
    record = EmulatedRecord((EmulatedHostRecord("emu0", 11, 40022, "/r/c0", "/r/q0"),
                             EmulatedHostRecord("emu1", 12, 40023, "/r/c1", "/r/q1")),
                            "/r/hosts/keys/client_key", "/r/hosts/keys/known_hosts",
                            "/tmp/gvm-harness/artifacts/qemu-x/x86_64-softmmu/qemu-system-x86_64",
                            {"run_id": "r"}, "the hosts' emulator ... lacks the fix")
    booted = hosts_as_booted(config, record)
    assert [(h.address, h.port, h.work_dir) for h in booted.hosts] == [
        ("127.0.0.1", 40022, "/tmp/gvm-harness"), ("127.0.0.1", 40023, "/tmp/gvm-harness")]
    assert booted.hosts[0].key_file == Path("/r/hosts/keys/client_key")
    assert booted.vm.qemu_binary == record.qemu_binary
    assert backend_for(booted).kind == "emulated"  # the section stays: attach finds it again
    assert EmulatedRecord.from_dict(asdict(record)) == record


def test_the_emulator_is_debians_qemu_unless_the_yaml_names_a_build(config, tmp_path) -> None:
    assert config.section(EmulatedHostsConfig).emulator == "qemu-system-x86_64"
    data = shipped_config(tmp_path / "runs", EXAMPLE.name)
    data["emulated_hosts"]["emulator"] = "emulator-qemu/bin/qemu-system-x86_64"
    path = tmp_path / "built.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).section(EmulatedHostsConfig).emulator == \
        str(tmp_path / "emulator-qemu/bin/qemu-system-x86_64")


def test_a_missing_emulator_stops_the_start_before_anything_boots(config, tmp_path) -> None:
    for name in ("bzImage", "qemu"):
        (tmp_path / name).touch()
    emulated = replace(config.section(EmulatedHostsConfig), emulator=str(tmp_path / "no-qemu"))
    run = tmp_path / "run"
    run.mkdir()
    spec = StartSpec(config.with_section(emulated),
                     BootSpec(tmp_path / "k", tmp_path / "i", "", 2, 256), RunFolder(run),
                     Progress())
    with pytest.raises(SetupError, match="emulator .*no-qemu is not installed"):
        EmulatedBackend().start(spec)
    assert list(run.iterdir()) == []
