"""A shipped config as YAML data that still holds when a test writes it somewhere else: its guest
series and config fragments become absolute paths and its runs go where the test says."""

from pathlib import Path

import yaml

from harness.backends.registry import parse_config
from harness.config import DEFAULT_CONFIG, REPO_ROOT, ClusterConfig

GIANTVM_EXAMPLE = REPO_ROOT / "vm_configs" / "giantvm-2node.yaml"


def shipped_config(run_dir: Path, name: str = DEFAULT_CONFIG.name) -> dict:
    path = DEFAULT_CONFIG.parent / name
    data = yaml.safe_load(path.read_text())
    kernel = data["guest"]["kernel"]
    kernel["patches"] = str((path.parent / kernel["patches"]).resolve())
    kernel["config"]["fragments"] = [str((path.parent / fragment).resolve())
                                     for fragment in kernel["config"]["fragments"]]
    data["run_dir"] = str(run_dir)
    return data


def giantvm_config(tmp_path: Path, **giantvm) -> ClusterConfig:
    """The 2-node example, its hosts renamed to the fakes' and its files in tmp_path."""
    data = shipped_config(tmp_path / "runs", GIANTVM_EXAMPLE.name)
    for index, host in enumerate(data["hosts"]):
        host.update(name=f"h{index}", address=f"10.0.0.{index + 1}", work_dir="/srv/gvm")
    data["giantvm"]["nodes"] = [{"host": "h0", "ip": "10.0.0.1"}, {"host": "h1", "ip": "10.0.0.2"}]
    modules = {"kvm_ko": str(tmp_path / "kvm.ko"), "kvm_intel_ko": str(tmp_path / "kvm-intel.ko")}
    data["giantvm"]["host_modules"] = modules
    data["giantvm"].update(giantvm)
    data["giantvm"] = {key: value for key, value in data["giantvm"].items() if value is not None}
    return parse_config(tmp_path / "cluster.yaml", data)
