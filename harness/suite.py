"""The run, composed once: build the guest kernel, start the guest through its backend, wait for
it, probe it, stop it, look at the hosts' logs, judge, write the reports. The CLI, the pytest
plugin and `bochs-host --guest` all go through here, so the order rules live in one place:

- the guest is stopped before the hosts' kernel logs are read, so the DSM's shutdown lines count;
- the reports (verdict.json, verdict.txt, junit.xml, lag.png, report.html, summary.md) are
  written for every verdict, including the FAIL of a kernel under test that panicked or never
  became ready;
- a failure of the harness or its hosts is raised (the CLI exits 2), never judged.

A started guest and its session.json are session.py's; `up`, `probe` and `down` are separate
commands through it.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import paramiko

from harness.backends.base import Backend, HostLog
from harness.backends.registry import backend_for, backend_named
from harness.config import ClusterConfig
from harness.errors import GUEST_KERNEL, HarnessError, KernelUnderTestError, ProbeError
from harness.hosts import preflight_hosts
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages.guest_kernel import kernel_hz, patch_and_build
from harness.stages.judge import (STREAM, check_atomic_inc_stayed_on, check_samples,
                                  check_stream)
from harness.stages.probe import JiffiesProbe, JiffiesSample
from harness.stages.report import (RunContext, plot_lag, verdict_table, write_junit,
                                   write_run_reports)
from harness.stages.stream import STREAM_FILE, StreamResult, read_stream, stream_command
from harness.stages.verdict import CheckResult, Verdict
from harness.stages.workloads import report as report_workloads, start_commands, stop_commands
from harness.guest_session import (GuestSession, attach_session, boot_guest, start_session,
                                   wait_until_ready)
from harness.transport.console_log import read_log

STREAM_SLACK_S = 10  # the guest's `cat` and the workloads end by themselves this long after


@dataclass(frozen=True)
class Observation:
    """Everything the judge reads: each transport's round probes and the continuous stream."""

    samples: list[JiffiesSample]
    stream: StreamResult | None  # None: no stream asked for, or a guest kernel without one


def probe_guest(session: GuestSession, progress: Progress) -> Observation:
    config = session.config
    samples: list[JiffiesSample] = []
    stream = None
    with _named_by_blame(session, "ssh"):
        if config.probe.duration_s > 0:
            stream = stream_guest(session, progress)
    for transport in config.probe.transports:
        with progress.step(f"probe jiffies over {transport}: {config.probe.rounds} rounds"), \
                _named_by_blame(session, transport):
            runner = session.open_ssh() if transport == "ssh" else session.open_console()
            probe = JiffiesProbe(runner, transport, session.record.vcpus,
                                 session.record.vcpus_per_node)
            progress.say(f"    method: {probe.method}")
            samples += probe.sample(config.probe.rounds, config.probe.interval_s,
                                    on_round=_round_counter(progress, transport,
                                                            config.probe.rounds))
    session.run.write_json("samples.json", [sample.to_dict() for sample in samples])
    if stream is not None:
        session.run.write_json("stream.json", stream.to_dict())
    return Observation(samples, stream)


def _round_counter(progress: Progress, transport: str, rounds: int) -> Callable[[int], None]:
    """'round k/N over <transport>' on the progress line, timed from now."""
    started = time.monotonic()
    return lambda done: progress.status(f"round {done}/{rounds} over {transport}", started)


