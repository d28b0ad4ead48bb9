"""The pipeline: patch → build → boot → probe → verdict. Each stage is one function the CLI and the
pytest plugin call; transports (console, SSH) and launchers do the work underneath.

A booted guest is described by `session.json` in its run folder, so `up`, `probe` and `down` can be
separate commands: a later command reattaches to the QEMU that `up` left running.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness.backends.giantvm import backend as giantvm_pipeline
from harness.stages import rootfs
from harness.stages.build import KernelBuildResult, KernelBuildSpec, build_kernel, read_config_options
from harness.stages.cache_lock import cache_lock
from harness.stages.judge import CheckResult, Verdict, check_samples
from harness.config import ClusterConfig, HostConfig
from harness.transport.serial_console import SerialConsole
from harness.errors import BootError, HarnessError
from harness.transport.guest_ssh import GuestSSH, SSHTarget
from harness.stages.kernel_source import KernelVersion, kernel_version, resolve_tree, select_series
from harness.backends.base import BootSpec, GuestEndpoints
from harness.backends.accel import choose_accelerator
from harness.backends.giantvm.cluster import GiantVMGuest
from harness.backends.local_qemu import QemuGuest, QemuLauncher, free_loopback_port
from harness.backends.remote_qemu import (RemoteGuestState, RemoteQemuGuest, RemoteQemuLauncher,
                                        free_remote_port)
from harness.stages.patches import ApplyOutcome, PatchSeries
from harness.stages.probe import JiffiesProbe, JiffiesSample
from harness.transport.remote_host import RemoteHost, RemoteHostSpec
from harness.progress import Progress
from harness.stages.report import plot_skew, verdict_table, write_junit
from harness.run_folder import RunFolder

SERIES_FRAGMENT = "kconfig.fragment"
FATAL_CONSOLE = re.compile(r"Kernel panic - not syncing|^\s*BUG: |Oops: |general protection fault",
                           re.M)
SESSION_FILE = "session.json"


@dataclass(frozen=True)
class PreparedTree:
    tree: Path
    version: KernelVersion
    series: PatchSeries | None
    outcome: ApplyOutcome | None


def guest_series(config: ClusterConfig,
                 progress: Progress) -> tuple[Path, KernelVersion, PatchSeries | None]:
    """The guest tree, its version and the series that fits it (None if none is configured)."""
    tree = resolve_tree(config.guest.kernel.source, config.cache_dir, progress)
    version = kernel_version(tree)
    if config.guest.kernel.patches is None:
        return tree, version, None
    return tree, version, select_series(config.guest.kernel.patches, version)


def apply_series(series: PatchSeries, tree: Path, what: str, progress: Progress) -> ApplyOutcome:
    with progress.step(f"apply {series.directory.name} ({len(series.patches)} patches) to {what}"):
        outcome = series.apply(tree)
    progress.say(f"    {'already applied' if outcome.already_applied else 'applied'}: "
                 f"{', '.join(series.names) or '(empty series)'}")
    return outcome


def prepare_guest_tree(config: ClusterConfig, progress: Progress) -> PreparedTree:
    tree, version, series = guest_series(config, progress)
    if series is None:
        return PreparedTree(tree, version, None, None)
    return PreparedTree(tree, version, series,
                        apply_series(series, tree, f"Linux {version}", progress))


def build_guest_kernel(config: ClusterConfig, prepared: PreparedTree, run: RunFolder,
                       progress: Progress) -> KernelBuildResult:
    kernel = config.guest.kernel
    fragments = kernel.fragments
    if prepared.series and (prepared.series.directory / SERIES_FRAGMENT).is_file():
        fragments += (prepared.series.directory / SERIES_FRAGMENT,)
    spec = KernelBuildSpec(
        tree=prepared.tree, build_dir=config.cache_dir / "build" /
        f"{prepared.tree.name}-{kernel.base_config}", base_config=kernel.base_config,
        fragments=fragments, jobs=kernel.make_jobs, ccache_dir=config.cache_dir / "ccache")
    result = build_kernel(spec, run.file("build.log"), progress)
    run.write_json("build.json", {**result.to_dict(), "tree": str(prepared.tree),
                                  "version": str(prepared.version),
                                  "series": list(prepared.series.names) if prepared.series else [],
                                  "fragments": [str(f) for f in fragments]})
    return result


def patch_and_build(config: ClusterConfig, run: RunFolder,
                    progress: Progress) -> tuple[PreparedTree, KernelBuildResult]:
    """The guest kernel with the series applied, built while no other run touches the cache."""
    with cache_lock(config.cache_dir, progress):
        prepared = prepare_guest_tree(config, progress)
        return prepared, build_guest_kernel(config, prepared, run, progress)


def kernel_hz(config_file: Path) -> int:
    hz = read_config_options(config_file.read_text()).get("CONFIG_HZ")
    if hz is None:
        raise HarnessError(f"{config_file} has no CONFIG_HZ; cannot judge the tick rate")
    return int(hz)


@dataclass(frozen=True)
class SessionRecord:
    """What a later command needs to reattach to a running guest."""

    pid: int
    accelerator: str
    kernel_console_log: str
    shell_socket: str
    ssh_port: int
    root_password: str
    client_key: str
    host_key_type: str
    host_key_base64: str
    vcpus: int
    vcpus_per_node: int
    hz: int
    host: str = "local"
    remote: dict | None = None  # RemoteGuestState of a guest on a remote host
    cluster: dict | None = None  # giantvm_pipeline.ClusterState of a GiantVM guest


class GuestSession:
    """A booted guest with its console and SSH connections; `close` stops QEMU too."""

    def __init__(self, record: SessionRecord, guest: QemuGuest | RemoteQemuGuest | GiantVMGuest,
                 run: RunFolder, command_timeout_s: float):
        self.record = record
        self.guest = guest
        self.run = run
        self.command_timeout_s = command_timeout_s
        self.console: SerialConsole | None = None
        self.ssh: GuestSSH | None = None

    def open_console(self, timeout_s: float) -> SerialConsole:
        if self.console is None:
            console = SerialConsole(Path(self.record.shell_socket),
                                    self.run.file("console-shell.log"), self.command_timeout_s)
            console.login("root", self.record.root_password, timeout_s)
            self.console = console
        return self.console

    def open_ssh(self, timeout_s: float) -> GuestSSH:
        if self.ssh is None:
            ssh = GuestSSH(SSHTarget("127.0.0.1", self.record.ssh_port, "root",
                                     Path(self.record.client_key), self.record.host_key_type,
                                     self.record.host_key_base64), self.command_timeout_s)
            ssh.connect(timeout_s, still_booting=self.raise_if_dead)
            self.ssh = ssh
        return self.ssh

    def raise_if_dead(self) -> None:
        status = self.guest.exit_status()
        if status is not None:
            raise BootError(f"QEMU exited with {status}; {self.guest.qemu_log_tail()}; "
                            f"kernel console: {self.record.kernel_console_log}")
        match = FATAL_CONSOLE.search(_read(Path(self.record.kernel_console_log)))
        if match:
            raise BootError(f"the guest kernel failed: '{match.group(0).strip()}'; see "
                            f"{self.record.kernel_console_log}")

    def disconnect(self) -> None:
        for connection in (self.console, self.ssh):
            if connection is not None:
                connection.close()
        self.console = self.ssh = None

    def detach(self) -> None:
        """Let go of the guest but leave it running, for a later `probe` or `down`."""
        self.disconnect()
        self.guest.detach()

    def close(self) -> None:
        self.disconnect()
        try:
            self.guest.stop()
        finally:
            self.guest.detach()


def boot_timeout(config: ClusterConfig, accelerator: str, seconds: float) -> float:
    return seconds * (config.timeouts.tcg_multiplier if accelerator == "tcg" else 1.0)


def boot_guest(config: ClusterConfig, kernel: Path, hz: int, run: RunFolder, progress: Progress,
               cmdline: str | None = None) -> GuestSession:
    """Boot the guest and wait until init says it is ready (or the kernel dies, or time runs out)."""
    with progress.step("build initramfs (busybox, dropbear, this run's keys)"):
        initramfs = rootfs.build_initramfs(run.path)
    boot = BootSpec(kernel=kernel, initrd=initramfs.path, cmdline=cmdline or config.guest.cmdline,
                    vcpus=config.vm.vcpus, memory_mb=config.vm.memory_mb)
    if config.giantvm is not None:
        nodes = config.giantvm.nodes
        with progress.step(f"start {len(nodes)} GiantVM nodes on "
                           f"{', '.join(dict.fromkeys(node.host for node in nodes))}"):
            cluster, state = giantvm_pipeline.start_cluster(config, boot, run, progress)
        guest: QemuGuest | RemoteQemuGuest | GiantVMGuest = cluster
        accelerator, where, cluster_state = "kvm", nodes[0].host, state.to_dict()
    else:
        guest, accelerator = _start_qemu(config, boot, run, progress)
        where, cluster_state = config.hosts[0].name, None
    credentials = initramfs.credentials
    endpoints = guest.endpoints
    try:  # from here on the guest runs: nothing may leave it behind
        record = SessionRecord(
            pid=guest.pid, accelerator=accelerator,
            kernel_console_log=str(endpoints.kernel_console_log),
            shell_socket=str(endpoints.shell_socket),
            ssh_port=endpoints.ssh_port, root_password=credentials.root_password,
            client_key=str(credentials.client_key), host_key_type=credentials.host_key_type,
            host_key_base64=credentials.host_key_base64, vcpus=config.vm.vcpus,
            vcpus_per_node=config.vm.vcpus_per_node, hz=hz, host=where,
            remote=guest.state.to_dict() if isinstance(guest, RemoteQemuGuest) else None,
            cluster=cluster_state)
        run.write_json(SESSION_FILE, asdict(record)).chmod(0o600)  # holds the root password
    except BaseException:
        try:
            guest.stop()
        finally:
            guest.detach()
        raise
    session = GuestSession(record, guest, run, config.timeouts.command_s)
    try:
        with progress.step(f"boot {config.vm.vcpus} vCPUs under {accelerator.upper()} on "
                           f"{where} (console: {run.file('console-kernel.log')})"):
            _wait_for_ready(session, endpoints,
                            boot_timeout(config, accelerator, config.timeouts.boot_s), progress)
    except BaseException:
        session.close()
        raise
    return session


def _start_qemu(config: ClusterConfig, boot: BootSpec, run: RunFolder,
                progress: Progress) -> tuple[QemuGuest | RemoteQemuGuest, str]:
    """One stock QEMU, here or on the config's first host, with its accelerator."""
    host = config.hosts[0]
    if host.is_local:
        accelerator = choose_accelerator(config.vm.accel, config.vm.qemu_binary, boot.kernel,
                                         run.file("accel-probe.log"), config.cache_dir)
        launcher: QemuLauncher | RemoteQemuLauncher = QemuLauncher(
            qemu_binary=config.vm.qemu_binary, accelerator=accelerator, boot=boot,
            run_dir=run.path, ssh_port=free_loopback_port())
    else:
        # No KVM test boot on remote hosts yet: `auto` means TCG there.
        accelerator = "tcg" if config.vm.accel == "auto" else config.vm.accel
        remote = connect_host(host)
        try:
            launcher = RemoteQemuLauncher(host=remote, qemu_binary=config.vm.qemu_binary,
                                          boot=boot, local_dir=run.path,
                                          remote_ssh_port=free_remote_port(remote),
                                          accelerator=accelerator)
        except BaseException:
            remote.close()
            raise
    run.write_json("launch.json", {"accelerator": accelerator, "host": host.name,
                                   "command_lines": launcher.command_lines()})
    with progress.step(f"start QEMU on {host.name}"):
        try:
            return launcher.start(), accelerator
        except BaseException:
            if isinstance(launcher, RemoteQemuLauncher):
                launcher.host.close()
            raise


