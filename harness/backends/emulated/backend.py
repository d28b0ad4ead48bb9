"""GiantVM on emulated hosts: the harness boots one QEMU TCG VM with AMD SVM per host named
`address: emulated` (machine.py), logs in to each over SSH, uploads the static GiantVM QEMU
build, and hands the hosts to the GiantVM backend as if they were CloudLab machines. Stopping
the guest stops the nodes first (their DSM shutdown lines are still in the hosts' logs), then the
hosts.

The emulated hosts run detached (their own sessions), so `up` can leave the cluster running and a
later `probe` or `down` finds it from session.json, like any other backend's guest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness.backends.base import GuestOnBootedHosts, HostLog, StartSpec
from harness.backends.emulated.emulator import probe_emulator
from harness.backends.emulated.machine import EmulatedHostLauncher, private_links
from harness.backends.giantvm.backend import GiantVMBackend
from harness.backends.giantvm.guest import GiantVMGuest
from harness.backends.emulated.config import EmulatedHostsConfig, is_emulated
from harness.backends.giantvm.config import giantvm_of
from harness.config import ClusterConfig, HostConfig
from harness.yaml_section import unexpanded
from harness.errors import BootError, HarnessError
from harness.hosts import close_hosts, log_in_to_booted_host
from harness.run_folder import RunFolder
from harness.stages import rootfs
from harness.transport.artifacts import upload_qemu_build
from harness.transport.console_log import MarkerTimeout, log_tail, read_log, wait_for_marker
from harness.transport.local_process import LocalProcess, free_loopback_port
from harness.transport.remote_host import RemoteHost, RemoteHostSpec

HOSTS_DIR = "hosts"  # in the run folder: the hosts' initramfs, keys, consoles and QEMU logs
WORK_DIR = "/tmp/gvm-harness"  # tmpfs in the hosts' initramfs
SSH_READY_S = 180.0
# The guest under nested SVM with a DSM between two emulated hosts is slow to boot and to answer.
NESTED_BOOT_S = 900.0
NESTED_SSH_S = 300.0
NESTED_COMMAND_S = 120.0


@dataclass(frozen=True)
class EmulatedHostRecord:
    name: str
    pid: int
    ssh_port: int
    console_log: str
    qemu_log: str


@dataclass(frozen=True)
class EmulatedRecord:
    """session.json's state: the hosts (found by pid), how to log in, and the cluster on them."""

    hosts: tuple[EmulatedHostRecord, ...]
    client_key: str
    known_hosts: str
    qemu_binary: str  # the uploaded GiantVM QEMU, at the same path on every host
    cluster: dict  # the GiantVM guest's ClusterRecord
    emulator_caveat: str | None  # the emulator's warning (emulator.py), None with the fix

    @classmethod
    def from_dict(cls, data: dict) -> EmulatedRecord:
        return cls(tuple(EmulatedHostRecord(**host) for host in data["hosts"]),
                   data["client_key"], data["known_hosts"], data["qemu_binary"],
                   data["cluster"], data.get("emulator_caveat"))  # absent: an older harness


def emulated_names(config: ClusterConfig) -> list[str]:
    """The emulated hosts that run nodes, in the order of their first node."""
    emulated = {host.name for host in config.hosts if is_emulated(host)}
    names = list(dict.fromkeys(node.host for node in giantvm_of(config).nodes))
    missing = [name for name in names if name not in emulated]
    if missing:
        raise HarnessError(f"{config.path}: nodes run on {', '.join(missing)}, which are not "
                           "emulated hosts; with emulated_hosts every node's host has address "
                           "'emulated'")
    return names


def private_ip(config: ClusterConfig, name: str) -> str | None:
    """The iplist address of the host's (first) node; None when its nodes use loopback."""
    ip = next(node.ip for node in giantvm_of(config).nodes if node.host == name)
    return None if ip.startswith("127.") else ip


def hosts_as_booted(config: ClusterConfig, record: EmulatedRecord) -> ClusterConfig:
    """`config` with each emulated host as the SSH endpoint it is now, and the uploaded QEMU."""
    booted = {host.name: HostConfig(name=host.name, address="127.0.0.1", user="root",
                                    port=host.ssh_port, key_file=Path(record.client_key),
                                    work_dir=WORK_DIR, known_hosts=Path(record.known_hosts))
              for host in record.hosts}
    hosts = tuple(booted.get(host.name, host) for host in config.hosts)
    return replace(config, hosts=hosts, vm=replace(config.vm, qemu_binary=record.qemu_binary))


