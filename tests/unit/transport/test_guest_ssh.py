"""SSH readiness: one deadline, fail fast when the guest is dead, no banner means not ready."""

import socket
import time
from types import SimpleNamespace
from pathlib import Path

import pytest

from harness.transport import guest_ssh
from harness.errors import BootError, GuestSSHError
from harness.transport.guest_ssh import GuestSSH, SSHTarget, wait_for_banner
from harness.transport.local_process import free_loopback_port


def target(port: int) -> SSHTarget:
    return SSHTarget("127.0.0.1", port, "root", Path("/nonexistent"), "ssh-ed25519", "AAAA")


def test_nothing_listening_gives_up_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(GuestSSHError, match=r"not ready after 2s and \d+ attempts; last: no SSH"):
        GuestSSH(target(free_loopback_port()), command_timeout_s=5).connect(timeout_s=2)
    assert time.monotonic() - started < 10


def test_dead_guest_stops_the_wait_at_once() -> None:
    def qemu_died() -> None:
        raise BootError("QEMU exited with 1")

    with pytest.raises(BootError, match="QEMU exited"):
        GuestSSH(target(free_loopback_port()), command_timeout_s=5).connect(
            timeout_s=600, still_booting=qemu_died)


def test_accepting_without_a_banner_is_not_ready() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        assert not wait_for_banner("127.0.0.1", listener.getsockname()[1], timeout_s=0.5)


def test_run_before_connect_is_an_error() -> None:
    with pytest.raises(GuestSSHError, match=r"run\(\) before connect\(\)"):
        GuestSSH(target(22), command_timeout_s=5).run("true")


def test_a_silent_forward_is_given_up_on_quickly_at_first(monkeypatch) -> None:
    """slirp accepts before sshd listens and then says nothing: short waits first, longer later."""
    clock = SimpleNamespace(now=0.0)
    waits: list[float] = []

    def silent_for_a_minute(host: str, port: int, timeout_s: float) -> bool:
        waits.append(timeout_s)
        if clock.now >= 60:
            return True
        clock.now += timeout_s
        return False

    monkeypatch.setattr(guest_ssh, "wait_for_banner", silent_for_a_minute)
    monkeypatch.setattr(guest_ssh, "random", SimpleNamespace(uniform=lambda low, high: 1.0))
    monkeypatch.setattr(guest_ssh, "time", SimpleNamespace(
        monotonic=lambda: clock.now, sleep=lambda seconds: setattr(clock, "now",
                                                                    clock.now + seconds)))
    result, attempts = guest_ssh.log_in_when_ready("127.0.0.1", 22, 600,
                                                   lambda login_timeout_s: "logged in")
    assert result == "logged in" and attempts == len(waits)
    assert waits[:3] == [0.5, 0.5, 0.5] and waits[-1] == 5.0
    assert waits == sorted(waits)
