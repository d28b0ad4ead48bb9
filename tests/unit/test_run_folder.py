"""Run folders: unique names, `latest`, and finding the newest run that started a guest."""

from pathlib import Path

from harness.run_folder import RunFolder


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