def stream_guest(session: GuestSession, progress: Progress) -> StreamResult | None:
    """probe.duration_s of /proc/gvm_jiffies_stream over SSH, with the workloads running."""
    config, record = session.config, session.record
    ssh = session.open_ssh()
    if ssh.run(f"test -r {STREAM_FILE}").exit_status != 0:
        progress.say(f"    no {STREAM_FILE} in this guest kernel: round probes only")
        return None
    workloads = config.probe.workloads
    seconds = config.probe.duration_s
    with progress.step(f"stream jiffies from every vCPU for {seconds:g}s over SSH"
                       f"{' with ' + ', '.join(workloads) if workloads else ''}"):
        for command in start_commands(workloads, record.vcpus, seconds + STREAM_SLACK_S):
            ssh.run(command).check(command)
        try:
            with ssh.lines(stream_command(config.probe.stream_hz or None,
                                          seconds + STREAM_SLACK_S)) as lines:
                stream = read_stream(lines, seconds, record.vcpus_per_node)
            stream.workloads = report_workloads(workloads, ssh)
        finally:
            for command in stop_commands(workloads):
                ssh.run(command)
    rates = stream.readings_per_s()
    progress.say(f"    {len(stream.readings)} readings, "
                 f"{min(rates.values(), default=0):.0f}-{max(rates.values(), default=0):.0f}/s "
                 f"per vCPU, {sum(stream.lost.values())} lost")
    return stream


@contextmanager
def _named_by_blame(session: GuestSession, transport: str) -> Iterator[None]:
    """A transport failing mid-probe: the dead guest is named first (KernelUnderTestError,
    BootError), else the transport's own error, never a raw socket error."""
    try:
        yield
    except (HarnessError, OSError, EOFError, paramiko.SSHException) as error:
        session.raise_if_dead()
        if isinstance(error, HarnessError):
            raise
        raise ProbeError(f"probing over {transport} failed while the guest still runs: "
                         f"{type(error).__name__}: {error}") from None


def host_checks(session: GuestSession, progress: Progress) -> list[CheckResult]:
    """One check per host whose kernel log the backend reads (GiantVM's); none elsewhere."""
    with progress.step("scan the hosts' kernel logs since the run began"):
        return host_log_checks(session.guest.host_logs())


def host_log_checks(logs: list[HostLog]) -> list[CheckResult]:
    """One check per host whose kernel log was read: it passes when nothing was found."""
    return [CheckResult(name=f"host kernel log of {log.host}", transport="dmesg",
                        passed=not log.problems, measured=float(len(log.problems)),
                        limit=log.looked_for, detail="; ".join(log.problems[:5]) or "clean")
            for log in logs]


def judge(observation: Observation, hz: int, config: ClusterConfig, run: RunFolder,
          host_checks: list[CheckResult] | None = None, context: RunContext | None = None,
          one_clock: bool = True) -> Verdict:
    """The verdict, written as verdict.json, verdict.txt, junit.xml and lag.png."""
    checks = list(check_samples(observation.samples, hz, config.checks, one_clock,
                                count_ticks=observation.stream is None).checks)
    if observation.stream is not None:
        checks += check_stream(observation.stream, hz, config.checks, one_clock)
    if not checks:
        checks.append(CheckResult("jiffies samples", "-", False, 0.0, "at least one reading",
                                  "no samples were taken"))
    if context is not None:
        checks += check_atomic_inc_stayed_on(context.atomic_inc, context.atomic_inc_mode)
    return write_reports(Verdict(tuple(checks + list(host_checks or ()))), config, run,
                         observation, hz, context)


def kernel_failure(error: KernelUnderTestError, config: ClusterConfig, run: RunFolder,
                   context: RunContext | None = None,
                   host_checks: list[CheckResult] | None = None) -> Verdict:
    """A kernel under test that died or never became ready is a FAIL, with its reports; the
    row names the kernel (the guest's or a host's), and the hosts' log rows say what they saw."""
    guest = error.culprit == GUEST_KERNEL
    check = CheckResult(error.culprit, "console" if guest else "dmesg", False, 1.0,
                        "no panic/Oops/BUG; reaches the ready marker" if guest else
                        "no Oops/BUG/WARNING/hung task/lockup while the guest boots", str(error))
    return write_reports(Verdict((check, *(host_checks or ()))), config, run,
                         Observation([], None), 0, context)


