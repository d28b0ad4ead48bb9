"""A started guest and how a later command finds it again: the session of one run.

`boot_guest` starts the guest through its backend and waits for the ready marker (a kernel that
dies or never gets there is the kernel's failure, KernelUnderTestError; QEMU gone without that is
the harness's side); `session.json` in the run folder keeps the backend's `kind`, its guest's
record and how to log in, so `attach_session` rebuilds the session for `probe`, `down` and
`status`. GuestSession opens the serial console and SSH on demand.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.backends.base import Backend, BootSpec, RunningGuest, StartSpec
from harness.backends.registry import backend_for, backend_named
from harness.config import ClusterConfig
from harness.errors import BootError, HarnessError, KernelUnderTestError
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages import rootfs
from harness.transport.console_log import MarkerTimeout, read_log, wait_for_marker
from harness.transport.guest_ssh import GuestSSH, SSHTarget
from harness.transport.serial_console import SerialConsole

FATAL_CONSOLE = re.compile(r"Kernel panic - not syncing|^\s*BUG: |Oops: |general protection fault",
                           re.M)
KERNEL_STARTED = "Linux version "
SESSION_FILE = "session.json"


@dataclass(frozen=True)
class GuestAccess:
    """How to log in to this run's guest and trust it (from its initramfs)."""

    root_password: str
    client_key: str
    host_key_type: str
    host_key_base64: str


@dataclass(frozen=True)
class SessionRecord:
    """What a later command needs to reattach: the backend's kind and its guest's record."""

    kind: str
    state: dict
    access: GuestAccess
    vcpus: int
    vcpus_per_node: int
    hz: int

    @classmethod
    def from_dict(cls, data: dict) -> SessionRecord:
        return cls(data["kind"], data["state"], GuestAccess(**data["access"]), data["vcpus"],
                   data["vcpus_per_node"], data["hz"])


class GuestSession:
    """A started guest with its console and SSH connections; `close` stops it too."""

    def __init__(self, record: SessionRecord, guest: RunningGuest, run: RunFolder,
                 config: ClusterConfig):
        self.record = record
        self.guest = guest
        self.run = run
        self.config = config  # as the backend judges it
        self.console: SerialConsole | None = None
        self.ssh: GuestSSH | None = None

    @property
    def kernel_console_log(self) -> Path:
        return self.guest.endpoints.kernel_console_log

    @property
    def login_timeout_s(self) -> float:
        return boot_timeout(self.config, self.guest.accelerator, self.config.timeouts.ssh_s)

    def open_console(self, timeout_s: float | None = None) -> SerialConsole:
        if self.console is None:
            console = SerialConsole(self.guest.endpoints.shell_socket,
                                    self.run.file("console-shell.log"),
                                    self.config.timeouts.command_s)
            console.login("root", self.record.access.root_password,
                          timeout_s or self.login_timeout_s)
            self.console = console
        return self.console

    def open_ssh(self, timeout_s: float | None = None) -> GuestSSH:
        if self.ssh is None:
            access, endpoints = self.record.access, self.guest.endpoints
            ssh = GuestSSH(SSHTarget(endpoints.ssh_host, endpoints.ssh_port, "root",
                                     Path(access.client_key), access.host_key_type,
                                     access.host_key_base64), self.config.timeouts.command_s)
            ssh.connect(timeout_s or self.login_timeout_s, still_booting=self.raise_if_dead)
            self.ssh = ssh
        return self.ssh

    def raise_if_dead(self) -> None:
        """KernelUnderTestError if the console shows the kernel died; BootError if QEMU ended
        without that (the harness's or the host's side)."""
        match = FATAL_CONSOLE.search(read_log(self.kernel_console_log))
        if match:
            caveat = self.guest.platform_caveat()
            raise KernelUnderTestError(f"the guest kernel failed: '{match.group(0).strip()}'; "
                                       f"see {self.kernel_console_log}" +
                                       (f". But {caveat}" if caveat else ""))
        status = self.guest.exit_status()
        if status is not None:
            tail = read_log(self.kernel_console_log).splitlines()[-3:]
            raise BootError(f"QEMU exited with {status}; {self.guest.qemu_log_tail()}; the kernel "
                            f"console ({self.kernel_console_log}) ends with {tail}")

    def raise_if_down(self) -> None:
        """raise_if_dead, and a KernelUnderTestError naming the host whose kernel failed (an
        Oops, BUG, WARNING, hung task or lockup): a guest whose host kvm broke may never become
        ready, and its timeout may be an hour."""
        self.raise_if_dead()
        failure = self.guest.host_kernel_failure()
        if failure is not None:
            raise KernelUnderTestError(
                f"host '{failure.host}': its kernel failed while the guest booted: "
                f"'{failure.line}'; the guest cannot become ready. The host's whole log since "
                "the run began is in host-dmesg.json", culprit=f"host kernel of {failure.host}")

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
               cmdline: str | None = None, backend: Backend | None = None) -> GuestSession:
    """Start the guest and wait until init says it is ready (or the kernel dies, or time runs
    out); on failure the guest is stopped. `backend`: the config's own (backend_for) unless the
    command names one."""
    session = start_session(config, kernel, hz, run, progress, cmdline, backend)
    try:
        wait_until_ready(session, progress)
    except BaseException:
        session.close()
        raise
    return session


