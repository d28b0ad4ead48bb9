"""The package as a user installs it: `pip install -e .` into a fresh venv gives the `gvm` console
script and the pytest plugin by entry point, and a suite in a directory outside the repo boots the
real guest with plain `pytest` and GVM_CLUSTER_CONFIG."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from harness.config import REPO_ROOT
from tests.configs import shipped_config

pytestmark = pytest.mark.e2e

OUTSIDE_SUITE = '''
def test_the_guest_answers_over_ssh(guest_ssh, cluster_config):
    lines = guest_ssh.run("cat /proc/gvm_jiffies").check("cat").splitlines()
    assert len(lines) == cluster_config.vm.vcpus
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv that sees this interpreter's packages (the dependencies are not fetched
    again) with the checkout installed as a user does it: `pip install -e .` (pip fetches the
    build backend, setuptools, like any install)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    site = Path(subprocess.run([str(root / "bin/python"), "-c",
                                "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(root / "bin/python"), "-m", "pip", "install", "-q", "--no-deps",
                    "-e", str(REPO_ROOT)], check=True, timeout=600,
                   capture_output=True)
    return root


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH or checkout on the path: only the install can provide the harness."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GVM_CLUSTER_CONFIG")}
    return {**env, **extra}


def test_the_console_script_runs_from_anywhere(venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    data = shipped_config(tmp_path / "unused")
    del data["run_dir"]
    config.write_text(yaml.safe_dump(data))
    version = subprocess.run([str(venv / "bin/gvm"), "--version"], cwd=tmp_path, env=_clean_env(),
                             capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("gvm ")
    status = subprocess.run([str(venv / "bin/gvm"), "status", "--config", str(config)],
                            cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert status.returncode == 0, status.stderr
    assert "no guest started yet" in status.stdout


def test_a_suite_outside_the_repo_boots_the_guest_with_plain_pytest(venv: Path,
                                                                     tmp_path: Path) -> None:
    suite = tmp_path / "my-suite"
    suite.mkdir()
    (suite / "test_guest.py").write_text(OUTSIDE_SUITE)
    config = tmp_path / "cluster.yaml"
    data = shipped_config(tmp_path / "unused")
    del data["run_dir"]  # runs land in the directory pytest runs in
    data["probe"]["transports"] = ["ssh"]
    config.write_text(yaml.safe_dump(data))
    result = subprocess.run([str(venv / "bin/python"), "-m", "pytest", "-q", "-p",
                             "no:cacheprovider", "test_guest.py"], cwd=suite,
                            env=_clean_env(GVM_CLUSTER_CONFIG=str(config)),
                            capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    assert any((suite / "runs").glob("*-pytest/console-kernel.log"))
