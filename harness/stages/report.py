"""What a run leaves behind for people and for CI: a table, JSON, JUnit XML and a skew plot, each
saying what the run exercised (RunContext) next to what it found."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from harness.stages.coherence import lag_ticks
from harness.stages.verdict import Verdict

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class RunContext:
    """What the verdict is about: a PASS means little if the protocol never ran."""

    backend: str
    accelerator: str
    nodes: int
    vcpus: int
    atomic_inc: tuple[str, ...]  # the guest's own ATOMIC_INC boot lines, in order
    atomic_inc_mode: str | None  # the host kvm's method (GiantVM); None where there is no DSM
    host_load: tuple[float, float]  # this machine's 1-minute load average at start and end
    workloads: tuple[str, ...]
    readings_per_s_per_vcpu: float  # jiffies readings the judge saw, per vCPU and second
    host_rates: tuple[str, ...] = ()  # per host: its kvm's protocol counters per second

    @property
    def protocol_exercised(self) -> bool:
        """ATOMIC_INC said it was enabled and never that it turned itself off."""
        return bool(self.atomic_inc) and self.atomic_inc[0] == "ATOMIC_INC: enabled" and \
            not any("disabled" in line for line in self.atomic_inc)

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol_exercised": self.protocol_exercised}

    def lines(self) -> list[str]:
        exercised = "ATOMIC_INC exercised" if self.protocol_exercised else \
            "ATOMIC_INC NOT exercised (coherence checks still ran)"
        mode = f", method {self.atomic_inc_mode}" if self.atomic_inc_mode else ""
        said = self.atomic_inc[-1] if self.atomic_inc else "no ATOMIC_INC line (unpatched guest?)"
        return [f"{exercised}{mode}: the guest said '{said}'",
                f"{self.backend} under {self.accelerator.upper()}: {self.vcpus} vCPUs on "
                f"{self.nodes} node{'s' if self.nodes != 1 else ''}; host load "
                f"{self.host_load[0]:.1f} -> {self.host_load[1]:.1f}; workloads: "
                f"{', '.join(self.workloads) or 'none'}; "
                f"{self.readings_per_s_per_vcpu:.1f} readings/s per vCPU",
                *self.host_rates]


def verdict_table(verdict: Verdict, context: RunContext | None = None) -> str:
    rows = [("transport", "check", "result", "measured", "limit", "detail")]
    for check in verdict.checks:
        rows.append((check.transport, check.name, "PASS" if check.passed else "FAIL",
                     f"{check.measured:g}", check.limit, check.detail))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = context.lines() if context is not None else []
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5]
              for row in rows]
    lines.append(f"VERDICT: {'PASS' if verdict.passed else 'FAIL'}")
    return "\n".join(lines)


def write_junit(verdict: Verdict, path: Path, suite_name: str,
                context: RunContext | None = None) -> None:
    failures = sum(not check.passed for check in verdict.checks)
    suite = ElementTree.Element("testsuite", name=suite_name, tests=str(len(verdict.checks)),
                                failures=str(failures), errors="0")
    if context is not None:
        properties = ElementTree.SubElement(suite, "properties")
        for name, value in context.to_dict().items():
            text = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            ElementTree.SubElement(properties, "property", name=name, value=text)
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


def plot_lag(series: dict[str, Sequence], hz: int, path: Path, max_lag_s: float,
             verdict: Verdict, context: RunContext | None = None) -> None:
    """Each vCPU's lag (jiffies behind its guest clock) over guest time, one panel per source of
    readings (each round-probe transport, the stream), with the bound; the title names every
    failed check, so a FAIL never looks green."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    sources = [name for name, readings in sorted(series.items()) if readings]
    figure, axes = pyplot.subplots(len(sources), 1, figsize=(9, 3.2 * len(sources)),
                                   squeeze=False)
    for axis, name in zip(axes[:, 0], sources):
        readings = series[name]
        start_ns = min(r.before_ns for r in readings)
        lines: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
        for reading, lag in lag_ticks(readings, hz):
            lines[(reading.vcpu, reading.node)].append(((reading.before_ns - start_ns) / NS_PER_S,
                                                        lag))
        for (vcpu, node), points in sorted(lines.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if
                      len(points) < 200 else None, linewidth=0.8,
                      label=f"vCPU {vcpu} (node {node})")
        axis.axhline(max_lag_s * hz, color="red", linestyle="--", linewidth=0.8)
        failed = [c.name for c in verdict.checks if c.transport == name and not c.passed]
        axis.set_title(f"lag per vCPU, {name}" + (f": FAILED {', '.join(failed)}" if failed
                                                  else ": passed"),
                       color="red" if failed else "black")
        axis.set_ylabel("ticks behind the clock")
        axis.set_xlabel("guest time since the first reading (s)")
        axis.legend(fontsize="small", ncol=4)
    if context is not None:
        figure.suptitle("\n".join(context.lines()), fontsize="small")
    figure.tight_layout(rect=(0, 0, 1, 0.92 if context is not None else 1))
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
