"""report.html in a real browser: Debian's headless Chromium renders it to a screenshot and its
DOM keeps the verdict rows (FAIL marked), the inlined plot and the links."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.stages.report import RunContext, write_junit, write_run_reports
from harness.stages.verdict import CheckResult, Verdict

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CONTEXT = RunContext(backend="local-qemu", accelerator="tcg", nodes=2, vcpus=4,
                     atomic_inc=("ATOMIC_INC: enabled",), atomic_inc_mode=None,
                     host_load=(1.0, 1.5), workloads=("cpu-hog",), readings_per_s_per_vcpu=300.0)
VERDICT = Verdict((CheckResult("monotonic per vCPU", "ssh", True, 0.0, "no step below 0", "ok"),
                   CheckResult("stale reads", "ssh-stream", False, 3.0, "<= 0 ticks",
                               "vCPU 1 read 3 ticks below vCPU 0")))


def _plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure, axis = pyplot.subplots(figsize=(4, 2))
    axis.plot([0, 1, 2], [0, 1, 0])
    figure.savefig(path)
    pyplot.close(figure)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                                             "chromium) to render report.html")
def test_chromium_renders_the_report(tmp_path: Path) -> None:
    _plot(tmp_path / "lag.png")
    (tmp_path / "console-kernel.log").write_text("Linux version 6.1\n")
    write_junit(VERDICT, tmp_path / "junit.xml", "gvm", CONTEXT)
    write_run_reports(tmp_path, "gvm-harness local", VERDICT, CONTEXT)
    page = (tmp_path / "report.html").as_uri()
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(browser + ["--dump-dom", page], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert '<tr class="fail">' in dom and "stale reads" in dom
    assert 'src="data:image/png;base64,' in dom and 'href="console-kernel.log"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(browser + [f"--screenshot={shot}", "--window-size=1200,900", page],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
