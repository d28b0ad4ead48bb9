"""The judge's composition on synthetic readings: a healthy guest passes every check on every
transport and on the stream, lag from host load is not a failure, a stale vCPU and a lost tick are,
and only the checks the config asks for are made. The checks themselves: test_coherence.py."""

from dataclasses import replace

import pytest

from harness.config import CheckConfig
from harness.stages.judge import STREAM, check_atomic_inc_stayed_on, check_samples, check_stream
from harness.stages.probe import JiffiesSample
from harness.stages.stream import Reading, StreamResult

HZ = 250
LIMITS = CheckConfig(rate_tolerance=0.05)
INITIAL_JIFFIES = 2**32 - 300 * HZ
NS = 1_000_000_000


def healthy(rounds: int = 40, vcpus: int = 4, per_node: int = 2,
            transport: str = "ssh") -> list[JiffiesSample]:
    """Reads 0.25 s apart, each vCPU 7 ms after the previous one, jiffies exactly at HZ."""
    samples = []
    for round_index in range(rounds):
        for vcpu in range(vcpus):
            guest_ns = 2 * NS + round_index * 250_000_000 + vcpu * 7_000_000
            samples.append(JiffiesSample(
                transport=transport, method="kernel-probe", round=round_index, vcpu=vcpu,
                node=vcpu // per_node, jiffies=INITIAL_JIFFIES + guest_ns * HZ // NS,
                guest_ns=guest_ns, host_ns=10**12 + guest_ns, before_ns=guest_ns - 1000,
                after_ns=guest_ns + 1000))
    return samples


def stream(seconds: int = 10, vcpus: int = 2, held_back_vcpu: int | None = None) -> StreamResult:
    """500 readings per second per vCPU; `held_back_vcpu` reads a copy 3 ticks old."""
    readings = []
    for index in range(seconds * 500):
        for vcpu in range(vcpus):
            clock = 2 * NS + index * 2_000_000 + vcpu * 100_000
            jiffies = INITIAL_JIFFIES + clock * HZ // NS - (3 if vcpu == held_back_vcpu else 0)
            readings.append(Reading(vcpu, 0, jiffies, clock - 500, clock + 500))
    return StreamResult(readings=readings)


def names(checks) -> list[str]:
    return [check.name for check in checks]


def test_healthy_rounds_on_two_transports_pass_every_check() -> None:
    verdict = check_samples(healthy() + healthy(transport="serial"), HZ, LIMITS)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]
    assert [(c.transport, c.name) for c in verdict.checks][:5] == [
        ("serial", "stale reads"), ("serial", "monotonic per vCPU"), ("serial", "ticks counted"),
        ("serial", "lag"), ("serial", "rate vs host clock")]


def test_lag_from_a_descheduled_timekeeper_is_not_a_failure() -> None:
    """Every vCPU sees the same late value for 40 ms: lag, not staleness."""
    samples = [replace(s, jiffies=s.jiffies - 10) if s.round == 20 else s for s in healthy()]
    assert check_samples(samples, HZ, LIMITS).passed


def test_the_rate_against_this_machines_clock_is_judged_only_where_asked() -> None:
    off = check_samples(healthy(), HZ, replace(LIMITS, rate_vs_host_clock=False))
    assert "rate vs host clock" not in names(off.checks)


def test_the_stream_is_judged_and_a_held_back_vcpu_fails_stale_reads() -> None:
    assert all(check.passed for check in check_stream(stream(), HZ, LIMITS))
    checks = {c.name: c for c in check_stream(stream(held_back_vcpu=1), HZ, LIMITS)}
    assert not checks["stale reads"].passed and checks["stale reads"].transport == STREAM
    assert "vCPU 1" in checks["stale reads"].detail


def test_an_empty_stream_is_a_failure_not_a_pass() -> None:
    (check,) = check_stream(StreamResult(), HZ, LIMITS)
    assert not check.passed and check.name == "stream readings"


def test_where_the_stream_counts_ticks_the_rounds_do_not() -> None:
    checks = check_samples(healthy(), HZ, LIMITS, count_ticks=False).checks
    assert "ticks counted" not in names(checks) and "stale reads" in names(checks)


def test_atomic_inc_turned_off_mid_run_fails_its_check_and_quotes_the_guest() -> None:
    lines = ["ATOMIC_INC: enabled",
             "ATOMIC_INC: disabled: hypercall returned 0 but jiffies_64 is 4294892473, not "
             "4294892474; jiffies updated locally from now on"]
    [check] = check_atomic_inc_stayed_on(lines, "as_built")
    assert (check.name, check.passed, check.measured) == ("ATOMIC_INC stayed on", False, 1.0)
    assert "hypercall returned 0 but jiffies_64 is 4294892473" in check.detail


def test_atomic_inc_on_for_the_whole_run_passes() -> None:
    [check] = check_atomic_inc_stayed_on(["ATOMIC_INC: enabled"], "send_all")
    assert check.passed and "method send_all" in check.detail


@pytest.mark.parametrize("lines, mode", [
    (["ATOMIC_INC: enabled", "ATOMIC_INC: disabled: hypercall returned -1000"], None),
    (["ATOMIC_INC: disabled: atomic_inc_jiffies=off"], "send_all"),
    ([], "local_first"),
])
def test_no_atomic_inc_check_where_the_guest_never_used_a_dsm_of_ours(lines, mode) -> None:
    """No host kvm of ours (mode None: one QEMU, where the guest's fallback is expected), or a
    guest that never switched it on."""
    assert check_atomic_inc_stayed_on(lines, mode) == []
