"""Install a whole host kernel (Linux-DSM with KVM built in) and boot it, for hosts whose kvm cannot
be swapped as modules (GiantVM's own config has CONFIG_KVM=y; shared/docs/giantvm-notes.md 2.1).

The artifacts are a bzImage and a tarball of `make modules_install INSTALL_MOD_PATH=DIR` (so it
holds `lib/modules/<release>/...`), for example

    make -j$(nproc) bzImage modules
    make modules_install INSTALL_MOD_PATH=out && tar -C out -czf modules.tar.gz lib

Both go to the host's content-addressed artifact store with deploy's sha256-checked upload. Then,
as root on the host: the modules are unpacked beside /lib/modules/<release> and moved into place
(an older tree of that release is kept as <release>.gvm-old), depmod runs, the kernel is copied to
/boot/vmlinuz-<release>, the initramfs is made, grub's menu is rebuilt and the new entry is chosen
for the next boot only (`grub-reboot`, so a power cycle brings back the old kernel) or for every
boot (`grub-set-default`). The host reboots; the harness waits for it to go away (its boot id stops
answering) and to come back (a new boot id), with a deadline and backoff, and then checks that it
runs the uploaded kernel: `uname -r` is the release, and `uname -v` is the build the bzImage's
header names. A host that comes back with its old kernel is reported as such.

Every remote command goes through `InstallHost.run` (RemoteHost, or a fake in the unit tests).
"""

from __future__ import annotations

import re
import shlex
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

from harness.transport.artifacts import ARTIFACT_DIR, artifact_path, sha256_file, upload_file
from harness.errors import HarnessError
from harness.transport.remote_host import RemoteHostError, RemoteResult

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
GRUB_CFG = "/boot/grub/grub.cfg"
DROP_TIMEOUT_S = 180.0  # from `reboot` until SSH stops answering (services stopping)
RETURN_TIMEOUT_S = 900.0  # until it answers again (firmware of a server can take minutes)
FIRST_BACKOFF_S = 2.0
MAX_BACKOFF_S = 30.0
PROBE_TIMEOUT_S = 10.0
BootMode = Literal["once", "default"]
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")


class HostInstallError(HarnessError):
    """Installing or booting the host kernel failed; the message says what state the host is in."""


class RebootTimeout(HostInstallError):
    """The host did not go down, or did not come back, before its deadline."""


class WrongKernelBooted(HostInstallError):
    """The host came back, but not with the installed kernel."""


class InstallHost(Protocol):
    """What the install needs of a host: RemoteHost, or a fake in the unit tests."""

    @property
    def name(self) -> str: ...

    def close(self) -> None: ...

    def run(self, command: str | Sequence[str], timeout_s: float = ..., check: bool = ...,
            as_root: bool = ...) -> RemoteResult: ...


Upload = Callable[[InstallHost, Path, str, str], object]


@dataclass(frozen=True)
class KernelArtifacts:
    bzimage: Path
    modules_tarball: Path  # holds lib/modules/<release>/...
    release: str  # `uname -r` of the new kernel, e.g. 4.9.76+

    def __post_init__(self) -> None:
        if not _RELEASE.fullmatch(self.release):
            raise HostInstallError(f"'{self.release}' is not a kernel release name such as "
                                   "4.9.76+")


@dataclass(frozen=True)
class BzImageVersion:
    """The version string in a bzImage's setup header: `<release> (<by>@<host>) <uname -v>`."""

    release: str
    built_by: str
    version: str  # what `uname -v` prints once it runs, e.g. `#3 SMP Tue Nov 24 15:00:00 UTC 2026`


@dataclass(frozen=True)
class KernelInstall:
    host: str
    release: str
    previous_release: str
    kernel_path: str
    modules_dir: str
    boot_entry: str
    boot_mode: BootMode
    down_after_s: float
    back_after_s: float


@dataclass(frozen=True)
class RebootWait:
    down_after_s: float
    back_after_s: float
    boot_id: str


