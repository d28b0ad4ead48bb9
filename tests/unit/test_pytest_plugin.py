"""The pytest plugin as a suite outside the repo meets it: the option, the environment variable,
one usage error for a bad config."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from harness.config import REPO_ROOT
from harness.pytest_plugin import CONFIG_ENV, chosen_config_path
from tests.configs import shipped_config

SUITE = '''
def test_names_the_config(cluster_config):
    print("CONFIG NAME", cluster_config.name)
'''


def _pytest(directory: Path, *args: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    environ.update(env or {}, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-s",
                           "-q", "-p", "no:cacheprovider", *args], cwd=directory, env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


def _suite(tmp_path: Path, name: str = "mine") -> Path:
    (tmp_path / "test_mine.py").write_text(SUITE)
    data = shipped_config(tmp_path / "runs")
    data["name"] = name
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_the_option_wins_over_the_environment() -> None:
    assert chosen_config_path(Path("a.yaml"), {CONFIG_ENV: "b.yaml"}) == Path("a.yaml")
    assert chosen_config_path(None, {CONFIG_ENV: "b.yaml"}) == Path("b.yaml")
    assert chosen_config_path(None, {CONFIG_ENV: ""}) is None


def test_the_environment_variable_names_the_config(tmp_path: Path) -> None:
    config = _suite(tmp_path, "from-env")
    result = _pytest(tmp_path, env={CONFIG_ENV: str(config)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CONFIG NAME from-env" in result.stdout


def test_a_bad_config_is_one_usage_error(tmp_path: Path) -> None:
    _suite(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("vm: {vcpus: zero}\nguest: {kernel: {source: x}}\n")
    result = _pytest(tmp_path, "--cluster-config", str(bad))
    assert result.returncode == 4  # pytest's usage error: no test ran
    assert result.stderr.count("ERROR: --cluster-config") == 1
    assert "vm.vcpus: expected a whole number" in result.stderr


def test_the_help_shows_the_option_in_its_own_group(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "--help")
    assert "GiantVM ATOMIC_INC guest (gvm-harness):" in result.stdout
    assert f"${CONFIG_ENV}" in result.stdout
