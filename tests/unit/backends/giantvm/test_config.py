"""The giantvm section: the shipped examples load, and each kind of mistake names the key and fix."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from harness.backends.emulated.config import EmulatedHostsConfig
from harness.backends.giantvm.config import GiantVMConfig
from harness.backends.registry import load_config
from harness.config import DEFAULT_CONFIG
from harness.errors import ConfigError
from tests.unit.test_config import base, parse


GIANTVM_EXAMPLES = sorted((DEFAULT_CONFIG.parent).glob("giantvm-*.yaml"))


def giantvm_base() -> dict:
    return yaml.safe_load((DEFAULT_CONFIG.parent / "giantvm-2node.yaml").read_text())


@pytest.mark.parametrize("path", GIANTVM_EXAMPLES, ids=lambda p: p.name)
def test_giantvm_examples_load_and_every_host_runs_a_node(path: Path) -> None:
    config = load_config(path)
    assert config.vm.launcher == "giantvm" and config.section(GiantVMConfig) is not None
    giantvm = config.section(GiantVMConfig)
    nodes = giantvm.nodes
    assert len(nodes) == config.vm.nodes
    assert list(dict.fromkeys(node.host for node in nodes)) == [host.name for host in config.hosts]
    if config.section(EmulatedHostsConfig) is None:  # real hosts get the host kvm from `deploy`
        assert (giantvm.host_modules is None) != (giantvm.host_kernel is None)


def test_the_seed_setup_runs_both_nodes_on_one_emulated_host_over_loopback() -> None:
    config = load_config(DEFAULT_CONFIG.parent / "giantvm-emulated-1host.yaml")
    nodes = config.section(GiantVMConfig).nodes
    assert [(node.host, node.ip) for node in nodes] == [("emu0", "127.0.0.1")] * 2
    assert config.section(EmulatedHostsConfig).cpus == 2


def test_the_examples_cover_two_and_four_nodes_and_both_methods() -> None:
    configs = [load_config(path) for path in GIANTVM_EXAMPLES]
    assert {c.vm.nodes for c in configs} == {2, 4}
    assert {c.section(GiantVMConfig).atomic_inc_mode for c in configs} == {"send_all", "local_first"}


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
    (lambda d: d["giantvm"].update(atomic_inc_mode="as_built"),
     r"giantvm.atomic_inc_mode: as_built is for a kvm without .*`deploy` loads host_modules"),
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


def test_with_section_replaces_only_the_section_of_its_type() -> None:
    config = load_config(DEFAULT_CONFIG.parent / "giantvm-emulated-2node.yaml")
    emulated = config.section(EmulatedHostsConfig)
    changed = config.with_section(replace(config.section(GiantVMConfig),
                                          atomic_inc_mode="local_first"))
    assert changed.section(GiantVMConfig).atomic_inc_mode == "local_first"
    assert changed.section(EmulatedHostsConfig) is emulated
    assert config.section(GiantVMConfig).atomic_inc_mode == "send_all"
