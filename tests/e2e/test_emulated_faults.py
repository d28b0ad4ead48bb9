"""Faults on the emulated GiantVM cluster (issue 16): node 1's QEMU killed, the network between
the two hosts cut, and node 1's whole host frozen (a node that never answers: no reset, no
error, only silence, so the round's timeout is what ends it), while the guest runs with
ATOMIC_INC on; and a guest that asks KVM_HC_ATOMIC_INC with a bad gpa, size or offset. After a
fault, node 0's kernel logs no oops, hung task or lockup, the guest keeps running and counting
ticks with ATOMIC_INC off, the verdict says so (its "ATOMIC_INC stayed on" check fails, quoting
the guest, and every coherence check passes), and nothing is left running.

The fault is made between `up` and the probe, in this process, so the console tail and the
host logs are the ones the run itself reads. Needs GVM_EMULATED_HOST_KERNEL (Linux-DSM with
host_patches/giantvm-master, bounded waits included) and GVM_GIANTVM_QEMU, as
tests/e2e/test_emulated_hosts.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from harness import suite
from harness.backends.registry import load_config
from harness.guest_session import GuestSession
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.transport.console_log import read_log
from harness.transport.remote_host import RemoteHost, RemoteHostSpec
from tests.e2e.test_emulated_hosts import emulated_config, needs_emulated_hosts

pytestmark = [pytest.mark.e2e, needs_emulated_hosts]

FALLBACK = "ATOMIC_INC: disabled: hypercall returned -14"
KVM_EFAULT = "-14"
# Kinds of host kernel log lines (harness/backends/giantvm/lines.py) that mean the host itself
# is in trouble; "ATOMIC_INC failed" is the expected report of the fault, not trouble.
HOST_TROUBLE = {"DEADLOCK", "invalid gfn", "BUG", "WARNING", "Oops", "hung task", "lockup"}
BAD_ARGS = ("size-4", "size-huge", "offset-4", "offset-page-end", "gpa-beyond-ram", "gpa-lapic")
GUEST_FAULT = Path(__file__).resolve().parents[1] / "guest-fault"
# The nested guest took 15 minutes to boot on the 2-core machine at load 13-20 (other sessions'
# emulated hosts beside these); the config's 900 s were too few there.
BOOT_S = 3600
# no_timer_check: at that load an emulated host's 4.9 kernel once panicked in its boot-time check
# of the IO-APIC timer ("IO-APIC + timer doesn't work!"), a TCG timing artefact.
HOST_CMDLINE = "console=ttyS0 panic=-1 idle=halt loglevel=4 no_timer_check"


def left_running(tmp_path: Path) -> list[str]:
    """This test's emulated hosts still alive (their QEMU lines name files under tmp_path);
    other sessions' emulated hosts on the same machine are not this test's business."""
    result = subprocess.run(["pgrep", "-af", "gvm-emulated-host"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines()
            if str(tmp_path) in line and "pgrep" not in line]


def on_host(session: GuestSession, name: str, command: str) -> str:
    """Run a command as root on one emulated host, over its management SSH."""
    guest = session.guest
    record = next(record for record, _ in guest.hosts if record.name == name)
    spec = RemoteHostSpec(name, "127.0.0.1", port=record.ssh_port,
                          key_file=Path(guest.client_key), known_hosts=Path(guest.known_hosts))
    with RemoteHost(spec) as host:
        return host.run(command, check=True, as_root=True, timeout_s=60).stdout


def wait_for_console(session: GuestSession, text: str, timeout_s: float) -> list[str]:
    """The guest console's lines that hold `text`, once there is one."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in read_log(session.kernel_console_log).splitlines()
                 if text in line]
        if lines:
            return lines
        assert time.monotonic() < deadline, \
            f"no '{text}' on the guest console within {timeout_s:.0f}s"
        time.sleep(1)


def judged(tmp_path: Path, fault, patches: Path | None = None) -> tuple[dict, dict[str, set[str]]]:
    """up, the fault, then the probe and the verdict with the guest stopped at its end: the
    verdict and the kinds of each host's kernel log findings."""
    path = emulated_config(tmp_path, timeouts__boot_s=BOOT_S,
                           emulated_hosts__cmdline=HOST_CMDLINE)
    if patches is not None:
        data = yaml.safe_load(path.read_text())
        data["guest"]["kernel"]["patches"] = str(patches)
        path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    run = RunFolder.create(config.run_root, config.name)
    progress = Progress()
    session = suite.up(config, run, progress)
    judged_to_the_end = False
    try:
        fault(session)
        suite.probe_and_judge(session, progress, stop=True)
        judged_to_the_end = True
    finally:
        if not judged_to_the_end:
            session.close()
    verdict = json.loads(run.file("verdict.json").read_text())
    (dmesg,) = run.path.rglob("host-dmesg.json")
    findings = {host["host"]: {finding["kind"] for finding in host["findings"]}
                for host in json.loads(dmesg.read_text())}
    return verdict, findings


