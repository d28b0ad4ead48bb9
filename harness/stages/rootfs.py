"""The guest's initramfs: busybox, dropbear (with OpenSSH's sftp-server, so uploads work as on any
host) and per-run keys, as a deterministic newc cpio.

The archive is written here rather than by `cpio` so that order, owners and timestamps are fixed
by construction: the same inputs give the same bytes. Keys and the root password are generated per
run folder, so a guest never trusts a key another run made. The kernel console goes to ttyS0 (a log
file); a getty on ttyS1 is the interactive console, so kernel messages never land in the middle
of a command's output.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.errors import BuildError
from harness.transport.local_process import run_captured

BUSYBOX = Path("/bin/busybox")
DROPBEAR = Path("/usr/sbin/dropbear")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
DROPBEAR_SFTP_PATH = "usr/lib/sftp-server"  # where Debian's dropbear execs the sftp subsystem
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
READY_MARKER = "GVM-HARNESS: guest ready"
PRIVATE_IP_PARAM = "gvm_private_ip"  # kernel parameter: address/prefix for eth1
SHELL_TTY = "ttyS1"
FIXED_MTIME = 946684800

INIT_SCRIPT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
hostname gvm-guest
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
    ip addr add {GUEST_ADDRESS} dev eth0
    ip route add default via {GUEST_GATEWAY}
    dropbear -s -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
fi
for word in $(cat /proc/cmdline); do
    case "$word" in
    {PRIVATE_IP_PARAM}=*)  # an emulated host's address on the hosts' private network
        ip addr add "${{word#*=}}" dev eth1 && ip link set eth1 up ;;
    esac
done
echo "{READY_MARKER}: $(cat /proc/uptime)" > /dev/console
"""

INITTAB = f"""::sysinit:/etc/init.d/rcS
{SHELL_TTY}::respawn:/sbin/getty -L 115200 {SHELL_TTY} vt100
::ctrlaltdel:/sbin/poweroff -f
"""


@dataclass(frozen=True)
class GuestCredentials:
    """What the host needs to log in to this run's guest and to trust it."""

    root_password: str
    client_key: Path
    host_key_type: str
    host_key_base64: str


@dataclass(frozen=True)
class Initramfs:
    path: Path
    sha256: str
    credentials: GuestCredentials


def build_initramfs(out_dir: Path) -> Initramfs:
    """Generate this run's keys and password, then write `initramfs.cpio` into `out_dir`."""
    for tool in (BUSYBOX, DROPBEAR, SFTP_SERVER):
        if not tool.is_file():
            raise BuildError(f"{tool} is missing; run ./gvm setup (packages busybox-static, "
                             "dropbear-bin, openssh-sftp-server)")
    keys = out_dir / "keys"
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    credentials = _generate_credentials(keys)
    archive = CpioArchive()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "etc/dropbear",
                      "root/.ssh", "proc", "sys", "dev", "tmp", "run", "var/log", "lib64",
                      "lib/x86_64-linux-gnu"):
        archive.add_directory(directory)
    archive.add_device("dev/console", major=5, minor=1)
    archive.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in run_captured([str(BUSYBOX), "--list-full"]).split():
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")
    archive.add_file("usr/sbin/dropbear", DROPBEAR.read_bytes(), 0o755)
    archive.add_file(DROPBEAR_SFTP_PATH, SFTP_SERVER.read_bytes(), 0o755)
    libraries = sorted(set(_shared_libraries(DROPBEAR)) | set(_shared_libraries(SFTP_SERVER)))
    for library in libraries:
        archive.add_file(str(library).lstrip("/"), library.read_bytes(), 0o755)
    archive.add_symlink("init", "/sbin/init")
    archive.add_file("etc/init.d/rcS", INIT_SCRIPT.encode(), 0o755)
    archive.add_file("etc/inittab", INITTAB.encode(), 0o644)
    archive.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    archive.add_file("etc/group", b"root:x:0:\n", 0o644)
    archive.add_file("etc/shadow", f"root:{_password_hash(credentials.root_password)}:19000::::::\n"
                     .encode(), 0o600)
    archive.add_file("etc/shells", b"/bin/sh\n", 0o644)
    archive.add_file("etc/dropbear/dropbear_ed25519_host_key",
                     (keys / "dropbear_ed25519_host_key").read_bytes(), 0o600)
    archive.add_file("root/.ssh/authorized_keys",
                     credentials.client_key.with_suffix(".pub").read_bytes(), 0o600)
    path = out_dir / "initramfs.cpio"
    data = archive.finish()
    path.touch(mode=0o600)  # it holds the host's private key and the root password hash
    path.chmod(0o600)
    path.write_bytes(data)
    return Initramfs(path=path, sha256=hashlib.sha256(data).hexdigest(), credentials=credentials)


def _generate_credentials(keys: Path) -> GuestCredentials:
    client_key = keys / "guest_client_ed25519"
    host_key = keys / "dropbear_ed25519_host_key"
    for stale in (client_key, client_key.with_suffix(".pub"), host_key):
        stale.unlink(missing_ok=True)
    run_captured(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gvm-harness",
                  "-f", str(client_key)])
    run_captured(["dropbearkey", "-t", "ed25519", "-f", str(host_key)])
    public = re.search(r"^(ssh-ed25519) (\S+)", run_captured(["dropbearkey", "-y", "-f",
                                                              str(host_key)]), re.M)
    if not public:
        raise BuildError(f"dropbearkey -y did not print an ed25519 public key for {host_key}")
    password = secrets.token_urlsafe(12)
    password_file = keys / "root_password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return GuestCredentials(root_password=password, client_key=client_key,
                            host_key_type=public.group(1), host_key_base64=public.group(2))


def _password_hash(password: str) -> str:
    result = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n",
                            capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.startswith("$6$"):
        raise BuildError(f"openssl passwd failed: {result.stderr.strip()}; run ./gvm setup")
    return result.stdout.strip()


def _shared_libraries(binary: Path) -> list[Path]:
    """The libraries `binary` loads, resolved by the dynamic loader itself (ldd)."""
    output = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libraries = []
    for match in re.finditer(r"(?:=> )?(/\S+) \(0x", output):
        libraries.append(Path(match.group(1)))
    if not libraries:
        raise BuildError(f"ldd {binary} listed no libraries; is it a dynamic x86_64 binary?")
    return libraries


class CpioArchive:
    """A newc ("070701") archive with fixed owners and timestamps, written in insertion order."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 1
        self._names: set[str] = set()

    def add_directory(self, name: str) -> None:
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if prefix not in self._names:
                self._entry(prefix, stat.S_IFDIR | 0o755, b"")

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        if os.path.dirname(name):
            self.add_directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        if os.path.dirname(name):
            self.add_directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", count=False)
        return b"".join(self._chunks)

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0),
               count: bool = True) -> None:
        if count:
            if name in self._names:
                raise BuildError(f"initramfs: {name} added twice")
            self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._inode if count else 0, mode, 0, 0,
                  2 if stat.S_ISDIR(mode) else 1, FIXED_MTIME if count else 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._chunks.append(header + encoded + _padding(len(header) + len(encoded)))
        self._chunks.append(data + _padding(len(data)))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)
