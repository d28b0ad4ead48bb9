"""Config validation: the shipped configs load, and each kind of mistake names file, key and fix."""

from pathlib import Path

import pytest
import yaml

from harness.config import DEFAULT_CONFIG, load_config, parse_config
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


GIANTVM_EXAMPLES = sorted((DEFAULT_CONFIG.parent).glob("giantvm-*.yaml"))


def giantvm_base() -> dict:
    return yaml.safe_load((DEFAULT_CONFIG.parent / "giantvm-2node.yaml").read_text())


@pytest.mark.parametrize("path", GIANTVM_EXAMPLES, ids=lambda p: p.name)
def test_giantvm_examples_load_with_one_node_per_host(path: Path) -> None:
    config = load_config(path)
    assert config.vm.launcher == "giantvm" and config.giantvm is not None
    nodes = config.giantvm.nodes
    assert len(nodes) == config.vm.nodes
    assert [node.host for node in nodes] == [host.name for host in config.hosts]
    if config.emulated_hosts is None:  # real hosts get the host kvm from `deploy`
        assert (config.giantvm.host_modules is None) != (config.giantvm.host_kernel is None)


def test_the_examples_cover_two_and_four_nodes_and_both_methods() -> None:
    configs = [load_config(path) for path in GIANTVM_EXAMPLES]
    assert {c.vm.nodes for c in configs} == {2, 4}
    assert {c.giantvm.atomic_inc_mode for c in configs} == {"send_all", "local_first"}


def _giantvm_hosts(data: dict, **changes) -> None:
    data["hosts"][1].update(changes)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("giantvm"), r"giantvm: is required with vm.launcher 'giantvm'"),
    (lambda d: d["giantvm"]["nodes"][1].update(host="node9"),
     r"giantvm.nodes\[1\].host: 'node9' is not one of the config's hosts: node0, node1"),
    (lambda d: d["giantvm"]["nodes"][0].update(ip="node0.lan"),
     r"giantvm.nodes\[0\].ip: 'node0.lan' is not an IPv4 address"),
    (lambda d: d["giantvm"]["nodes"].pop(), r"giantvm.nodes: lists 1 nodes, but vm.nodes is 2"),
    (lambda d: d["giantvm"].update(host_kernel={"bzimage": "b", "modules_tarball": "m",
                                                "release": "4.9.76+"}),
     r"giantvm.host_kernel: and host_modules are alternatives"),
    (lambda d: d["giantvm"].update(atomic_inc_mode="both"),
     r"giantvm.atomic_inc_mode: 'both' is not one of: send_all, local_first"),
    (lambda d: d["giantvm"].update(machine="virt"), r"giantvm.machine: 'virt' is not one of"),
    (lambda d: d["vm"].update(accel="tcg"), r"giantvm: GiantVM runs on KVM only"),
    (lambda d: d["vm"].update(nodes=5, vcpus=5), r"vm.nodes: GiantVM supports at most 4 nodes"),
    (lambda d: _giantvm_hosts(d, address="local"), r"giantvm.nodes: GiantVM nodes run on hosts "
                                                   r"reached over SSH"),
    (lambda d: _giantvm_hosts(d, work_dir="/data/gvm"),
     r"giantvm.nodes: the nodes' hosts have different work_dirs "
     r"\(/data/gvm, /var/tmp/gvm-harness\)"),
    (lambda d: d["giantvm"]["host_modules"].pop("kvm_ko"),
     r"giantvm.host_modules.kvm_ko: is required"),
    (lambda d: d["giantvm"].update(rendezvous_s=10), r"giantvm.rendezvous_s: unknown key"),
])
def test_giantvm_mistakes_are_named(mutate, message) -> None:
    data = giantvm_base()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse(data, DEFAULT_CONFIG.parent / "giantvm-2node.yaml")


def test_a_giantvm_section_needs_the_giantvm_launcher() -> None:
    data = base()
    data["giantvm"] = giantvm_base()["giantvm"]
    with pytest.raises(ConfigError, match=r"giantvm: is only read with vm.launcher 'giantvm'"):
        parse(data)


def test_a_bochs_host_section_with_its_defaults(tmp_path: Path) -> None:
    data = base()
    data["guest"]["kernel"]["config"]["fragments"] = []
    data["guest"]["kernel"]["patches"] = None
    data["bochs_host"] = {"kernel": "bzImage-dsm"}
    bochs = parse(data, tmp_path / "bochs.yaml").bochs_host
    assert bochs.kernel == (tmp_path / "bzImage-dsm").resolve()
    assert (bochs.memory_mb, bochs.cpus, bochs.clock_sync) == (1024, 1, "slowdown")
    assert bochs.qemu_tree is None
    data["bochs_host"] = {"kernel": "k", "qemu_tree": "~/gvm-qemu"}
    assert parse(data, tmp_path / "bochs.yaml").bochs_host.qemu_tree == Path.home() / "gvm-qemu"
    data["bochs_host"] = {"kernel": "k", "clock_sync": "fast"}
    with pytest.raises(ConfigError, match=r"bochs_host.clock_sync: 'fast' is not one of: slowdown"):
        parse(data, tmp_path / "bochs.yaml")