def start_session(config: ClusterConfig, kernel: Path, hz: int, run: RunFolder,
                  progress: Progress, cmdline: str | None = None,
                  backend: Backend | None = None) -> GuestSession:
    """Start the guest and record it in session.json; it may still be booting."""
    backend = backend or backend_for(config)
    config = backend.judged_config(config)
    with progress.step("build initramfs (busybox, dropbear, this run's keys)"):
        initramfs = rootfs.build_initramfs(run.path)
    boot = BootSpec(kernel=kernel, initrd=initramfs.path, cmdline=cmdline or config.guest.cmdline,
                    vcpus=config.vm.vcpus, memory_mb=config.vm.memory_mb)
    guest = backend.start(StartSpec(config, boot, run, progress))
    credentials = initramfs.credentials
    try:  # from here on the guest runs: nothing may leave it behind
        record = SessionRecord(
            kind=backend.kind, state=asdict(guest.record()),
            access=GuestAccess(credentials.root_password, str(credentials.client_key),
                               credentials.host_key_type, credentials.host_key_base64),
            vcpus=vcpus_brought_up(config.vm.vcpus, boot.cmdline),
            vcpus_per_node=config.vm.vcpus_per_node, hz=hz)
        run.write_json(SESSION_FILE, asdict(record)).chmod(0o600)  # holds the root password
    except BaseException:
        try:
            guest.stop()
        finally:
            guest.detach()
        raise
    return GuestSession(record, guest, run, config)


def wait_until_ready(session: GuestSession, progress: Progress) -> None:
    """Until init says the guest is ready; KernelUnderTestError when a kernel under test dies
    or the guest's kernel started but never got there, BootError otherwise."""
    config, guest = session.config, session.guest
    with progress.step(f"boot {config.vm.vcpus} vCPUs under {guest.accelerator.upper()} on "
                       f"{guest.where} (console: {session.kernel_console_log})"):
        _wait_for_ready(session, boot_timeout(config, guest.accelerator, config.timeouts.boot_s),
                        progress)


def vcpus_brought_up(vcpus: int, cmdline: str) -> int:
    """The vCPUs the guest brings online: `maxcpus=N` leaves the rest offline, and the probes
    then read the first N (a GiantVM guest whose other nodes only serve memory)."""
    match = re.search(r"(?:^|\s)maxcpus=(\d+)(?:\s|$)", cmdline)
    return max(1, min(vcpus, int(match.group(1)))) if match else vcpus


def _wait_for_ready(session: GuestSession, timeout_s: float, progress: Progress) -> None:
    marker = rootfs.READY_MARKER
    try:
        wait_for_marker(session.kernel_console_log, marker, timeout_s, session.raise_if_down,
                        lambda started: progress.status(f"waiting for '{marker}'", started))
    except MarkerTimeout as timeout:
        started = KERNEL_STARTED in read_log(session.kernel_console_log)
        error = KernelUnderTestError if started else BootError
        raise error(f"no '{marker}' on the kernel console within {timeout_s:.0f}s"
                    f"{' after the kernel started' if started else ''}; last lines: "
                    f"{timeout.tail}; see {session.kernel_console_log}") from None


def attach_session(config: ClusterConfig, run: RunFolder, forwards: bool = True) -> GuestSession:
    """Reattach to the guest `up` left running; `forwards=False` is enough to check or stop it."""
    if not run.file(SESSION_FILE).is_file():
        raise HarnessError(f"{run.path} has no {SESSION_FILE}: no guest was started from it")
    try:
        record = SessionRecord.from_dict(run.read_json(SESSION_FILE))
    except (KeyError, TypeError) as error:
        raise HarnessError(f"{run.file(SESSION_FILE)} is not a session this harness wrote "
                           f"({type(error).__name__}: {error}); stop its guest by hand") from None
    backend = backend_named(record.kind)
    guest = backend.attach(config, run, record.state, forwards)
    return GuestSession(record, guest, run, backend.judged_config(config))
