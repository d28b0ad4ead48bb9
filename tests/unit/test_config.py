"""Config validation: the shipped configs load, and each kind of mistake names file, key and fix."""

from pathlib import Path

import pytest
import yaml

from harness import config as cluster_config
from harness.backends.registry import load_config, parse_config
from harness.config import DEFAULT_CONFIG
from harness.errors import ConfigError


def base() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def parse(data: dict, path: Path = DEFAULT_CONFIG):
    return parse_config(path, data)


def test_embedded_default_loads() -> None:
    config = load_config()
    assert config.vm.launcher == "qemu" and config.vm.vcpus == 4 and config.vm.nodes == 2
    assert config.vm.vcpus_per_node == 2 and config.vm.node_of_vcpu(3) == 1
    assert config.guest.kernel.source == "debian:linux-source-6.1"
    assert all(fragment.is_file() for fragment in config.guest.kernel.fragments)
    assert config.hosts[0].is_local


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["vm"].update(vcpus="four"), r"local.yaml: vm.vcpus: expected a whole number"),
    (lambda d: d["vm"].update(vcpu=4), r"vm.vcpu: unknown key; allowed here: launcher, accel"),
    (lambda d: d["vm"].update(launcher="xen"), r"vm.launcher: 'xen' is not one of: qemu, giantvm"),
    (lambda d: d["vm"].update(nodes=3), r"vm.nodes: 4 vCPUs cannot be split evenly over 3"),
    (lambda d: d["probe"].update(transports=["ssh", "telnet"]),
     r"probe.transports: 'telnet' is not one of: ssh, serial"),
    (lambda d: d["probe"].update(transports=["ssh", "ssh"]),
     r"probe.transports: names a transport twice"),
    (lambda d: d["checks"].update(rate_tolerance=2), r"checks.rate_tolerance: expected a number"),
    (lambda d: d.pop("guest"), r"guest: is required"),
    (lambda d: d["guest"]["kernel"]["config"].update(fragments=["nope.config"]),
     r"guest.kernel.config.fragments: .*nope.config does not exist"),
    (lambda d: d["guest"]["kernel"].update(patches="../no-such-dir"),
     r"guest.kernel.patches: .*no-such-dir is not a directory"),
    (lambda d: d.update(hosts=[{"name": "a", "address": "not a host!"}]),
     r"hosts\[0\].address: 'not a host!' is neither"),
    (lambda d: d.update(hosts=[{"name": "a", "address": "10.0.0.1", "sudo": "yes"}]),
     r"hosts\[0\].sudo: expected true or false"),
    (lambda d: d.update(hosts=[{"name": "a", "address": "local"}, {"name": "a", "address": "local"}]),
     r"hosts: host names must be unique"),
    (lambda d: d["timeouts"].update(boot_s=True), r"timeouts.boot_s: expected a number"),
])
def test_mistakes_are_named(mutate, message) -> None:
    data = base()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse(data)


def test_relative_paths_resolve_against_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "frag.config").write_text("CONFIG_SMP=y\n")
    data = base()
    data["guest"]["kernel"]["config"]["fragments"] = ["frag.config"]
    data["guest"]["kernel"]["patches"] = "."
    config = parse(data, tmp_path / "mine.yaml")
    assert config.guest.kernel.fragments == ((tmp_path / "frag.config").resolve(),)
    assert config.guest.kernel.patches == tmp_path.resolve()


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("vm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("name: a\nvm:\n  vcpus: 2\n  vcpus: 4\n")
    with pytest.raises(ConfigError, match=r'(?s)twice.yaml: .*key .vcpus. a second time \(first at '
                                          r'line 3\).*in ".*twice.yaml", line 4'):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_remote_host_fields() -> None:
    data = base()
    data["hosts"] = [{"name": "node0", "address": "10.231.7.2", "user": "gvm", "port": 2222,
                      "key_file": "/keys/id", "known_hosts": "/keys/known", "sudo": True}]
    (host,) = parse(data).hosts
    assert (host.address, host.user, host.port, host.sudo) == ("10.231.7.2", "gvm", 2222, True)
    assert host.key_file == Path("/keys/id") and host.known_hosts == Path("/keys/known")
    assert not host.is_local and not host.trust_on_first_use


def test_a_backend_section_is_refused_unless_its_backend_parses_it() -> None:
    """harness.config alone knows no backend: the registry's load_config hands over the
    sections, and a section nobody reads is a misspelt key like any other."""
    data = base()
    data["emulated_hosts"] = {"kernel": "k", "qemu_tree": "q"}
    with pytest.raises(ConfigError, match=r"emulated_hosts: unknown key"):
        cluster_config.parse_config(DEFAULT_CONFIG, data)
