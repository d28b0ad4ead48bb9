"""The guest series on the real 6.1 tree: applied by the harness, built, booted under QEMU with
ATOMIC_INC asked for and not asked for. Off KVM (or on a KVM host without the host series) the
patched kernel must keep time exactly like an unpatched one."""


import pytest

from harness import guest_session, suite
from harness.stages.judge import check_samples
from harness.stages.patches import SeriesState
from harness.stages.probe import KERNEL_PROBE, JiffiesProbe, parse_probe_output

pytestmark = pytest.mark.e2e


def atomic_inc_lines(session: guest_session.GuestSession) -> list[str]:
    return suite.atomic_inc_lines(session.kernel_console_log)


def test_series_for_the_tree_is_applied(guest_kernel) -> None:
    prepared = guest_kernel.prepared
    assert prepared.series is not None and prepared.series.directory.name == "linux-6.1"
    assert prepared.series.status(prepared.tree).state is SeriesState.APPLIED
    assert (prepared.tree / "kernel/time/timekeeping.c").read_text().count("KVM_HC_ATOMIC_INC")


def expected_reason(session: guest_session.GuestSession, asked: bool) -> str:
    if not asked:
        return "ATOMIC_INC: disabled: atomic_inc_jiffies=off"
    if session.guest.accelerator == "tcg":
        return "ATOMIC_INC: disabled: not running on KVM"
    return "ATOMIC_INC: "


@pytest.mark.parametrize("asked", [True, False], ids=["atomic_inc_on", "atomic_inc_off"])
def test_boot_line_probe_and_tick_rate(asked, boot_guest, cluster, cluster_config) -> None:
    if asked:
        session = cluster
        assert "atomic_inc_jiffies=on" in cluster_config.guest.cmdline
    else:
        session = boot_guest(cluster_config.guest.cmdline.replace(
            "atomic_inc_jiffies=on", "atomic_inc_jiffies=off"))
    lines = atomic_inc_lines(session)
    assert len(lines) == 1, lines
    assert expected_reason(session, asked) in lines[0]

    ssh = session.open_ssh()
    rows = parse_probe_output(ssh.run(f"cat {KERNEL_PROBE}").check("probe"),
                              cluster_config.vm.vcpus)
    assert len(rows) == cluster_config.vm.vcpus

    probe = JiffiesProbe(ssh, "ssh", cluster_config.vm.vcpus, cluster_config.vm.vcpus_per_node)
    assert probe.method == "kernel-probe"
    samples = probe.sample(rounds=10, interval_s=0.3)
    verdict = check_samples(samples, session.record.hz, cluster_config.checks)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]
    assert session.record.hz == 250
