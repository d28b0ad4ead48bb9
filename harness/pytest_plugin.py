"""pytest plugin: `--cluster-config` and fixtures that build and boot the real guest once per
session. Tests ask for `cluster`, `guest_console` or `guest_ssh`; `boot_guest` boots extra guests
with another kernel command line. Every guest is stopped when the session ends, pass or fail.

Installed (`pip install gvm-harness`), pytest loads it through the `pytest11` entry point; in a
checkout without an install, tests/conftest.py names it. `GVM_CLUSTER_CONFIG` is the default of
`--cluster-config`, as labgrid's `LG_ENV` is of `--lg-env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest

from harness import guest_session
from harness.backends.registry import load_config
from harness.config import DEFAULT_CONFIG, ClusterConfig
from harness.errors import HarnessError
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages.build import KernelBuildResult
from harness.stages.guest_kernel import PreparedTree, kernel_hz, patch_and_build
from harness.transport.guest_ssh import GuestSSH
from harness.transport.serial_console import SerialConsole

CONFIG_ENV = "GVM_CLUSTER_CONFIG"
_LOADED = pytest.StashKey[ClusterConfig]()


@dataclass(frozen=True)
class BuiltGuestKernel:
    prepared: PreparedTree
    build: KernelBuildResult
    hz: int


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gvm-harness", "GiantVM ATOMIC_INC guest (gvm-harness)")
    group.addoption("--cluster-config", type=Path, default=None,
                    help=f"the YAML cluster description the guest fixtures use (default: "
                         f"${CONFIG_ENV}, else {DEFAULT_CONFIG})")


def pytest_configure(config: pytest.Config) -> None:
    """A config named on the command line or in the environment is read at once: a bad one is
    one usage error, not an error in every test that asks for the guest."""
    path = chosen_config_path(config.getoption("cluster_config"), os.environ)
    if path is None:
        return
    try:
        config.stash[_LOADED] = load_config(path)
    except HarnessError as error:
        raise pytest.UsageError(f"--cluster-config / ${CONFIG_ENV}: {error}") from None


def chosen_config_path(option: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The option, else the environment variable; None: neither (the default applies later)."""
    if option is not None:
        return option
    return Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None


@pytest.fixture(scope="session")
def cluster_config(request: pytest.FixtureRequest) -> ClusterConfig:
    """The parsed cluster description (--cluster-config, $GVM_CLUSTER_CONFIG or the default)."""
    return request.config.stash.get(_LOADED, None) or load_config(DEFAULT_CONFIG)


@pytest.fixture(scope="session")
def progress() -> Progress:
    """Where the fixtures report their long steps (stderr, shown with `pytest -s`)."""
    return Progress()


@pytest.fixture(scope="session")
def guest_kernel(cluster_config: ClusterConfig, progress: Progress) -> BuiltGuestKernel:
    """The patched guest kernel, built once per session (in a run folder of its own)."""
    run = RunFolder.create(cluster_config.run_root, f"{cluster_config.name}-pytest-build")
    prepared, result = patch_and_build(cluster_config, run, progress)
    return BuiltGuestKernel(prepared, result, kernel_hz(Path(result.config.path)))


@pytest.fixture(scope="session")
def boot_guest(cluster_config: ClusterConfig, guest_kernel: BuiltGuestKernel,
               progress: Progress) -> Iterator[Callable[..., guest_session.GuestSession]]:
    """A function that boots another guest (optionally with its own kernel command line) and
    returns its session; every guest it booted is stopped when the session ends."""
    sessions: list[guest_session.GuestSession] = []

    def boot(cmdline: str | None = None) -> guest_session.GuestSession:
        run = RunFolder.create(cluster_config.run_root, f"{cluster_config.name}-pytest")
        session = guest_session.boot_guest(cluster_config, Path(guest_kernel.build.bzimage.path),
                                           guest_kernel.hz, run, progress, cmdline=cmdline)
        sessions.append(session)
        return session

    yield boot
    for session in sessions:
        session.close()


@pytest.fixture(scope="session")
def cluster(boot_guest: Callable[..., guest_session.GuestSession]) -> guest_session.GuestSession:
    """The session's guest, booted once with the config's command line, ready for SSH."""
    return boot_guest()


@pytest.fixture
def guest_console(cluster: guest_session.GuestSession) -> SerialConsole:
    """A logged-in shell on the guest's interactive serial console (ttyS1)."""
    return cluster.open_console()


@pytest.fixture
def guest_ssh(cluster: guest_session.GuestSession) -> GuestSSH:
    """An SSH connection to the guest as root, its host key pinned."""
    return cluster.open_ssh()
