"""pytest plugin: `--cluster-config` and fixtures that build and boot the real guest once per
session. Tests ask for `cluster`, `guest_console` or `guest_ssh`; `boot_guest` boots extra guests
with another kernel command line. Every guest is stopped when the session ends, pass or fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness import guest_session
from harness.backends.registry import load_config
from harness.config import DEFAULT_CONFIG, ClusterConfig
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages.build import KernelBuildResult
from harness.stages.guest_kernel import PreparedTree, kernel_hz, patch_and_build
from harness.transport.guest_ssh import GuestSSH
from harness.transport.serial_console import SerialConsole


@dataclass(frozen=True)
class BuiltGuestKernel:
    prepared: PreparedTree
    build: KernelBuildResult
    hz: int


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster-config", type=Path, default=DEFAULT_CONFIG,
                     help="the YAML cluster description the e2e suites run against")


@pytest.fixture(scope="session")
def cluster_config(request: pytest.FixtureRequest) -> ClusterConfig:
    return load_config(request.config.getoption("--cluster-config"))


@pytest.fixture(scope="session")
def progress() -> Progress:
    return Progress()


@pytest.fixture(scope="session")
def guest_kernel(cluster_config: ClusterConfig, progress: Progress) -> BuiltGuestKernel:
    run = RunFolder.create(cluster_config.run_root, f"{cluster_config.name}-pytest-build")
    prepared, result = patch_and_build(cluster_config, run, progress)
    return BuiltGuestKernel(prepared, result, kernel_hz(Path(result.config.path)))


@pytest.fixture(scope="session")
def boot_guest(cluster_config: ClusterConfig, guest_kernel: BuiltGuestKernel,
               progress: Progress) -> Iterator[Callable[..., guest_session.GuestSession]]:
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
    return boot_guest()


@pytest.fixture
def guest_console(cluster: guest_session.GuestSession) -> SerialConsole:
    return cluster.open_console()


@pytest.fixture
def guest_ssh(cluster: guest_session.GuestSession) -> GuestSSH:
    return cluster.open_ssh()
