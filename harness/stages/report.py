"""What a run leaves behind for people and for CI: a table, JSON, JUnit XML, a lag plot, a
self-contained report.html and a summary.md (for CI job summaries), each saying what the run
exercised (RunContext) next to what it found. A run that stops before a verdict (a build, a boot
or a host failing, Ctrl-C) still gets its junit.xml, report.html and summary.md, with one error
test case."""

from __future__ import annotations

import base64
import html
import socket
import time
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


@dataclass(frozen=True)
class RunError:
    """Why a run stopped before a verdict: the stage, whose fault, the message."""

    stage: str  # e.g. "harness", "interrupted"
    message: str


def write_junit(verdict: Verdict, path: Path, suite_name: str,
                context: RunContext | None = None, started: float | None = None,
                error: RunError | None = None) -> None:
    """JUnit XML with time, timestamp, hostname and the context as properties; `started` is the
    run's start (epoch seconds), `error` a stop before the verdict (one error test case)."""
    failures = sum(not check.passed for check in verdict.checks)
    now = time.time()
    begun = started if started is not None else now
    suite = ElementTree.Element("testsuite", name=suite_name,
                                tests=str(len(verdict.checks) + (error is not None)),
                                failures=str(failures), errors=str(int(error is not None)),
                                time=f"{max(now - begun, 0.0):.1f}",
                                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(begun)),
                                hostname=socket.gethostname())
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
    if error is not None:
        case = ElementTree.SubElement(suite, "testcase", classname=f"{suite_name}.run",
                                      name=error.stage)
        ElementTree.SubElement(case, "error", message=error.message.splitlines()[0][:500]) \
            .text = error.message
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


# Files a run folder may hold, in the order the report links them.
LINKED_FILES = ("verdict.txt", "verdict.json", "junit.xml", "summary.md", "build.log",
                "build.json", "launch.json", "qemu.log", "console-kernel.log",
                "console-shell.log", "samples.json", "stream.json", "metrics.json",
                "host-dmesg.json", "deploy.json", "lag.png")


def write_run_reports(run_dir: Path, title: str, verdict: Verdict | None,
                      context: RunContext | None = None, error: RunError | None = None) -> None:
    """report.html and summary.md beside verdict.txt: the verdict (or why there is none)."""
    (run_dir / "summary.md").write_text(summary_markdown(title, verdict, context, error))
    (run_dir / "report.html").write_text(report_html(run_dir, title, verdict, context, error))


def _outcome(verdict: Verdict | None, error: RunError | None) -> str:
    if error is not None:
        return "ERROR" if error.stage != "interrupted" else "INTERRUPTED"
    return "PASS" if verdict is not None and verdict.passed else "FAIL"


def summary_markdown(title: str, verdict: Verdict | None, context: RunContext | None,
                     error: RunError | None) -> str:
    """GitHub-flavoured Markdown for a CI job summary ($GITHUB_STEP_SUMMARY and the like)."""
    lines = [f"## {title}: {_outcome(verdict, error)}", ""]
    if error is not None:
        lines += [f"The run stopped before a verdict ({error.stage}):", "", "```",
                  error.message, "```", ""]
    if context is not None:
        lines += [f"- {line}" for line in context.lines()] + [""]
    if verdict is not None and verdict.checks:
        lines += ["| transport | check | result | measured | limit | detail |",
                  "|---|---|---|---|---|---|"]
        for check in verdict.checks:
            cells = (check.transport, check.name,
                     "PASS" if check.passed else "**FAIL**", f"{check.measured:g}",
                     check.limit, check.detail)
            lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ")
                                           for cell in cells) + " |")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:75em}
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .5em;text-align:left;
vertical-align:top}tr.fail td{background:#fdd}tr.pass td.result{color:#060}
.outcome-PASS{color:#060}.outcome-FAIL,.outcome-ERROR,.outcome-INTERRUPTED{color:#b00}
pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}img{max-width:100%}"""


def report_html(run_dir: Path, title: str, verdict: Verdict | None,
                context: RunContext | None, error: RunError | None) -> str:
    """One self-contained page (the plot inlined): verdict table with FAIL rows marked, the
    run's context, the plot, links to the logs that exist in the run folder."""
    outcome = _outcome(verdict, error)
    escape = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(title)}: {outcome}</title><style>{_STYLE}</style></head><body>",
             f'<h1>{escape(title)}: <span class="outcome-{outcome}">{outcome}</span></h1>']
    if error is not None:
        parts.append(f"<p>The run stopped before a verdict ({escape(error.stage)}):</p>"
                     f"<pre>{escape(error.message)}</pre>")
    if context is not None:
        parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in context.lines())
                     + "</ul>")
    if verdict is not None and verdict.checks:
        parts.append("<table><tr><th>transport</th><th>check</th><th>result</th>"
                     "<th>measured</th><th>limit</th><th>detail</th></tr>")
        for check in verdict.checks:
            result = "PASS" if check.passed else "FAIL"
            parts.append(f'<tr class="{result.lower()}"><td>{escape(check.transport)}</td>'
                         f"<td>{escape(check.name)}</td><td class=\"result\">{result}</td>"
                         f"<td>{check.measured:g}</td><td>{escape(check.limit)}</td>"
                         f"<td>{escape(check.detail)}</td></tr>")
        parts.append("</table>")
    plot = run_dir / "lag.png"
    if plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode()
        parts.append(f'<h2>Lag per vCPU</h2><img alt="lag per vCPU" '
                     f'src="data:image/png;base64,{data}">')
    links = [name for name in LINKED_FILES if (run_dir / name).is_file()]
    parts.append("<h2>Files</h2><ul>" + "".join(
        f'<li><a href="{escape(name)}">{escape(name)}</a></li>' for name in links) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