def bzimage_version(path: Path) -> BzImageVersion | None:
    """Read the kernel_version string of an x86 bzImage (boot protocol 2.00+); None if absent."""
    data = path.read_bytes()
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        return None
    (pointer,) = struct.unpack_from("<H", data, 0x20E)
    if pointer == 0 or pointer + 0x200 >= len(data):
        return None
    raw = data[pointer + 0x200:pointer + 0x200 + 256].split(b"\0", 1)[0]
    match = re.fullmatch(r"(\S+) \((.*?)\) (#.*)", raw.decode(errors="replace").strip())
    if match is None:
        return None
    return BzImageVersion(*match.groups())


def grub_entry(grub_cfg: str, release: str) -> str | None:
    """The `grub-reboot` id (`submenu id>entry id`) of the non-recovery entry booting
    vmlinuz-<release>, from grub.cfg as update-grub writes it; None if there is none."""
    opening = re.compile(r"^\s*(menuentry|submenu)\s+(['\"])(.*?)\2.*?"
                         r"\$menuentry_id_option\s+'([^']*)'")
    kernel = re.compile(r"^\s*linux(16|efi)?\s+\S*/vmlinuz-" + re.escape(release) + r"(\s|$)")
    stack: list[tuple[str, str, str, int]] = []  # (kind, title, id, depth at its opening)
    depth = 0
    for line in grub_cfg.splitlines():
        stripped = line.strip()
        match = opening.match(line)
        if match and stripped.endswith("{"):
            stack.append((match.group(1), match.group(3), match.group(4), depth))
        elif stack and stack[-1][0] == "menuentry" and kernel.match(line) \
                and "recovery" not in stack[-1][1].lower():
            return ">".join(entry[2] for entry in stack)
        depth += stripped.count("{") - stripped.count("}")
        while stack and depth <= stack[-1][3]:
            stack.pop()
    return None


def _step(host: InstallHost, what: str, command: str, timeout_s: float = 300.0) -> str:
    try:
        result = host.run(command, timeout_s=timeout_s, as_root=True)
    except RemoteHostError as error:
        reason = str(error)
    else:
        if result.exit_status == 0:
            return result.stdout
        detail = (result.stderr.strip() or result.stdout.strip())[-2000:]
        reason = f"exit status {result.exit_status}: {detail or '(no output)'}"
    raise HostInstallError(f"host '{host.name}': {what} failed ({reason}). Nothing was "
                           "rebooted, so the host still runs its current kernel; fix this "
                           "and run the install again") from None


