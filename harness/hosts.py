"""The config's hosts as SSH connections: the one place where a YAML host entry becomes a
transport's RemoteHostSpec, so the transport layer never reads the config."""

from __future__ import annotations

from typing import Callable, Iterable

from harness.config import ClusterConfig, GiantVMConfig, HostConfig
from harness.errors import HarnessError
from harness.transport.remote_host import RemoteHost, RemoteHostError, RemoteHostSpec
from harness.transport.parallel import on_hosts

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


def giantvm_of(config: ClusterConfig) -> GiantVMConfig:
    if config.giantvm is None:
        raise HarnessError(f"{config.path} does not use the GiantVM launcher (vm.launcher: "
                           "giantvm); there is no host kvm to deploy for a stock QEMU")
    return config.giantvm


def node_hosts(config: ClusterConfig) -> list[HostConfig]:
    """Each host that runs a GiantVM node, once, in the order of its first node."""
    names = dict.fromkeys(node.host for node in giantvm_of(config).nodes)
    return [config.host(name) for name in names]


def connect_node_hosts(config: ClusterConfig,
                       opener: OpenHost | None = None) -> dict[str, RemoteHost]:
    """Log in to every node's host at once; if any fails, none stays connected."""
    hosts = {host.name: (opener or open_host)(host) for host in node_hosts(config)}
    result = on_hosts(list(hosts.values()), "connect", lambda host: host.connect())
    if result.failed:
        close_hosts(hosts.values())
        raise HostsUnreachable(result.summary())
    return hosts
