"""The reports say what the run exercised: a PASS without ATOMIC_INC is marked as such."""

from __future__ import annotations

import base64
import json
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from html.parser import HTMLParser

from harness.stages.verdict import CheckResult, Verdict
from harness.stages.report import (RunContext, RunError, verdict_table, write_junit,
                                   write_run_reports)

ENABLED = RunContext(backend="giantvm", accelerator="kvm", nodes=2, vcpus=2,
                     atomic_inc=("ATOMIC_INC: enabled",), atomic_inc_mode="local_first",
                     host_load=(1.5, 2.25), workloads=("cpu-hog",), readings_per_s_per_vcpu=250.0)
VERDICT = Verdict((CheckResult("monotonic per vCPU", "ssh", True, 0.0, "no step below 0", "ok"),))


def test_the_protocol_counts_as_exercised_only_if_it_stayed_on() -> None:
    assert ENABLED.protocol_exercised
    fell_back = replace(ENABLED, atomic_inc=(
        "ATOMIC_INC: enabled", "ATOMIC_INC: disabled: hypercall returned -1000, jiffies updated "
        "locally from now on"))
    assert not fell_back.protocol_exercised
    assert not replace(ENABLED, atomic_inc=("ATOMIC_INC: disabled: not running on KVM",)) \
        .protocol_exercised
    assert not replace(ENABLED, atomic_inc=()).protocol_exercised
    assert ENABLED.to_dict()["protocol_exercised"] is True


def test_the_table_header_says_what_ran() -> None:
    table = verdict_table(VERDICT, ENABLED).splitlines()
    assert table[0] == ("ATOMIC_INC exercised, method local_first: the guest said "
                        "'ATOMIC_INC: enabled'")
    assert "giantvm under KVM: 2 vCPUs on 2 nodes; host load 1.5 -> 2.2" in table[1]
    assert "workloads: cpu-hog; 250.0 readings/s per vCPU" in table[1]
    local = replace(ENABLED, backend="local-qemu", accelerator="tcg", nodes=1, atomic_inc_mode=None,
                    atomic_inc=("ATOMIC_INC: disabled: not running on KVM",))
    assert verdict_table(VERDICT, local).splitlines()[0].startswith(
        "ATOMIC_INC NOT exercised (coherence checks still ran): the guest said")
    assert verdict_table(VERDICT).splitlines()[0].startswith("transport")


def test_junit_carries_the_context_as_properties(tmp_path) -> None:
    write_junit(VERDICT, tmp_path / "junit.xml", "gvm", ENABLED)
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["protocol_exercised"] == "True"
    assert properties["atomic_inc_mode"] == "local_first"
    assert properties["workloads"] == "cpu-hog"
    assert json.dumps(ENABLED.to_dict())  # verdict.json can hold it


class _Page(HTMLParser):
    """Every link, image and table row class of a page; fails on unbalanced tags."""

    VOID = frozenset({"meta", "img", "br", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.rows: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        attributes = dict(attrs)
        if tag == "a":
            self.links.append(attributes["href"])
        elif tag == "img":
            self.images.append(attributes["src"])
        elif tag == "tr" and "class" in attributes:
            self.rows.append(attributes["class"])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag) -> None:
        assert self.open.pop() == tag


FAILED = Verdict(VERDICT.checks + (CheckResult("stale reads", "stream", False, 3.0, "<= 0 ticks",
                                               "vCPU 1 read <3> ticks old | twice"),))


def test_report_html_marks_fail_rows_inlines_the_plot_and_every_link_resolves(tmp_path) -> None:
    (tmp_path / "lag.png").write_bytes(b"\x89PNG\r\n\x1a\nplot")
    (tmp_path / "console-kernel.log").write_text("Linux version\n")
    write_junit(FAILED, tmp_path / "junit.xml", "gvm", ENABLED)
    write_run_reports(tmp_path, "gvm-harness local", FAILED, ENABLED)
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    page.close()
    assert page.open == [] and page.rows == ["pass", "fail"]
    assert page.links and all((tmp_path / link).is_file() for link in page.links)
    assert {"junit.xml", "console-kernel.log", "lag.png", "summary.md"} <= set(page.links)
    assert base64.b64decode(page.images[0].split(",", 1)[1]).startswith(b"\x89PNG")
    assert "&lt;3&gt;" in (tmp_path / "report.html").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## gvm-harness local: FAIL")
    assert "| stream | stale reads | **FAIL** | 3 | <= 0 ticks | vCPU 1 read <3> ticks old \\| " \
           "twice |" in summary


def test_a_run_stopped_before_its_verdict_is_one_error_case(tmp_path) -> None:
    error = RunError("BuildError", "`make` exited with 2\nsee build.log")
    write_junit(Verdict(()), tmp_path / "junit.xml", "gvm", started=time.time() - 42,
                error=error)
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("errors")) == ("1", "1")
    assert 41 <= float(suite.get("time")) <= 60
    case = suite.find("testcase")
    assert case.get("name") == "BuildError"
    assert case.find("error").get("message") == "`make` exited with 2"
    write_run_reports(tmp_path, "gvm-harness local", None, error=error)
    assert (tmp_path / "summary.md").read_text().startswith("## gvm-harness local: ERROR")
