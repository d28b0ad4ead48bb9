"""Probe output parsing and the fallback command."""

import pytest

from harness.transport.exec import CommandResult
from harness.errors import ProbeError
from harness.stages.probe import (JiffiesProbe, JiffiesSample, fallback_command,
                                   parse_probe_output)


def test_parses_one_row_per_vcpu_as_64_bit_with_its_clock_interval() -> None:
    text = ("cpu=1 jiffies=4294967396 before_ns=18 after_ns=20\n"
            "cpu=0 jiffies=4294967395 before_ns=10 after_ns=13\n")
    rows = parse_probe_output(text, 2)
    assert rows == [(1, 4294967396, 18, 20), (0, 4294967395, 10, 13)]
    assert [row.guest_ns for row in rows] == [19, 11]


def test_the_older_one_timestamp_format_is_both_ends_of_the_interval() -> None:
    text = "cpu=1 jiffies=4294967396 ktime_ns=20\ncpu=0 jiffies=4294967395 ktime_ns=10\n"
    assert parse_probe_output(text, 2) == [(1, 4294967396, 20, 20), (0, 4294967395, 10, 10)]


def test_a_sample_without_an_interval_gets_its_one_timestamp_as_both_ends() -> None:
    sample = JiffiesSample("ssh", "kernel-probe", 0, 0, 0, 5, guest_ns=7, host_ns=9)
    assert (sample.before_ns, sample.after_ns) == (7, 7)
    assert sample.to_dict()["after_ns"] == 7


@pytest.mark.parametrize("text, message", [
    ("cpu=0 jiffies=1 ktime_ns=1\n", r"returned vCPUs \[0\], expected 0..1"),
    ("cpu=0 jiffies=1 ktime_ns=1\ncpu=0 jiffies=1 ktime_ns=1\n", r"returned vCPUs \[0, 0\]"),
    ("cpu=0 jiffies=1 ktime_ns=1\ncpu=1 jiffies: 5\n", r"unexpected probe line 'cpu=1 jiffies: 5'"),
])
def test_bad_output_is_an_error(text: str, message: str) -> None:
    with pytest.raises(ProbeError, match=message):
        parse_probe_output(text, 2)


def test_fallback_visits_every_vcpu_with_taskset() -> None:
    command = fallback_command(4)
    assert "seq 0 3" in command and "taskset -c $c" in command and "/proc/timer_list" in command
    assert "before_ns=" in command and "after_ns=" in command


class FakeRunner:
    """Answers like a guest without the kernel probe; records what it was asked."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        self.commands.append(command)
        if command.startswith("test -r"):
            return CommandResult("", 1)
        return CommandResult("cpu=0 jiffies=5 before_ns=7 after_ns=7\n"
                             "cpu=1 jiffies=5 before_ns=9 after_ns=9", 0)


def test_probe_falls_back_and_labels_samples() -> None:
    runner = FakeRunner()
    probe = JiffiesProbe(runner, "ssh", vcpus=2, vcpus_per_node=1)
    samples = probe.sample(rounds=2, interval_s=0)
    assert probe.method == "taskset-timer_list"
    assert [(s.round, s.vcpu, s.node) for s in samples] == [(0, 0, 0), (0, 1, 1), (1, 0, 0),
                                                            (1, 1, 1)]
    assert runner.commands[1] == fallback_command(2)
    assert [(s.before_ns, s.after_ns, s.guest_ns) for s in samples[:2]] == [(7, 7, 7), (9, 9, 9)]


def test_each_round_is_counted_as_it_ends() -> None:
    done: list[int] = []
    JiffiesProbe(FakeRunner(), "ssh", vcpus=2, vcpus_per_node=1).sample(3, 0, on_round=done.append)
    assert done == [1, 2, 3]