def write_reports(verdict: Verdict, config: ClusterConfig, run: RunFolder,
                  observation: Observation, hz: int,
                  context: RunContext | None = None) -> Verdict:
    run.write_json("verdict.json", {
        "passed": verdict.passed, "checks": [check.to_dict() for check in verdict.checks],
        "context": context.to_dict() if context is not None else None})
    write_junit(verdict, run.file("junit.xml"), f"gvm-harness.{config.name}", context,
                started=run.started_at())
    series: dict[str, list] = defaultdict(list)
    for sample in observation.samples:
        series[sample.transport].append(sample)
    if observation.stream is not None:
        series[STREAM] = list(observation.stream.readings)
    if any(series.values()):
        plot_lag(series, hz, run.file("lag.png"), config.checks.max_lag_s, verdict, context)
    run.file("verdict.txt").write_text(verdict_table(verdict, context) + "\n")
    write_run_reports(run.path, f"gvm-harness {config.name}", verdict, context)
    return verdict


def _counters(session: GuestSession) -> dict[str, dict[str, int]]:
    """The hosts' protocol counters; a host that cannot be read has none (the metrics are
    context, never a reason to fail the run)."""
    try:
        return session.guest.host_counters()
    except HarnessError:
        return {}


def host_rates(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
               seconds: float) -> dict[str, dict[str, float]]:
    """Per host and counter, how many per second over the observation."""
    return {host: {name: round((value - before.get(host, {}).get(name, value)) / seconds, 1)
                   for name, value in sorted(counters.items())}
            for host, counters in sorted(after.items()) if seconds > 0}


def run_context(session: GuestSession, observation: Observation,
                host_load: tuple[float, float],
                rates: dict[str, dict[str, float]]) -> RunContext:
    """What this run exercised, from the session, the guest's console and the readings."""
    config, record = session.config, session.record
    stream, samples = observation.stream, observation.samples
    if stream is not None and stream.readings:
        per_vcpu = min(stream.readings_per_s().values())
    else:
        span_ns = max((s.host_ns for s in samples), default=0) - \
            min((s.host_ns for s in samples), default=0)
        per_vcpu = len(samples) / record.vcpus / (span_ns / 1e9) if span_ns > 0 else 0.0
    return RunContext(
        backend=record.kind, accelerator=session.guest.accelerator, nodes=config.vm.nodes,
        vcpus=record.vcpus, atomic_inc=tuple(atomic_inc_lines(session.kernel_console_log)),
        atomic_inc_mode=backend_named(record.kind).atomic_inc_mode(config),
        host_load=host_load, workloads=stream.workloads if stream is not None else (),
        readings_per_s_per_vcpu=round(per_vcpu, 1),
        host_rates=tuple(f"{host}: " + ", ".join(f"{name} {rate:g}/s"
                                                  for name, rate in counters.items())
                         for host, counters in rates.items() if counters))


def reach_hosts(config: ClusterConfig, backend: Backend, progress: Progress) -> None:
    """Every remote host the guest runs on answers before anything is built."""
    hosts = backend.hosts_to_reach(config)
    if hosts:
        with progress.step("log in to the remote hosts before building"):
            preflight_hosts(hosts, config.path)


def build_guest(config: ClusterConfig, run: RunFolder, progress: Progress) -> tuple[Path, int]:
    """The patched guest kernel's bzImage and its CONFIG_HZ."""
    _, result = patch_and_build(config, run, progress)
    progress.say(f"    kernel {result.kernel_release}, bzImage sha256 {result.bzimage.sha256[:16]}…")
    return Path(result.bzimage.path), kernel_hz(Path(result.config.path))


def announce(session: GuestSession, progress: Progress) -> None:
    for line in atomic_inc_lines(session.kernel_console_log):
        progress.say(f"    guest says: {line}")


def up(config: ClusterConfig, run: RunFolder, progress: Progress) -> GuestSession:
    """Build, start and wait for the guest; the session is still attached."""
    reach_hosts(config, backend_for(config), progress)
    kernel, hz = build_guest(config, run, progress)
    session = boot_guest(config, kernel, hz, run, progress)
    announce(session, progress)
    return session