@dataclass
class EmulatedGuest(GuestOnBootedHosts):
    """The GiantVM guest and the emulated hosts under it."""

    hosts: list[tuple[EmulatedHostRecord, LocalProcess]]
    guest: GiantVMGuest
    client_key: str
    known_hosts: str
    qemu_binary: str
    emulator_caveat: str | None
    final_logs: list[HostLog] | None = None  # read as the hosts were stopped

    @property
    def pid(self) -> int:
        return self.hosts[0][1].pid

    def exit_status(self) -> int | None:
        """A dead emulated host ends the guest too: its status, else the nodes'."""
        for _, process in self.hosts:
            status = process.exit_status()
            if status is not None:
                return status
        return self.guest.exit_status()

    def qemu_log_tail(self, lines: int = 10) -> str:
        consoles = "\n".join(f"emulated host {record.name}'s console:\n"
                             f"{log_tail(read_log(Path(record.console_log)), lines)}"
                             for record, _ in self.hosts)
        return f"{self.guest.qemu_log_tail(lines)}\n{consoles}"

    def record(self) -> EmulatedRecord:
        return EmulatedRecord(tuple(record for record, _ in self.hosts), self.client_key,
                              self.known_hosts, self.qemu_binary, asdict(self.guest.record()),
                              self.emulator_caveat)

    def platform_caveat(self) -> str | None:
        return self.emulator_caveat

    def stop_machines(self) -> None:
        """The hosts' kernel logs are read first: after the nodes stopped (so their DSM shutdown
        lines count) and before the hosts that hold them are gone."""
        if self.final_logs is None:
            try:
                self.final_logs = self.guest.host_logs()
            except HarnessError as error:
                self.final_logs = [HostLog(record.name, "the host's kernel log",
                                           (f"unreadable: {error}",))
                                   for record, _ in self.hosts]
        for _, process in self.hosts:
            process.stop()

    def host_logs(self) -> list[HostLog]:
        return self.final_logs if self.final_logs is not None else self.guest.host_logs()

    def detach(self) -> None:
        self.guest.detach()
        for _, process in self.hosts:
            process.untether()


