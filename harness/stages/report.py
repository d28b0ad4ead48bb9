"""What a run leaves behind for people and for CI: a table, JSON, JUnit XML and a skew plot."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

from harness.stages.judge import Verdict, vcpu_skews
from harness.stages.probe import JiffiesSample

NS_PER_S = 1_000_000_000


def verdict_table(verdict: Verdict) -> str:
    rows = [("transport", "check", "result", "measured", "limit", "detail")]
    for check in verdict.checks:
        rows.append((check.transport, check.name, "PASS" if check.passed else "FAIL",
                     f"{check.measured:g}", check.limit, check.detail))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5]
             for row in rows]
    lines.append(f"VERDICT: {'PASS' if verdict.passed else 'FAIL'}")
    return "\n".join(lines)


def write_junit(verdict: Verdict, path: Path, suite_name: str) -> None:
    failures = sum(not check.passed for check in verdict.checks)
    suite = ElementTree.Element("testsuite", name=suite_name, tests=str(len(verdict.checks)),
                                failures=str(failures), errors="0")
    for check in verdict.checks:
        case = ElementTree.SubElement(suite, "testcase", classname=f"{suite_name}.{check.transport}",
                                      name=check.name)
        if not check.passed:
            failure = ElementTree.SubElement(case, "failure",
                                             message=f"{check.measured:g} outside {check.limit}")
            failure.text = check.detail
        else:
            ElementTree.SubElement(case, "system-out").text = check.detail
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def plot_skew(samples: list[JiffiesSample], hz: int, path: Path, max_skew_ticks: int) -> None:
    """Skew of every vCPU against its round's median over host time, one panel per transport."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    transports = sorted({s.transport for s in samples})
    figure, axes = pyplot.subplots(len(transports), 1, figsize=(9, 3.2 * len(transports)),
                                   squeeze=False, sharex=True)
    start_ns = min(s.host_ns for s in samples)
    for axis, transport in zip(axes[:, 0], transports):
        lines: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for sample, skew in vcpu_skews([s for s in samples if s.transport == transport], hz):
            lines[sample.vcpu].append(((sample.host_ns - start_ns) / NS_PER_S, skew))
        for vcpu, points in sorted(lines.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                      label=f"vCPU {vcpu} (node {next(s.node for s in samples if s.vcpu == vcpu)})")
        for bound in (-max_skew_ticks, max_skew_ticks):
            axis.axhline(bound, color="red", linestyle="--", linewidth=0.8)
        axis.set_title(f"jiffies skew per vCPU over {transport}")
        axis.set_ylabel("ticks vs round median")
        axis.legend(fontsize="small", ncol=4)
    axes[-1, 0].set_xlabel("host time since first sample (s)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
