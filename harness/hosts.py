"""The config's hosts as SSH connections: the one place where a YAML host entry becomes a
transport's RemoteHostSpec, so the transport layer never reads the config."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Iterable

from harness.config import HostConfig
from harness.transport.guest_ssh import LoginNotYet, SSHNotReady, log_in_when_ready
from harness.transport.parallel import on_hosts
from harness.transport.remote_host import (HostKeyError, HostUnreachable, RemoteHost,
                                           RemoteHostError, RemoteHostSpec)

OpenHost = Callable[[HostConfig], RemoteHost]


class HostsUnreachable(RemoteHostError):
    """Not every host could be logged in to; none stays connected. The message lists each."""


def host_spec(host: HostConfig) -> RemoteHostSpec:
    """The spec a config's host entry describes, with its own key policy and sudo."""
    return RemoteHostSpec(name=host.name, address=host.address, user=host.user, port=host.port,
                          key_file=host.key_file, known_hosts=host.known_hosts,
                          trust_on_first_use=host.trust_on_first_use, sudo=host.sudo,
                          work_dir=host.work_dir)


def open_host(host: HostConfig) -> RemoteHost:
    """A RemoteHost for the entry, not yet connected."""
    return RemoteHost(host_spec(host))


def connect_host(host: HostConfig) -> RemoteHost:
    return open_host(host).connect()


def close_hosts(hosts: Iterable[RemoteHost]) -> None:
    for host in hosts:
        host.close()


def connect_hosts(configs: list[HostConfig],
                  opener: OpenHost | None = None) -> dict[str, RemoteHost]:
    """Log in to every host at once; if any fails, none stays connected."""
    hosts = {host.name: (opener or open_host)(host) for host in configs}
    result = on_hosts(list(hosts.values()), "connect", lambda host: host.connect())
    if result.failed:
        close_hosts(hosts.values())
        raise HostsUnreachable(result.summary())
    return hosts


def preflight_hosts(configs: list[HostConfig], source: Path,
                    opener: OpenHost | None = None) -> None:
    """Log in to every host at once and check its work_dir can be written, before minutes of
    patching and building; HostsUnreachable lists every host that failed with its own fix (a
    changed host key: the `ssh-keygen -R` line to run). `source`: the config that names them."""
    hosts = [(opener or open_host)(host) for host in configs]

    def check(host: RemoteHost) -> None:
        with host:
            work_dir = shlex.quote(host.spec.work_dir)
            result = host.run(f"mkdir -p {work_dir} && test -w {work_dir}")
            if result.exit_status != 0:
                raise RemoteHostError(f"{host.spec.where}: its work_dir {host.spec.work_dir} "
                                      f"cannot be made or written by {host.spec.user} "
                                      f"({result.stderr.strip() or 'not writable'}); change "
                                      "work_dir in the config or its owner on the host")

    result = on_hosts(hosts, "reach the hosts before building", check)
    if result.failed:
        raise HostsUnreachable(f"{result.summary()}\nnothing was built or started: fix the "
                               f"hosts above or {source}, then run again")


def log_in_to_booted_host(spec: RemoteHostSpec, host_key: tuple[str, str], timeout_s: float,
                          still_booting: Callable[[], None]) -> RemoteHost:
    """SSH into a machine the harness booted itself (a Bochs or emulated host), whose sshd may
    not answer yet: its host key (type, base64) is pinned in spec.known_hosts first, then login is
    retried with backoff until `timeout_s`; `still_booting` raises if the machine died."""
    key_type, key_base64 = host_key
    with spec.known_hosts.open("a") as known_hosts:  # one file may pin several booted hosts
        known_hosts.write(f"[{spec.address}]:{spec.port} {key_type} {key_base64}\n")
    remote = RemoteHost(spec)

    def attempt(_login_timeout_s: float) -> RemoteHost:
        try:
            return remote.connect()
        except HostKeyError:
            remote.close()
            raise
        except RemoteHostError as error:
            remote.close()
            raise LoginNotYet(str(error)) from None

    try:
        # user-mode networking accepts at once and closes while nothing listens: the banner
        # wait covers it
        log_in_when_ready(spec.address, spec.port, timeout_s, attempt, still_booting)
    except SSHNotReady as error:
        raise HostUnreachable(f"no SSH on {spec.address}:{spec.port} ({spec.name}'s port 22) "
                              f"within {timeout_s:.0f}s: {error.last_error}") from None
    return remote
