"""The deliberately faulty guest series kept for end-to-end tests: the shipped linux-6.1 series
(through symlinks, so they follow it) plus one broken patch each."""

from pathlib import Path

import pytest

from harness.stages.patches import PatchSeries

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = PatchSeries.load(ROOT / "guest_patches" / "linux-6.1")


@pytest.mark.parametrize("name, extra, touches", [
    ("drop-tick", "0004-FAULTY-lose-every-1000th-tick.patch", "kernel/time/timekeeping.c"),
    ("held-back-cpu", "0004-FAULTY-cpu1-reads-3-ticks-old.patch", "kernel/time/Makefile"),
])
def test_faulty_series_is_the_shipped_one_plus_one_patch(name, extra, touches) -> None:
    directory = ROOT / "tests" / "faulty_series" / name
    series = PatchSeries.load(directory)
    assert series.names == SHIPPED.names + (extra,)
    assert series.patches[:3] == SHIPPED.patches
    assert (directory / "kconfig.fragment").read_text() == \
        (ROOT / "guest_patches" / "linux-6.1" / "kconfig.fragment").read_text()
    assert f"diff --git a/{touches} b/{touches}" in series.patches[3].text
    assert "FAULTY" in series.patches[3].text
