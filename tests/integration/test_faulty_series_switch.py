"""The shipped guest series and the faulty ones of tests/faulty_series, switched back and forth
by harness.stages.patches on the files they touch from Debian's linux-source-6.1 (about 30 s: unpacking
the .xz is most of it). Skipped without the package."""

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.stages.patches import PatchSeries, SeriesState

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = PatchSeries.load(ROOT / "guest_patches" / "linux-6.1")
DEBIAN_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
TOUCHED = ("linux-source-6.1/kernel/time", "linux-source-6.1/include/uapi/linux/kvm_para.h")


@pytest.mark.skipif(not DEBIAN_SOURCE.is_file(), reason=f"needs {DEBIAN_SOURCE} (linux-source-6.1)")
def test_the_harness_switches_between_shipped_and_faulty_series_and_back(tmp_path) -> None:
    """Through harness.stages.patches, on the files the series touch from Debian's 6.1 source:
    every switch reverts the recorded series first and leaves the files pristine."""
    (tmp_path / "pristine").mkdir()
    subprocess.run(["tar", "xf", str(DEBIAN_SOURCE), "-C", str(tmp_path / "pristine"), *TOUCHED],
                   check=True)
    shutil.copytree(tmp_path / "pristine", tmp_path / "tree", symlinks=True)
    tree = tmp_path / "tree" / "linux-source-6.1"
    faulty = ROOT / "tests" / "faulty_series"
    for directory in (ROOT / "guest_patches" / "linux-6.1", faulty / "drop-tick",
                      faulty / "held-back-cpu", faulty / "drop-tick",
                      ROOT / "guest_patches" / "linux-6.1"):
        series = PatchSeries.load(directory)
        series.apply(tree)
        assert series.status(tree).state is SeriesState.APPLIED, directory
    SHIPPED.revert(tree)
    diff = subprocess.run(["diff", "-r", "-x", ".gvm-harness", str(tmp_path / "pristine"),
                           str(tmp_path / "tree")], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[-2000:]