def run_suite(config: ClusterConfig, run: RunFolder, progress: Progress, keep: bool = False,
              backend: Backend | None = None) -> Verdict:
    """Everything, in order; `keep` leaves the guest running afterwards."""
    reach_hosts(config, backend or backend_for(config), progress)
    kernel, hz = build_guest(config, run, progress)
    return boot_and_judge(config, kernel, hz, run, progress, keep, backend)


def boot_and_judge(config: ClusterConfig, kernel: Path, hz: int, run: RunFolder,
                   progress: Progress, keep: bool = False,
                   backend: Backend | None = None) -> Verdict:
    session = start_session(config, kernel, hz, run, progress, backend=backend)
    baseline = Baseline(os.getloadavg()[0], {}, time.monotonic())
    try:
        wait_until_ready(session, progress)
    except KernelUnderTestError as failure:
        return judge_after_stop(session, progress, True, Observation([], None), baseline,
                                failure)
    except BaseException:
        session.close()
        raise
    announce(session, progress)
    return probe_and_judge(session, progress, stop=not keep)


@dataclass(frozen=True)
class Baseline:
    """This machine's load, the hosts' counters and the time as the observation began."""

    load: float
    counters: dict[str, dict[str, int]]
    started: float


def probe_and_judge(session: GuestSession, progress: Progress, stop: bool) -> Verdict:
    """Probe, then (with `stop`) stop the guest, then read the hosts' logs, then judge."""
    baseline = Baseline(os.getloadavg()[0], _counters(session), time.monotonic())
    try:
        observation = probe_guest(session, progress)
    except KernelUnderTestError as failure:
        return judge_after_stop(session, progress, stop, Observation([], None), baseline,
                                failure)
    except BaseException:
        _stop_or_leave(session, stop)
        raise
    return judge_after_stop(session, progress, stop, observation, baseline)


def _stop_or_leave(session: GuestSession, stop: bool) -> None:
    if stop:
        session.close()
    else:
        session.detach()


def judge_after_stop(session: GuestSession, progress: Progress, stop: bool,
                     observation: Observation, baseline: Baseline,
                     failure: KernelUnderTestError | None = None) -> Verdict:
    """Stop (or leave) the guest, read the hosts' logs (after the stop, so shutdown lines
    count), judge and write the reports; `failure`: a kernel under test that died. A stop that
    fails is raised only after the verdict is written: the readings are complete, and a host
    too slow to stop its nodes in time must not cost them."""
    config, run = session.config, session.run
    rates: dict[str, dict[str, float]] = {}
    if failure is None:
        rates = host_rates(baseline.counters, _counters(session),
                           time.monotonic() - baseline.started)
        run.write_json("metrics.json", rates)
    stop_error: HarnessError | None = None
    try:
        try:
            _stop_or_leave(session, stop)
        except HarnessError as error:
            stop_error = error
        context = run_context(session, observation, (baseline.load, os.getloadavg()[0]), rates)
        checks = host_checks(session, progress)
    finally:
        session.detach()
    if failure is not None:
        verdict = kernel_failure(failure, config, run, context, checks)
    else:
        verdict = judge(observation, session.record.hz, config, run, checks, context,
                        one_clock=session.guest.one_clock)
    if stop_error is not None:
        raise HarnessError(f"{stop_error}\nThe verdict was written before this "
                           f"({run.file('verdict.txt')}).") from None
    return verdict


def probe(config: ClusterConfig, run: RunFolder, progress: Progress) -> Verdict:
    """Probe and judge the guest `up` left running; it keeps running."""
    session = attach_session(config, run)
    try:
        session.raise_if_dead()
    except KernelUnderTestError as error:
        session.detach()
        return kernel_failure(error, session.config, run)
    except BaseException:
        session.detach()
        raise
    return probe_and_judge(session, progress, stop=False)


def down(config: ClusterConfig, run: RunFolder) -> GuestSession:
    session = attach_session(config, run, forwards=False)
    session.close()
    return session


def atomic_inc_lines(console_log: Path) -> list[str]:
    """The guest series' one boot line about ATOMIC_INC (empty for an unpatched kernel)."""
    return [line.strip() for line in read_log(console_log).splitlines() if "ATOMIC_INC: " in line]