def guest_checks(verdict: dict) -> list[dict]:
    return [check for check in verdict["checks"] if check["transport"] != "dmesg"]


def assert_fell_back_and_kept_running(verdict: dict, findings: dict[str, set[str]]) -> None:
    context = verdict["context"]
    assert context["atomic_inc"][0] == "ATOMIC_INC: enabled"
    assert context["atomic_inc"][-1].startswith(FALLBACK), context["atomic_inc"]
    assert not context["protocol_exercised"]
    failed = [check for check in guest_checks(verdict) if not check["passed"]]
    assert [check["name"] for check in failed] == ["ATOMIC_INC stayed on"], failed
    assert failed[0]["detail"].startswith(FALLBACK), failed
    assert len(guest_checks(verdict)) > 1  # the coherence checks ran, and passed
    assert findings["emu0"] & HOST_TROUBLE == set(), findings
    assert "ATOMIC_INC failed" in findings["emu0"], findings


def judged_after_a_fall_back(tmp_path: Path, fault) -> dict:
    """judged() with a fault after which the guest must fall back and keep running; the
    verdict. Whatever happens, none of this test's emulated hosts is left running."""
    try:
        verdict, findings = judged(tmp_path, fault)
        assert_fell_back_and_kept_running(verdict, findings)
        return verdict
    finally:
        assert left_running(tmp_path) == []


def test_node_1s_qemu_killed_mid_run(tmp_path) -> None:
    def kill_node_1(session: GuestSession) -> None:
        on_host(session, "emu1", "killall -KILL qemu-system-x86_64")
        wait_for_console(session, FALLBACK, 120)

    judged_after_a_fall_back(tmp_path, kill_node_1)


def test_network_between_the_hosts_cut_mid_run(tmp_path) -> None:
    def cut(session: GuestSession) -> None:
        on_host(session, "emu0", "ip link set eth1 down")
        wait_for_console(session, FALLBACK, 120)

    judged_after_a_fall_back(tmp_path, cut)


def test_node_1s_host_frozen_mid_run_times_the_round_out(tmp_path) -> None:
    """SIGSTOP on node 1's emulated host (its QEMU process on this machine): its kernel, its
    sockets and its node stop answering at once, without a reset, as a host that hangs would.
    Node 0's round must end at kvm.atomic_inc_timeout_ms and the guest fall back; then the host
    is let go again (SIGCONT), so that the run can stop it, and its late answers and UPDATEs
    meet node 0's epoch fence."""
    def freeze_node_1(session: GuestSession) -> None:
        [pid] = [record.pid for record, _ in session.guest.hosts if record.name == "emu1"]
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for_console(session, FALLBACK, 120)
        finally:
            os.kill(pid, signal.SIGCONT)

    verdict = judged_after_a_fall_back(tmp_path, freeze_node_1)
    [dmesg] = [check for check in verdict["checks"] if check["name"] == "host kernel log of emu0"]
    assert "(timed out)" in dmesg["detail"], dmesg


def test_bad_gpa_size_and_offset_get_an_error_and_the_host_stays_up(tmp_path) -> None:
    answers: list[str] = []

    def bad_arguments(session: GuestSession) -> None:
        wait_for_console(session, "GVM-BAD-ARGS: done", 60)
        answers.extend(wait_for_console(session, "GVM-BAD-ARGS: ", 1))

    try:
        verdict, findings = judged(tmp_path, bad_arguments, patches=GUEST_FAULT)
        for case in BAD_ARGS:
            (line,) = [answer for answer in answers if f"GVM-BAD-ARGS: {case} " in answer]
            assert line.endswith(f"-> {KVM_EFAULT}"), line
        assert verdict["context"]["protocol_exercised"], verdict["context"]
        assert verdict["passed"], [check for check in verdict["checks"] if not check["passed"]]
        assert all(not kinds for kinds in findings.values()), findings
    finally:
        assert left_running(tmp_path) == []