def _wait_for_ready(session: GuestSession, endpoints: GuestEndpoints, timeout_s: float,
                    progress: Progress) -> None:
    started = time.monotonic()
    while rootfs.READY_MARKER not in _read(endpoints.kernel_console_log):
        session.raise_if_dead()
        if time.monotonic() - started > timeout_s:
            tail = _read(endpoints.kernel_console_log).splitlines()[-5:]
            raise BootError(f"no '{rootfs.READY_MARKER}' on the kernel console within "
                            f"{timeout_s:.0f}s; last lines: {tail}")
        progress.status(f"waiting for '{rootfs.READY_MARKER}'", started)
        time.sleep(0.1)


def connect_host(host: HostConfig) -> RemoteHost:
    return RemoteHost(RemoteHostSpec.of(host)).connect()


def attach_session(config: ClusterConfig, run: RunFolder, forwards: bool = True) -> GuestSession:
    """Reattach to the guest `up` left running; `forwards=False` is enough to check or stop it."""
    if not run.file(SESSION_FILE).is_file():
        raise HarnessError(f"{run.path} has no {SESSION_FILE}: no guest was started from it")
    record = SessionRecord(**run.read_json(SESSION_FILE))
    if record.cluster is not None:
        if config.giantvm is None:
            raise HarnessError(f"{run.path} started a GiantVM cluster, but {config.path} does "
                               "not describe one; pass the config it was started with")
        cluster = giantvm_pipeline.attach_cluster(
            config, giantvm_pipeline.ClusterState.from_dict(record.cluster), run, record.vcpus,
            config.vm.memory_mb, forwards)
        record = replace(record, ssh_port=cluster.endpoints.ssh_port)
        return GuestSession(record, cluster, run, config.timeouts.command_s)
    if record.remote is None:
        guest: QemuGuest | RemoteQemuGuest = QemuGuest(
            endpoints=GuestEndpoints(Path(record.kernel_console_log), Path(record.shell_socket),
                                     "127.0.0.1", record.ssh_port),
            accelerator=record.accelerator, pid=record.pid, qemu_log=run.file("qemu.log"))
        return GuestSession(record, guest, run, config.timeouts.command_s)
    hosts = {host.name: host for host in config.hosts}
    if record.host not in hosts:
        raise HarnessError(f"{run.path} ran its guest on host '{record.host}', which "
                           f"{config.path} no longer names")
    remote = connect_host(hosts[record.host])
    state = RemoteGuestState(**record.remote)
    guest = RemoteQemuGuest.attach(remote, state) if forwards else RemoteQemuGuest(remote, state)
    record = replace(record, ssh_port=guest.endpoints.ssh_port)
    return GuestSession(record, guest, run, config.timeouts.command_s)


