from pathlib import Path

import pytest

from harness.backends.registry import backend_for, parse_config
from harness.config import ClusterConfig, HostConfig
from harness.hosts import HostsUnreachable, host_spec, preflight_hosts
from harness.transport.local_process import free_loopback_port
from harness.transport.remote_host import RemoteHostError, RemoteHostSpec
from tests.configs import giantvm_config, shipped_config


def test_spec_from_the_cluster_config_and_its_checks(tmp_path: Path) -> None:
    host = HostConfig(name="node-a", address="10.0.0.1", user="gvm", port=2222,
                      key_file=tmp_path / "id_ed25519", work_dir="/srv/gvm",
                      known_hosts=tmp_path / "known_hosts", sudo=True)
    spec = host_spec(host)
    assert (spec.name, spec.address, spec.user, spec.port, spec.work_dir) == \
        ("node-a", "10.0.0.1", "gvm", 2222, "/srv/gvm")
    assert spec.key_file == tmp_path / "id_ed25519" and spec.sudo
    assert not spec.trust_on_first_use
    assert spec.where == "host 'node-a' (gvm@10.0.0.1:2222)"
    with pytest.raises(RemoteHostError, match="work_dir 'gvm' must be an absolute path"):
        RemoteHostSpec("a", "10.0.0.1", work_dir="gvm")


def remote_config(tmp_path: Path, *hosts: dict) -> ClusterConfig:
    data = shipped_config(tmp_path / "runs")
    data["hosts"] = list(hosts)
    return parse_config(tmp_path / "remote.yaml", data)


def reached(config: ClusterConfig) -> list[str]:
    return [host.name for host in backend_for(config).hosts_to_reach(config)]


def test_the_hosts_checked_before_the_build_are_those_the_guest_runs_on(tmp_path: Path) -> None:
    assert reached(parse_config(tmp_path / "local.yaml", shipped_config(tmp_path / "runs"))) == []
    config = remote_config(tmp_path, {"name": "far", "address": "192.0.2.1"},
                           {"name": "spare", "address": "192.0.2.2"})
    assert reached(config) == ["far"]
    assert reached(giantvm_config(tmp_path)) == ["h0", "h1"]


def test_an_unreachable_host_fails_the_preflight_with_every_host_named(tmp_path: Path) -> None:
    closed = free_loopback_port()  # nothing listens there: connection refused, at once
    gone = HostConfig(name="gone", address="127.0.0.1", user="root", port=closed, key_file=None,
                      work_dir="/tmp/gvm", known_hosts=tmp_path / "known_hosts")
    with pytest.raises(HostsUnreachable, match=rf"(?s)gone.*FAILED: host 'gone' "
                                               rf"\(root@127.0.0.1:{closed}\): cannot connect.*"
                                               r"nothing was built or started: fix the hosts "
                                               r"above or /x/c.yaml"):
        preflight_hosts([gone], Path("/x/c.yaml"))
