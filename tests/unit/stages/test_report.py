"""The reports say what the run exercised: a PASS without ATOMIC_INC is marked as such."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import replace

from harness.stages.verdict import CheckResult, Verdict
from harness.stages.report import RunContext, verdict_table, write_junit

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