def install_kernel(host: InstallHost, artifacts: KernelArtifacts, work_dir: str,
                   boot_mode: BootMode = "once", initramfs: bool = True,
                   upload: Upload = upload_file,  # type: ignore[assignment]
                   drop_timeout_s: float = DROP_TIMEOUT_S,
                   return_timeout_s: float = RETURN_TIMEOUT_S,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> KernelInstall:
    """Upload, install, reboot into and verify the kernel; see the module's docstring."""
    release = artifacts.release
    if boot_mode not in ("once", "default"):
        raise HostInstallError(f"boot_mode '{boot_mode}' is not 'once' or 'default'")
    for path in (artifacts.bzimage, artifacts.modules_tarball):
        if not path.is_file():
            raise HostInstallError(f"{path} does not exist; build the host kernel first")
    built = bzimage_version(artifacts.bzimage)
    if built is not None and built.release != release:
        raise HostInstallError(f"{artifacts.bzimage} is release {built.release}, not {release}; "
                               "set the release to what the kernel's `make kernelrelease` says")
    previous = host.run("uname -r", check=True).stdout.strip()
    old_boot_id = host.run(BOOT_ID, check=True).stdout.strip()

    store = f"{work_dir}/{ARTIFACT_DIR}"
    remote = {}
    for path in (artifacts.bzimage, artifacts.modules_tarball):
        digest = sha256_file(path)
        remote[path] = artifact_path(store, digest, path.name)
        upload(host, path, remote[path], digest)
    bzimage, tarball = remote[artifacts.bzimage], remote[artifacts.modules_tarball]

    modules_dir = f"/lib/modules/{release}"
    kernel_path = f"/boot/vmlinuz-{release}"
    _install_files(host, bzimage, tarball, release, modules_dir, kernel_path)
    if initramfs:
        _step(host, "making the initramfs", "\n".join([
            "if command -v update-initramfs >/dev/null; then",
            f"  rm -f /boot/initrd.img-{release} && update-initramfs -c -k {release}",
            "elif command -v dracut >/dev/null; then",
            f"  dracut --force /boot/initramfs-{release}.img {release}",
            "else echo 'neither update-initramfs nor dracut is installed' >&2; exit 3; fi"]),
            timeout_s=600)
    _step(host, "rebuilding grub's menu", "if command -v update-grub >/dev/null; then "
          f"update-grub; else grub-mkconfig -o {GRUB_CFG}; fi", timeout_s=300)
    entry = _choose_entry(host, release, boot_mode)

    started = clock()
    try:
        host.run("nohup sh -c 'sleep 1; systemctl reboot || reboot' >/dev/null 2>&1 &",
                 timeout_s=15, as_root=True)
    except RemoteHostError:
        pass  # the connection may drop before the answer; the wait below tells
    waited = wait_for_reboot(host, old_boot_id, drop_timeout_s, return_timeout_s, clock, sleep,
                             started)
    check_booted(host, release, built, entry, boot_mode, previous)
    return KernelInstall(host.name, release, previous, kernel_path, modules_dir, entry,
                         boot_mode, waited.down_after_s, waited.back_after_s)


def _install_files(host: InstallHost, bzimage: str, tarball: str, release: str,
                   modules_dir: str, kernel_path: str) -> None:
    q = shlex.quote
    listing = host.run(f"tar -tf {q(tarball)} | grep -m1 -E "
                       f"{q('^(./)?lib/modules/' + re.escape(release) + '/')}",
                       timeout_s=120)
    if listing.exit_status != 0 or not listing.stdout.strip():
        raise HostInstallError(f"the modules tarball has no lib/modules/{release}/; make it with "
                               "`make modules_install INSTALL_MOD_PATH=out && tar -C out -czf "
                               "modules.tar.gz lib` from the tree that built the bzImage")
    _step(host, f"unpacking the modules into {modules_dir}", "\n".join([
        "set -e",
        f"tmp=$(mktemp -d /lib/modules/.gvm-{release}.XXXXXX)",
        'trap \'rm -rf "$tmp"\' EXIT',
        f'tar -xf {q(tarball)} -C "$tmp"',
        f"rm -rf {q(modules_dir + '.gvm-old')}",
        f"if [ -d {q(modules_dir)} ]; then mv {q(modules_dir)} {q(modules_dir + '.gvm-old')}; fi",
        f'mv "$tmp/lib/modules/{release}" {q(modules_dir)}',
        f"depmod -a {q(release)}"]), timeout_s=600)
    _step(host, f"copying the kernel to {kernel_path}",
          f"cp {q(bzimage)} {q(kernel_path + '.gvm-part')} && "
          f"mv {q(kernel_path + '.gvm-part')} {q(kernel_path)}")


def _choose_entry(host: InstallHost, release: str, boot_mode: BootMode) -> str:
    default = host.run("grep -E '^GRUB_DEFAULT=' /etc/default/grub", as_root=True).stdout
    if default.strip().split("=", 1)[-1].strip("\"'") != "saved":
        raise HostInstallError(
            f"host '{host.name}': grub-reboot and grub-set-default need GRUB_DEFAULT=saved in "
            f"/etc/default/grub (it has '{default.strip() or 'no GRUB_DEFAULT'}'); set it, run "
            "update-grub, and try again. The new kernel is installed but not chosen; nothing "
            "was rebooted")
    cfg = _step(host, f"reading {GRUB_CFG}", f"cat {GRUB_CFG}")
    entry = grub_entry(cfg, release)
    if entry is None:
        raise HostInstallError(f"host '{host.name}': {GRUB_CFG} has no entry booting "
                               f"vmlinuz-{release} after update-grub; nothing was rebooted")
    command = "grub-reboot" if boot_mode == "once" else "grub-set-default"
    _step(host, f"choosing the boot entry ({command})", shlex.join([command, entry]))
    return entry


def _boot_id(host: InstallHost) -> str:
    return host.run(BOOT_ID, timeout_s=PROBE_TIMEOUT_S, check=True).stdout.strip()


def wait_for_reboot(host: InstallHost, old_boot_id: str, drop_timeout_s: float,
                    return_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep,
                    started: float | None = None) -> RebootWait:
    """Wait for the host to go away (or show a new boot id), then to answer with a new boot id.

    A RemoteHost never reuses a lost connection, so it is closed before each try to come back.
    """
    started = clock() if started is None else started
    deadline = started + drop_timeout_s
    down_at = None
    while down_at is None:
        try:
            if _boot_id(host) != old_boot_id:
                now = clock() - started
                return RebootWait(now, now, "")
        except RemoteHostError:
            down_at = clock()
            break
        if clock() >= deadline:
            raise RebootTimeout(f"host '{host.name}' still answers with the same boot id "
                                f"{drop_timeout_s:.0f}s after `reboot`: it did not reboot (is "
                                "the login root, or sudo allowed?); it runs its old kernel, "
                                "with the new one chosen for its next boot")
        sleep(1.0)
    deadline = down_at + return_timeout_s
    delay = FIRST_BACKOFF_S
    last_error = "no answer yet"
    while True:
        host.close()
        try:
            boot_id = _boot_id(host)
            if boot_id != old_boot_id:
                return RebootWait(down_at - started, clock() - started, boot_id)
            last_error = "it answered with the old boot id"
        except RemoteHostError as error:
            last_error = str(error)
        remaining = deadline - clock()
        if remaining <= 0:
            raise RebootTimeout(
                f"host '{host.name}' went down for the reboot but did not answer over SSH within "
                f"{return_timeout_s:.0f}s (last: {last_error}). Look at its console (IPMI/BMC "
                "or monitor): the new kernel may have hung or panicked while booting. With "
                "boot_mode 'once' a power cycle boots its previous kernel")
        sleep(min(delay, remaining))
        delay = min(delay * 2, MAX_BACKOFF_S)


def check_booted(host: InstallHost, release: str, built: BzImageVersion | None, entry: str,
                 boot_mode: BootMode, previous: str) -> None:
    """The host runs the installed kernel: its release, and the bzImage's build if known."""
    running = host.run("uname -r", check=True, timeout_s=PROBE_TIMEOUT_S).stdout.strip()
    if running != release:
        command = "grub-reboot" if boot_mode == "once" else "grub-set-default"
        which = "its old kernel" if running == previous else "another kernel"
        raise WrongKernelBooted(
            f"host '{host.name}' rebooted but runs kernel {running}, not {release}: it booted "
            f"{which}. grub did not take the entry '{entry}' ({command}); check "
            "GRUB_DEFAULT=saved, `grub-editenv list`, and whether the new kernel panicked and "
            "the host fell back (see its console or `journalctl -b -1`)")
    if built is None:
        return
    version = host.run("uname -v", check=True, timeout_s=PROBE_TIMEOUT_S).stdout.strip()
    if version != built.version:
        raise WrongKernelBooted(
            f"host '{host.name}' runs release {release} but build '{version}', not the "
            f"uploaded bzImage's '{built.version}': another kernel with the same release "
            "booted; is /boot a separate partition that update-grub did not see, or did "
            f"another kernel package overwrite vmlinuz-{release}?")
