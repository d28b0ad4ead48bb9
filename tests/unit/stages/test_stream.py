"""The stream parser and reader on synthetic guest output."""

from harness.stages.coherence import check_coherence, measure_clock_bounds
from harness.stages.stream import (Drain, Reading, page_writer_command, parse_stream, read_stream,
                                   stream_command)

TEXT = """\
drain cpu=2 now_ns=1000900
cpu=0 jiffies=4294967295 before_ns=1000000 after_ns=1000010
cpu=1 jiffies=4294967296 before_ns=1000100 after_ns=1000120
cpu=3 jiffies=4294967296 before_ns=1000200 after_ns=1000230
drain cpu=0 now_ns=3000500
lost=17 cpu=1
cpu=0 jiffies=4294967296 before_ns=3000000 after_ns=3000010
cpu=2 jiffies=4294967297 before_ns=3000100 after_ns=3000110
[   12.345678] random: crng init done
cpu=1 jiffies=4294967297 before_ns=3000200 after_ns=3000230
lost=3 cpu=1
"""


def test_parses_readings_drains_and_lost_counts() -> None:
    result = parse_stream(TEXT.splitlines(), vcpus_per_node=2)
    assert result.readings[0] == Reading(0, 0, 4294967295, 1000000, 1000010)
    assert [(r.vcpu, r.node) for r in result.readings] == [(0, 0), (1, 0), (3, 1), (0, 0), (2, 1),
                                                          (1, 0)]
    assert result.drains == [Drain(2, 1, 1000900, {0: 1000010, 1: 1000120, 3: 1000230}),
                             Drain(0, 0, 3000500, {0: 3000010, 2: 3000110, 1: 3000230})]
    assert result.lost == {1: 20}
    assert result.unparsed == ["[   12.345678] random: crng init done"]
    summary = result.summary()
    assert summary["lost_total"] == 20 and summary["per_vcpu"][1]["lost"] == 20
    assert summary["per_vcpu"][0]["readings"] == 2


def test_readings_per_second_are_per_vcpu_over_guest_time() -> None:
    lines = [f"cpu={cpu} jiffies={100 + i} before_ns={i * 2_000_000} after_ns={i * 2_000_000 + 5}"
             for i in range(501) for cpu in (0, 1)]
    rates = parse_stream(lines, 1).readings_per_s()
    assert set(rates) == {0, 1} and all(abs(rate - 500) < 0.1 for rate in rates.values())


def test_drains_give_clock_bounds_between_nodes() -> None:
    result = parse_stream(TEXT.splitlines(), vcpus_per_node=2)
    clocks = measure_clock_bounds(result.readings, result.drains)
    # drained on node 1 (vCPU 2): node 0's newest reading ended 780 ns before
    assert clocks.bound(0, 1) == 1000900 - 1000120
    # drained on node 0 (vCPU 0): node 1's (vCPU 2) ended 390 ns before
    assert clocks.bound(1, 0) == 3000500 - 3000110


def test_read_stream_stops_after_the_window_and_parses_what_came() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def source():
        for i in range(1000):
            now[0] = i * 0.01                       # a line every 10 ms of host time
            yield f"cpu=0 jiffies={1000 + i} before_ns={i * 10_000_000} after_ns={i * 10_000_000 + 9}\n"

    result = read_stream(source(), duration_s=2.0, vcpus_per_node=1, clock=clock)
    assert len(result.readings) == 201 and result.host_elapsed_s == 2.0
    assert [c.name for c in check_coherence(result.readings, 100, "ssh", 50)
            if not c.passed] == []


def test_commands() -> None:
    assert stream_command() == "exec cat /proc/gvm_jiffies_stream"
    assert stream_command(1000) == ("echo 1000 > /sys/module/gvm_jiffies/parameters/stream_hz && "
                                    "exec cat /proc/gvm_jiffies_stream")
    assert stream_command(max_s=30.5) == "exec timeout -s INT 31 cat /proc/gvm_jiffies_stream"
    assert page_writer_command(100) == "echo '100' > /proc/gvm_jiffies_page_writer"
    assert page_writer_command(0) == "echo '0' > /proc/gvm_jiffies_page_writer"
    assert page_writer_command(50, vcpu=3) == "echo '50 3' > /proc/gvm_jiffies_page_writer"


COMPACT = """\
drain cpu=1 now_ns=9000000
cpu=0 jiffies=4294967295 before_ns=1000000 after_ns=1000010
+0 2000000 7
+1 2000500 12
-3 1999000 9
cpu=1 jiffies=4294967296 before_ns=1000100 after_ns=1000120
+0 2000000 20
drain cpu=0 now_ns=19000000
+1 2000000 5
cpu=0 jiffies=4294967300 before_ns=11000000 after_ns=11000010
"""


def test_delta_lines_follow_the_reading_line_before_them_and_stop_at_a_drain() -> None:
    result = parse_stream(COMPACT.splitlines(), vcpus_per_node=1)
    assert result.readings == [
        Reading(0, 0, 4294967295, 1000000, 1000010),
        Reading(0, 0, 4294967295, 3000000, 3000007),
        Reading(0, 0, 4294967296, 5000500, 5000512),
        Reading(0, 0, 4294967293, 6999500, 6999509),   # a value that went back stays what it was
        Reading(1, 1, 4294967296, 1000100, 1000120),
        Reading(1, 1, 4294967296, 3000100, 3000120),
        Reading(0, 0, 4294967300, 11000000, 11000010)]
    # a drain starts afresh: a delta before any full line has nothing to follow
    assert result.unparsed == ["+1 2000000 5"]
    assert result.drains[0] == Drain(1, 1, 9000000, {0: 6999509, 1: 3000120})
    failed = {c.name for c in check_coherence(result.readings, 250, "s", 50) if not c.passed}
    assert {"stale reads", "monotonic per vCPU"} <= failed
