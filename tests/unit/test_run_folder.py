"""Run folders: unique names, `latest`, and finding the newest run that started a guest."""

import os
import time
from pathlib import Path

import pytest

from harness.errors import BuildError, KernelUnderTestError
from harness.run_folder import OUTCOME_FILE, RunFolder, runs_to_prune


def test_create_makes_unique_folders_and_points_latest(tmp_path: Path) -> None:
    first = RunFolder.create(tmp_path, "local")
    second = RunFolder.create(tmp_path, "local")
    assert first.path != second.path
    assert (tmp_path / "latest").resolve() == second.path


def test_newest_with_skips_runs_without_the_file(tmp_path: Path) -> None:
    for name in ("20261124-100000-local", "20261124-110000-local", "20261124-120000-build"):
        (tmp_path / name).mkdir()
    (tmp_path / "20261124-100000-local" / "session.json").write_text("{}")
    (tmp_path / "20261124-110000-local" / "session.json").write_text("{}")
    (tmp_path / "latest").symlink_to("20261124-120000-build")
    assert RunFolder.newest_with(tmp_path, "session.json").path.name == "20261124-110000-local"
    assert RunFolder.newest_with(tmp_path, "absent.json") is None
    assert RunFolder.newest_with(tmp_path / "nope", "session.json") is None


def test_a_failed_or_interrupted_command_says_so_in_its_run_folder(tmp_path: Path) -> None:
    outcomes = []
    for error, blame in ((KeyboardInterrupt(), "interrupted"), (BuildError("make exited"), "error"),
                         (KernelUnderTestError("panic"), "FAIL")):
        run = RunFolder.create(tmp_path, f"r-{blame}")
        with pytest.raises(type(error)), run.noting_failure():
            raise error
        outcomes.append(run.file(OUTCOME_FILE).read_text())
    assert outcomes[0].startswith("interrupted (Ctrl-C or SIGTERM)")
    assert outcomes[1:] == ["error: make exited\n", "FAIL: panic\n"]
    run = RunFolder.create(tmp_path, "fine")
    with run.noting_failure():
        pass
    assert not run.file(OUTCOME_FILE).exists()


def test_started_at_reads_the_stamp_of_the_name(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "local")
    assert abs(run.started_at() - time.time()) < 5
    assert RunFolder(tmp_path / "no-stamp").started_at() is None


def test_the_retention_rule_keeps_the_newest_the_held_and_the_young(tmp_path: Path) -> None:
    now = time.mktime(time.strptime("20261201-000000", "%Y%m%d-%H%M%S"))
    names = ["20261130-000000-e", "20261129-000000-d", "20261120-000000-c",
             "20261110-000000-b", "20261101-000000-a"]
    runs = [RunFolder(tmp_path / name) for name in names]
    for run in runs:
        run.path.mkdir()
        (run.path / "build.log").write_text("make\n")
        os.utime(run.path / "build.log", (now - 86400, now - 86400))
        os.utime(run.path, (now - 86400, now - 86400))
    held = {"20261110-000000-b"}

    def keep(run: RunFolder) -> bool:
        return run.path.name in held

    assert [r.path.name for r in runs_to_prune(runs, 2, None, now, keep)] == \
        ["20261120-000000-c", "20261101-000000-a"]
    assert [r.path.name for r in runs_to_prune(runs, 1, 15 * 86400, now, keep)] == \
        ["20261101-000000-a"]
    assert runs_to_prune(runs, 10, None, now, keep) == []
    os.utime(runs[4].path / "build.log", (now - 60, now - 60))  # a build still writing there
    assert [r.path.name for r in runs_to_prune(runs, 2, None, now, keep)] == \
        ["20261120-000000-c"]
