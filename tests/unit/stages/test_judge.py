"""The checker on synthetic samples: a healthy guest passes, each kind of fault fails its check."""

from dataclasses import replace

import pytest

from harness.stages.judge import check_samples
from harness.config import CheckConfig
from harness.stages.probe import JiffiesSample

HZ = 250
LIMITS = CheckConfig(max_skew_ticks=2, max_node_skew_ticks=2, rate_tolerance=0.05)
INITIAL_JIFFIES = 2**32 - 300 * HZ


def healthy(rounds: int = 10, vcpus: int = 4, per_node: int = 2) -> list[JiffiesSample]:
    """Reads 0.25 s apart, each vCPU 7 ms after the previous one, jiffies exactly at HZ."""
    samples = []
    for round_index in range(rounds):
        for vcpu in range(vcpus):
            guest_ns = 2_000_000_000 + round_index * 250_000_000 + vcpu * 7_000_000
            samples.append(JiffiesSample(
                transport="ssh", method="kernel-probe", round=round_index, vcpu=vcpu,
                node=vcpu // per_node, jiffies=INITIAL_JIFFIES + guest_ns * HZ // 10**9,
                guest_ns=guest_ns, host_ns=10**12 + guest_ns))
    return samples


def failed(samples: list[JiffiesSample]) -> set[str]:
    return {check.name for check in check_samples(samples, HZ, LIMITS).checks if not check.passed}


def test_healthy_guest_passes_every_check() -> None:
    verdict = check_samples(healthy(), HZ, LIMITS)
    assert verdict.passed
    assert {c.name for c in verdict.checks} == {
        "monotonic per vCPU", "cross-vCPU skew", "cross-node skew", "rate vs guest clock",
        "rate vs host clock"}


def test_values_past_2_to_the_32_are_fine() -> None:
    samples = [replace(s, jiffies=s.jiffies + 2**32) for s in healthy()]
    assert check_samples(samples, HZ, LIMITS).passed


def test_vcpu_that_goes_backwards_fails_monotonic() -> None:
    samples = [replace(s, jiffies=s.jiffies - 100) if (s.vcpu, s.round) == (2, 6) else s
               for s in healthy()]
    assert "monotonic per vCPU" in failed(samples)
    verdict = check_samples(samples, HZ, LIMITS)
    detail = next(c.detail for c in verdict.checks if c.name == "monotonic per vCPU")
    assert "vCPU 2" in detail and "round 6" in detail


def test_skewed_vcpu_fails_cross_vcpu_skew() -> None:
    samples = [replace(s, jiffies=s.jiffies + 5) if s.vcpu == 3 else s for s in healthy()]
    assert "cross-vCPU skew" in failed(samples)
    assert not {"monotonic per vCPU", "rate vs guest clock"} & failed(samples)


def test_skewed_node_fails_cross_node_skew() -> None:
    samples = [replace(s, jiffies=s.jiffies + 4) if s.node == 1 else s for s in healthy()]
    assert "cross-node skew" in failed(samples)


def test_one_tick_of_jitter_is_tolerated() -> None:
    samples = [replace(s, jiffies=s.jiffies + (s.round + s.vcpu) % 2) for s in healthy()]
    assert check_samples(samples, HZ, LIMITS).passed


def test_frozen_jiffies_fails_both_rates() -> None:
    samples = [replace(s, jiffies=INITIAL_JIFFIES) for s in healthy()]
    assert {"rate vs guest clock", "rate vs host clock"} <= failed(samples)


def test_frozen_guest_and_jiffies_fails_host_rate() -> None:
    samples = [replace(s, jiffies=INITIAL_JIFFIES, guest_ns=5 * 10**9) for s in healthy()]
    assert "rate vs host clock" in failed(samples)


@pytest.mark.parametrize("factor", [0.5, 1.2])
def test_wrong_tick_rate_fails(factor: float) -> None:
    samples = [replace(s, jiffies=INITIAL_JIFFIES + int(s.guest_ns * HZ * factor // 10**9))
               for s in healthy()]
    assert {"rate vs guest clock", "rate vs host clock"} <= failed(samples)


def test_a_host_clock_not_tied_to_the_guest_is_left_out_when_asked() -> None:
    """An emulated host: its guest's clock runs at its own pace against this machine's."""
    samples = [replace(s, host_ns=10**12 + s.guest_ns * 2 // 3) for s in healthy()]
    assert failed(samples) == {"rate vs host clock"}
    verdict = check_samples(samples, HZ, replace(LIMITS, rate_vs_host_clock=False))
    assert verdict.passed and "rate vs host clock" not in {c.name for c in verdict.checks}


def test_single_node_has_no_node_check() -> None:
    samples = healthy(per_node=4)
    assert "cross-node skew" not in {c.name for c in check_samples(samples, HZ, LIMITS).checks}


def test_each_transport_is_checked_on_its_own() -> None:
    serial = [replace(s, transport="serial", jiffies=s.jiffies + (7 if s.vcpu == 0 else 0))
              for s in healthy()]
    verdict = check_samples(healthy() + serial, HZ, LIMITS)
    failures = {(c.transport, c.name) for c in verdict.checks if not c.passed}
    assert ("serial", "cross-vCPU skew") in failures
    assert {transport for transport, _ in failures} == {"serial"}


def test_no_samples_is_not_a_pass() -> None:
    assert not check_samples([], HZ, LIMITS).passed