def probe_guest(session: GuestSession, config: ClusterConfig,
                progress: Progress) -> list[JiffiesSample]:
    samples: list[JiffiesSample] = []
    for transport in config.probe.transports:
        with progress.step(f"probe jiffies over {transport}: {config.probe.rounds} rounds"):
            timeout = boot_timeout(config, session.record.accelerator, config.timeouts.ssh_s)
            runner = session.open_ssh(timeout) if transport == "ssh" else \
                session.open_console(timeout)
            probe = JiffiesProbe(runner, transport, session.record.vcpus,
                                 session.record.vcpus_per_node)
            progress.say(f"    method: {probe.method}")
            samples += probe.sample(config.probe.rounds, config.probe.interval_s)
    session.run.write_json("samples.json", [sample.to_dict() for sample in samples])
    return samples


def host_log_checks(session: GuestSession) -> list[CheckResult]:
    """GiantVM only: every host's kernel log since the run began (host-dmesg.json holds it all)."""
    if not isinstance(session.guest, GiantVMGuest):
        return []
    findings = session.guest.dmesg_findings()
    session.run.write_json("host-dmesg.json", [asdict(host) for host in findings])
    return giantvm_pipeline.dmesg_checks(findings)


def judge(samples: list[JiffiesSample], hz: int, config: ClusterConfig, run: RunFolder,
          host_checks: list[CheckResult] | None = None) -> Verdict:
    sample_checks = check_samples(samples, hz, config.checks).checks or (CheckResult(
        "jiffies samples", "-", False, 0.0, "at least one round", "no samples were taken"),)
    verdict = Verdict(sample_checks + tuple(host_checks or ()))
    run.write_json("verdict.json", {"passed": verdict.passed,
                                    "checks": [check.to_dict() for check in verdict.checks]})
    write_junit(verdict, run.file("junit.xml"), f"gvm-harness.{config.name}")
    if samples:
        plot_skew(samples, hz, run.file("skew.png"), config.checks.max_skew_ticks)
    run.file("verdict.txt").write_text(verdict_table(verdict) + "\n")
    return verdict


def atomic_inc_lines(console_log: Path) -> list[str]:
    """The guest series' one boot line about ATOMIC_INC (empty for an unpatched kernel)."""
    return [line.strip() for line in _read(console_log).splitlines() if "ATOMIC_INC: " in line]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
