"""The write-update model under the real spin: which variants violate which property, and why.

A change in either direction fails: an original variant that stops failing means the model lost
the bug it exists to show; a shipped one that starts failing means the protocol or the model
regressed; contract_v1 (the first contract, without the page-install rule) must keep failing, or
the model no longer sees the gap that rule closes; bounded_noepoch (timeouts and a fence without
the epoch check) must keep failing no_late_update, or the model no longer sees why the epoch is
there. N = 4 is left to the CLI (its full searches take tens of seconds).
"""

import shutil
from pathlib import Path

import pytest

from harness import modelcheck
from harness.errors import HarnessError, SetupError
from harness.modelcheck import ModelCheckResult, format_table, run_model_checks

VALUES = {"monotonic", "converge", "skew"}
# What the variants without timeouts can break (no fence, so no_late_update always holds there).
ALL = VALUES | {"no_deadlock"}
PROPERTIES = ALL | {"no_late_update"}

# (variant, page traffic) -> the properties spin must find violated, for every N checked.
EXPECTED_FAILURES = {
    ("orig_send_all", False): VALUES,
    ("orig_send_all", True): ALL,
    ("orig_update_first", False): ALL,
    ("orig_update_first", True): ALL,
    ("contract_v1_send_all", False): set(),
    ("contract_v1_local_first", False): set(),
    # The first contract's gap: an Ivy fault overwrites an applied copy with the owner's older page.
    ("contract_v1_send_all", True): VALUES,
    ("contract_v1_local_first", True): VALUES,
    ("shipped_send_all", False): set(),
    ("shipped_local_first", False): set(),
    ("shipped_send_all", True): set(),
    ("shipped_local_first", True): set(),
    # Rounds that time out, the epoch fence and the guest's fallback, as host_patches/ do now.
    ("bounded_send_all", False): set(),
    ("bounded_local_first", False): set(),
    ("bounded_send_all", True): set(),
    ("bounded_local_first", True): set(),
    # A fence that every node answers is not enough: its dsm-conn threads reorder messages.
    ("bounded_noepoch_send_all", False): {"no_late_update"},
    ("bounded_noepoch_send_all", True): {"no_late_update"},
}
NODES = (2, 3)

# (variant, page traffic, property) -> text the trail must contain: the mechanism, not just
# the verdict.
MECHANISMS = {
    ("orig_send_all", False, "monotonic"): "dsm-conn sets jiffies to UPDATE",
    ("orig_send_all", True, "no_deadlock"): "BUG_ON in dsm_handle_read_req",
    ("orig_update_first", False, "no_deadlock"): "dsm_lock of the jiffies page leaked",
    ("contract_v1_send_all", True, "converge"): "page copied in from node",
    ("contract_v1_local_first", True, "converge"): "page copied in from node",
    ("bounded_noepoch_send_all", False, "no_late_update"): "after node",
}

needs_spin = pytest.mark.skipif(
    shutil.which("spin") is None or shutil.which("gcc") is None,
    reason="spin or gcc is not installed (./gvm setup installs both)")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, ModelCheckResult]:
    """All expected combinations, checked once."""
    out_dir = tmp_path_factory.mktemp("modelcheck")
    variants = sorted({variant for variant, _ in EXPECTED_FAILURES})
    checked = run_model_checks(out_dir, variants, NODES, (False, True))
    return {(r.variant, r.nodes, r.page_traffic, r.property): r for r in checked}


@needs_spin
@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("variant,page_traffic", sorted(EXPECTED_FAILURES))
def test_verdicts_match_the_expected_matrix(results, variant, page_traffic, nodes):
    failed = {prop for prop in PROPERTIES
              if not results[(variant, nodes, page_traffic, prop)].passed}
    assert failed == EXPECTED_FAILURES[(variant, page_traffic)]


@needs_spin
def test_every_violation_has_a_readable_trail(results):
    for result in results.values():
        if result.passed:
            assert result.trail == () and result.trail_file is None
            continue
        assert result.trail[-1].startswith(f"VIOLATED {result.property}: ")
        assert any(line.startswith("tick 1 on node ") for line in result.trail)
        assert not any(line.startswith(("pan:", "proc ", "spin:")) for line in result.trail)
        assert result.trail_file.read_text().splitlines() == list(result.trail)
        assert result.states > 0


@needs_spin
@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("variant,page_traffic,prop", sorted(MECHANISMS))
def test_trails_show_the_mechanism(results, variant, page_traffic, prop, nodes):
    trail = results[(variant, nodes, page_traffic, prop)].trail
    assert any(MECHANISMS[(variant, page_traffic, prop)] in line for line in trail), trail


@needs_spin
def test_a_deadlock_trail_names_the_stuck_threads(results):
    trail = results[("orig_update_first", 2, False, "no_deadlock")].trail
    assert trail[-2].startswith("stuck forever: server")


def test_table_has_one_row_per_combination():
    def result(variant: str, prop: str, passed: bool, states: int) -> ModelCheckResult:
        return ModelCheckResult(variant=variant, nodes=2, page_traffic=True, property=prop,
                                passed=passed, states=states, seconds=1.0, trail=(),
                                trail_file=None)

    table = format_table([result("orig_send_all", "monotonic", False, 10),
                          result("orig_send_all", "no_deadlock", True, 300),
                          result("shipped_send_all", "monotonic", True, 7)])
    header, first, second = table.splitlines()
    assert header.split() == ["variant", "N", "page", "traffic", "monotonic", "converge", "skew",
                              "no_late_update", "no_deadlock", "states", "time"]
    assert first.split() == ["orig_send_all", "2", "ivy", "faults", "FAIL", "-", "-", "-", "pass",
                             "300", "2.0s"]
    assert second.split() == ["shipped_send_all", "2", "ivy", "faults", "pass", "-", "-", "-",
                              "-", "7", "1.0s"]


def test_missing_spin_asks_for_the_setup(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(modelcheck.shutil, "which",
                        lambda tool: None if tool == "spin" else "/usr/bin/" + tool)
    with pytest.raises(SetupError, match=r"spin not found.*\./gvm setup"):
        run_model_checks(tmp_path)


def test_unknown_variant_is_refused(tmp_path: Path):
    with pytest.raises(HarnessError, match="unknown model variant"):
        run_model_checks(tmp_path, ["write_update"])
