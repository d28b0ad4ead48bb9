from pathlib import Path

import pytest

from harness.config import HostConfig
from harness.hosts import host_spec
from harness.transport.remote_host import RemoteHostError, RemoteHostSpec


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
