"""The guest series' continuous sampler, page writer and tick mover on the real guest, over SSH."""

import time

import pytest

from harness.stages.coherence import ClockBounds, check_coherence, measure_clock_bounds
from harness.stages.stream import (PAGE_WRITER_FILE, STREAM_FILE, page_writer_command, read_stream, stream_command)
from harness.stages.workloads import (TICK_MOVER_FILE, TickMoverState, start_commands, stop_commands,
                                      tick_mover_command)

pytestmark = pytest.mark.e2e


def stream(guest_ssh, seconds: float, vcpus_per_node: int, rate: int | None = None):
    with guest_ssh.lines(stream_command(rate, seconds + 10)) as lines:
        return read_stream(lines, seconds, vcpus_per_node)


def test_stream_samples_every_vcpu_at_least_hz_times_a_second_coherently(
        cluster, cluster_config, guest_ssh) -> None:
    hz = cluster.record.hz
    result = stream(guest_ssh, 8, cluster.record.vcpus_per_node)
    rates = result.readings_per_s()
    assert set(rates) == set(range(cluster_config.vm.vcpus)), result.summary()
    assert min(rates.values()) >= hz, result.summary()
    assert result.drains and not result.unparsed, result.summary()
    clocks = ClockBounds.one_clock({r.node for r in result.readings})   # one QEMU, one clock
    checks = check_coherence(result.readings, hz, "ssh-stream", hz, clocks)   # lag bound: 1 s
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    # the drains bound the (here identical) clocks of the config's nodes within a few ms
    measured = measure_clock_bounds(result.readings, result.drains)
    assert all(0 <= bound < 50_000_000 for bound in measured.ahead.values()), measured


def test_closing_the_stream_stops_it_and_one_reader_at_a_time(cluster, guest_ssh) -> None:
    with guest_ssh.lines(stream_command()) as lines:
        next(iter(lines))
        busy = guest_ssh.run(f"cat {STREAM_FILE}")
        assert busy.exit_status != 0 and "busy" in busy.output.lower()
    time.sleep(1)
    again = stream(guest_ssh, 1, cluster.record.vcpus_per_node)
    assert again.readings


def test_page_writer_writes_without_changing_jiffies(cluster, guest_ssh) -> None:
    assert guest_ssh.run(page_writer_command(1000)).exit_status == 0
    try:
        state = guest_ssh.run(f"cat {PAGE_WRITER_FILE}").check("writer")
        assert state.startswith("period_us=1000 cpu=-1 writes=")
        result = stream(guest_ssh, 5, cluster.record.vcpus_per_node)
        hz = cluster.record.hz
        checks = check_coherence(result.readings, hz, "ssh-stream", hz,   # lag bound: 1 s
                                 ClockBounds.one_clock({r.node for r in result.readings}))
        assert all(c.passed for c in checks), [c for c in checks if not c.passed]
        writes = int(guest_ssh.run(f"cat {PAGE_WRITER_FILE}").check("writer").split("writes=")[1])
        assert writes > 500
    finally:
        assert guest_ssh.run(page_writer_command(0)).exit_status == 0
    assert guest_ssh.run(f"cat {PAGE_WRITER_FILE}").check("w").startswith("period_us=0 cpu=-1")
    assert guest_ssh.run(page_writer_command(5)).exit_status != 0      # below 10 us: refused


def test_tick_mover_hands_the_tick_to_every_vcpu_and_jiffies_stay_coherent(
        cluster, cluster_config, guest_ssh) -> None:
    vcpus = cluster_config.vm.vcpus
    # busy vCPUs: an idle vCPU drops the duty at its next idle entry, even while the stream's
    # timers fire (measured idle: kept 0-2 of ~44 turns a vCPU; busy: every turn)
    for command in start_commands(("cpu-hog",), vcpus, 30):
        assert guest_ssh.run(command).exit_status == 0
    assert guest_ssh.run(tick_mover_command(20_000, 30)).exit_status == 0
    try:
        result = stream(guest_ssh, 5, cluster.record.vcpus_per_node)
        hz = cluster.record.hz
        checks = check_coherence(result.readings, hz, "ssh-stream", hz,   # lag bound: 1 s
                                 ClockBounds.one_clock({r.node for r in result.readings}))
        assert all(c.passed for c in checks), [c for c in checks if not c.passed]
        state_text = guest_ssh.run(f"cat {TICK_MOVER_FILE}").check("mover")
        state = TickMoverState.parse(state_text)
        assert state is not None, state_text
        every_vcpu = set(range(vcpus))
        assert set(state.took) == every_vcpu and min(state.took.values()) > 0, state
        assert set(state.kept_by()) == every_vcpu, state   # every vCPU's own ticks advanced jiffies
        assert state.moves > 100, state
    finally:
        assert guest_ssh.run(tick_mover_command(0)).exit_status == 0
        for command in stop_commands(("cpu-hog",)):
            guest_ssh.run(command).check("stopping the cpu hog")
    assert guest_ssh.run(f"cat {TICK_MOVER_FILE}").check("m").startswith("period_us=0 moves=")
    assert guest_ssh.run(tick_mover_command(50)).exit_status != 0      # below 100 us: refused