@dataclass(frozen=True)
class EmulatedBackend:
    kind = "emulated"

    def wants(self, config: ClusterConfig) -> bool:
        return config.section(EmulatedHostsConfig) is not None

    def judged_config(self, config: ClusterConfig) -> ClusterConfig:
        """SSH only (dropbear on the hosts forwards no unix socket, so node 0's ttyS1 stays out
        of reach) and the longer timeouts of a nested guest."""
        timeouts = replace(config.timeouts, boot_s=max(config.timeouts.boot_s, NESTED_BOOT_S),
                           ssh_s=max(config.timeouts.ssh_s, NESTED_SSH_S),
                           command_s=max(config.timeouts.command_s, NESTED_COMMAND_S))
        return replace(config, probe=replace(config.probe, transports=("ssh",)),
                       timeouts=timeouts)

    def hosts_to_reach(self, config: ClusterConfig) -> list[HostConfig]:
        return []  # booted by the run

    def atomic_inc_mode(self, config: ClusterConfig) -> str | None:
        return GiantVMBackend().atomic_inc_mode(config)

    def start(self, spec: StartSpec) -> EmulatedGuest:
        config, progress = spec.config, spec.progress
        emulated = _required(config)
        names = emulated_names(config)
        host_dir = spec.run.path / HOSTS_DIR
        emulator = probe_emulator(emulated.emulator)
        warning = emulator.warning()
        if warning is not None:
            progress.say(f"warning: {warning}")
        with progress.step("build the emulated hosts' initramfs (busybox, dropbear, keys)"):
            initramfs = rootfs.build_initramfs(host_dir)
        links = private_links(len(names), [free_loopback_port(udp=True) for _ in names]) \
            if any(private_ip(config, name) for name in names) else [None] * len(names)
        launchers = [EmulatedHostLauncher(
            index=index, qemu_binary=emulator.binary, kernel=emulated.kernel,
            initrd=initramfs.path, cmdline=emulated.cmdline, cpus=emulated.cpus,
            memory_mb=emulated.memory_mb,
            ssh_port=free_loopback_port(), private_ip=private_ip(config, name), link=link,
            run_dir=host_dir) for index, (name, link) in enumerate(zip(names, links))]
        spec.run.write_json("emulated-hosts.json", {
            "hosts": names, "emulator": emulator.version,
            "emulator_has_injection_fix": emulator.has_injection_fix,
            "command_lines": [launcher.command_line() for launcher in launchers]})
        started: list[tuple[EmulatedHostRecord, LocalProcess]] = []
        remotes: list[RemoteHost] = []
        try:
            for name, launcher in zip(names, launchers):  # all boot at once
                process = _start(launcher)
                started.append((EmulatedHostRecord(name, process.pid, launcher.ssh_port,
                                                   str(launcher.console_log),
                                                   str(launcher.qemu_log)), process))
            for record, process in started:
                remotes.append(self._log_in(record, process, initramfs, emulated, progress))
            with progress.step(f"upload the GiantVM QEMU in {emulated.qemu_tree} to "
                               f"{len(remotes)} emulated hosts"):
                qemu_binary = [upload_qemu_build(remote, emulated.qemu_tree)
                               for remote in remotes][0]
            close_hosts(remotes)
            partial = EmulatedRecord(tuple(record for record, _ in started),
                                     str(initramfs.credentials.client_key),
                                     str(host_dir / "keys" / "known_hosts"), qemu_binary, {},
                                     warning)
            guest = GiantVMBackend().start(replace(spec,
                                                   config=hosts_as_booted(config, partial)))
        except BaseException:
            close_hosts(remotes)
            for _, process in started:
                process.stop()
            raise
        return EmulatedGuest(started, guest, partial.client_key, partial.known_hosts,
                             qemu_binary, warning)

    def _log_in(self, record: EmulatedHostRecord, process: LocalProcess,
                initramfs: rootfs.Initramfs, emulated: EmulatedHostsConfig,
                progress) -> RemoteHost:
        def check() -> None:
            status = process.exit_status()
            if status is not None:
                raise BootError(f"emulated host {record.name}'s QEMU exited with {status}: "
                                f"{process.log_tail()}; console: {record.console_log}")

        with progress.step(f"boot emulated host {record.name} (console: {record.console_log})"):
            try:
                wait_for_marker(Path(record.console_log), rootfs.READY_MARKER,
                                emulated.boot_timeout_s, check)
            except MarkerTimeout as timeout:
                raise BootError(f"emulated host {record.name} did not reach the ready marker "
                                f"within {emulated.boot_timeout_s:.0f}s; last lines: "
                                f"{timeout.tail}") from None
        credentials = initramfs.credentials
        spec = RemoteHostSpec(record.name, "127.0.0.1", port=record.ssh_port,
                              key_file=credentials.client_key,
                              known_hosts=initramfs.path.parent / "keys" / "known_hosts",
                              work_dir=WORK_DIR)
        with progress.step(f"SSH into emulated host {record.name}"):
            return log_in_to_booted_host(spec, (credentials.host_key_type,
                                                credentials.host_key_base64),
                                         SSH_READY_S, check)

    def attach(self, config: ClusterConfig, run: RunFolder, record: dict,
               forwards: bool) -> EmulatedGuest:
        saved = EmulatedRecord.from_dict(record)
        hosts = [(host, LocalProcess(host.pid, Path(host.qemu_log))) for host in saved.hosts]
        guest = GiantVMBackend().attach(hosts_as_booted(config, saved), run, saved.cluster,
                                        forwards)
        return EmulatedGuest(hosts, guest, saved.client_key, saved.known_hosts,
                             saved.qemu_binary, saved.emulator_caveat)


def _start(launcher: EmulatedHostLauncher) -> LocalProcess:
    try:
        return launcher.start()
    except FileNotFoundError:
        raise BootError(f"{launcher.qemu_binary} is not installed; run ./gvm setup") from None


def _required(config: ClusterConfig) -> EmulatedHostsConfig:
    emulated = config.section(EmulatedHostsConfig)
    assert emulated is not None
    for what, path in (("kernel", emulated.kernel), ("qemu_tree", emulated.qemu_tree)):
        variable = unexpanded(path)
        if variable is not None:
            raise HarnessError(f"{config.path}: emulated_hosts.{what} names {variable}, which is "
                               "not set; export it with the path of the build "
                               "(docs/emulated-hosts.md)")
        if not path.exists():
            raise HarnessError(f"{config.path}: emulated_hosts.{what} {path} does not exist; "
                               "build it first (docs/emulated-hosts.md)")
    return emulated
