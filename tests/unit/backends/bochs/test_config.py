"""The bochs_host section: the shipped examples load, and each kind of mistake names the key and fix."""

from pathlib import Path

import pytest

from harness.backends.bochs.config import BochsHostConfig
from harness.errors import ConfigError
from tests.unit.test_config import base, parse


def test_a_bochs_host_section_with_its_defaults(tmp_path: Path) -> None:
    data = base()
    data["guest"]["kernel"]["config"]["fragments"] = []
    data["guest"]["kernel"]["patches"] = None
    data["bochs_host"] = {"kernel": "bzImage-dsm"}
    bochs = parse(data, tmp_path / "bochs.yaml").section(BochsHostConfig)
    assert bochs.kernel == (tmp_path / "bzImage-dsm").resolve()
    assert (bochs.memory_mb, bochs.cpus, bochs.clock_sync) == (1024, 1, "slowdown")
    assert bochs.qemu_tree is None
    data["bochs_host"] = {"kernel": "k", "qemu_tree": "~/gvm-qemu"}
    assert parse(data, tmp_path / "bochs.yaml").section(BochsHostConfig).qemu_tree == Path.home() / "gvm-qemu"
    data["bochs_host"] = {"kernel": "k", "clock_sync": "fast"}
    with pytest.raises(ConfigError, match=r"bochs_host.clock_sync: 'fast' is not one of: slowdown"):
        parse(data, tmp_path / "bochs.yaml")
