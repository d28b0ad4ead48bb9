"""`up`, `status`, `probe` and `down` as separate commands: a later command reattaches to the
guest an earlier one left running, and `down` stops it."""

from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness import guest_session
from harness.backends.registry import load_config
from harness.run_folder import RunFolder
from tests.configs import shipped_config

pytestmark = pytest.mark.e2e


def test_up_status_probe_down(tmp_path: Path, guest_kernel, capsys) -> None:
    data = shipped_config(tmp_path / "runs")
    data["probe"]["rounds"] = 5
    config = tmp_path / "updown.yaml"
    config.write_text(yaml.safe_dump(data))
    arguments = ["--config", str(config)]
    assert main(arguments + ["up"]) == 0
    run = RunFolder.newest_with(tmp_path / "runs", "session.json")
    assert run.file("session.json").stat().st_mode & 0o077 == 0  # it holds the root password
    try:
        RunFolder.create(tmp_path / "runs", "a-later-build-only-run")
        assert main(arguments + ["status"]) == 0
        assert "guest running" in capsys.readouterr().out
        assert main(arguments + ["probe"]) == 0
        assert "VERDICT: PASS" in capsys.readouterr().out
        assert run.file("junit.xml").is_file()
    finally:
        assert main(arguments + ["down"]) == 0
    assert guest_session.attach_session(load_config(config), run).guest.exit_status() is not None
