"""GiantVM across two emulated hosts (QEMU TCG with AMD SVM) through the ordinary CLI: both
ATOMIC_INC methods and the page ping-pong baseline get a jiffies verdict, `up`/`probe`/`down`
reattach to the cluster, and nothing is left running afterwards.

Needs two builds the project does not fetch (docs/emulated-hosts.md): GVM_EMULATED_HOST_KERNEL
(Linux-DSM + host_patches/giantvm-master, tinyconfig + bochs-host.config + emulated-host.config)
and GVM_GIANTVM_QEMU (a static GiantVM QEMU 2.8 tree, `./gvm qemu-build`). GVM_EMULATOR, if set,
is the QEMU that emulates the hosts (host_patches/emulator-qemu/build); else Debian's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.run_folder import RunFolder
from tests.configs import shipped_config

needs_emulated_hosts = pytest.mark.skipif(
    not (os.environ.get("GVM_EMULATED_HOST_KERNEL") and os.environ.get("GVM_GIANTVM_QEMU")),
    reason="GVM_EMULATED_HOST_KERNEL and GVM_GIANTVM_QEMU are not both set: point them at a "
           "Linux-DSM emulated-host kernel and a static GiantVM QEMU tree (docs/emulated-hosts.md)")
pytestmark = [pytest.mark.e2e, needs_emulated_hosts]


def left_running() -> list[str]:
    """Emulated hosts of any run still alive (their QEMU lines carry this name)."""
    result = subprocess.run(["pgrep", "-af", "gvm-emulated-host"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


def emulated_config(tmp_path: Path, **changes) -> Path:
    data = shipped_config(tmp_path / "runs", "giantvm-emulated-2node.yaml")
    data["emulated_hosts"]["kernel"] = os.environ["GVM_EMULATED_HOST_KERNEL"]
    data["emulated_hosts"]["qemu_tree"] = os.environ["GVM_GIANTVM_QEMU"]
    if os.environ.get("GVM_EMULATOR"):
        data["emulated_hosts"]["emulator"] = os.environ["GVM_EMULATOR"]
    for key, value in changes.items():
        section, _, name = key.partition("__")
        data[section][name] = value
    path = tmp_path / "emulated.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def verdict_of(tmp_path: Path) -> dict:
    run = RunFolder.newest_with(tmp_path / "runs", "verdict.json")
    assert run is not None, "no verdict was written"
    return json.loads(run.file("verdict.json").read_text())


@pytest.mark.parametrize("mode", ["send_all", "local_first"])
def test_both_methods_give_a_passing_verdict_with_atomic_inc_on(tmp_path, mode) -> None:
    config = emulated_config(tmp_path, giantvm__atomic_inc_mode=mode)
    try:
        status = main(["--config", str(config), "run"])
        verdict = verdict_of(tmp_path)
        assert verdict["context"]["atomic_inc"][0] == "ATOMIC_INC: enabled"
        assert verdict["context"]["protocol_exercised"], verdict["context"]
        assert verdict["context"]["atomic_inc_mode"] == mode
        assert status == 0 and verdict["passed"], [c for c in verdict["checks"] if not c["passed"]]
    finally:
        assert left_running() == []


def test_the_page_ping_pong_baseline_gives_a_verdict(tmp_path) -> None:
    config = emulated_config(tmp_path, guest__cmdline="console=ttyS0 panic=-1 "
                                                     "atomic_inc_jiffies=off random.trust_cpu=on "
                                                     "maxcpus=1")
    try:
        status = main(["--config", str(config), "run"])
        verdict = verdict_of(tmp_path)
        assert not verdict["context"]["protocol_exercised"]
        assert status == 0 and verdict["passed"], [c for c in verdict["checks"] if not c["passed"]]
    finally:
        assert left_running() == []


def test_up_probe_down_reattach_to_the_emulated_cluster(tmp_path, capsys) -> None:
    arguments = ["--config", str(emulated_config(tmp_path))]
    assert main(arguments + ["up"]) == 0
    try:
        assert len(left_running()) == 2
        assert main(arguments + ["status"]) == 0
        assert "guest running" in capsys.readouterr().out
        assert main(arguments + ["probe"]) in (0, 1)
        assert "VERDICT:" in capsys.readouterr().out
    finally:
        assert main(arguments + ["down"]) == 0
    assert left_running() == []
