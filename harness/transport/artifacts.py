"""The upload store on hosts: files put on a host verified, atomically and by content.

The sha256 is computed here and checked with `sha256sum` on the host; an unchanged file is not
sent again; a new one goes to a hidden temporary name next to the target, is checked, and only
then renamed over it (rename(2) within one directory), so an upload that dies half way leaves the
old file in place. The mode travels with the file (a 0600 initramfs stays 0600), and a file that
holds secrets is removed again when its guest stops (`remove_secret`). `upload_artifacts` stores files under their digest, like labgrid's
ManagedFile, so different builds never overwrite each other.
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import paramiko

from harness.errors import HarnessError
from harness.transport.remote_host import COMMAND_TIMEOUT_S, RemoteHost, RemoteHostError, RemoteResult
from harness.transport.parallel import ParallelResult, on_hosts

PART_SUFFIX = ".gvm-part"
ARTIFACT_DIR = "artifacts"  # under each host's work_dir
SLOWEST_HASH_BYTES_PER_S = 256 << 10
QEMU_BUILD_BINARY = "x86_64-softmmu/qemu-system-x86_64"  # in a QEMU 2.8 build tree
# What a -kernel boot with an e1000 loads from pc-bios/ (-nodefaults: no VGA BIOS)
QEMU_BUILD_FIRMWARE = ("bios-256k.bin", "kvmvapic.bin", "linuxboot.bin", "linuxboot_dma.bin",
                       "efi-e1000.rom")


class CommandHost(Protocol):
    """A host that runs commands: RemoteHost, or a fake in the unit tests."""

    @property
    def name(self) -> str: ...

    def run(self, command: str | Sequence[str], timeout_s: float = ..., check: bool = ...,
            as_root: bool = ...) -> RemoteResult: ...


class UploadError(HarnessError):
    """An upload failed; the message says what state the host is in."""


@dataclass(frozen=True)
class UploadResult:
    host: str
    local: Path
    remote_path: str
    sha256: str
    size: int
    uploaded: bool  # False: the host already had this exact file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_path(store_dir: str, sha256: str, name: str) -> str:
    """Content-addressed: a path names exactly one content, so it is never rewritten."""
    return f"{store_dir}/{sha256}/{name}"


def hash_timeout_s(size: int) -> float:
    """How long `sha256sum` may take for `size` bytes: a Bochs-emulated host hashes at well
    under 1 MB/s, a real one at hundreds."""
    return COMMAND_TIMEOUT_S + size / SLOWEST_HASH_BYTES_PER_S


def remote_sha256(host: CommandHost, path: str, size: int = 0) -> str | None:
    """The file's sha256 on the host, or None if there is no file there; `size` is what the
    file is expected to hold, for the time the hash may take."""
    quoted = shlex.quote(path)
    output = host.run(f"if [ -e {quoted} ]; then sha256sum {quoted}; fi", check=True,
                      timeout_s=hash_timeout_s(size)).stdout
    return output.split()[0] if output.strip() else None


def upload_file(host: RemoteHost, local: Path, remote_path: str, sha256: str | None = None,
                progress: Callable[[int, int], None] | None = None,
                stall_timeout_s: float = 60.0) -> UploadResult:
    """Make `remote_path` hold exactly `local`, sending it only if it differs."""
    if not posixpath.isabs(remote_path):
        raise UploadError(f"upload target '{remote_path}' must be an absolute path")
    if not local.is_file():
        raise UploadError(f"{local} does not exist; build it first")
    sha256 = sha256 or sha256_file(local)
    size = local.stat().st_size
    where = f"host '{host.name}'"
    try:
        if remote_sha256(host, remote_path, size) == sha256:
            return UploadResult(host.name, local, remote_path, sha256, size, uploaded=False)
        directory, name = posixpath.split(remote_path)
        stale_parts = shlex.quote(f"{directory}/.{name}.") + "*" + PART_SUFFIX
        host.run(f"mkdir -p {shlex.quote(directory)} && rm -f {stale_parts}", check=True)
    except RemoteHostError as error:
        raise UploadError(f"cannot upload {local.name} to {where}: {error}") from None
    temporary = f"{directory}/.{name}.{secrets.token_hex(4)}{PART_SUFFIX}"
    try:
        with host.sftp(stall_timeout_s) as sftp:
            sftp.put(str(local), temporary, callback=progress, confirm=True)
            sftp.chmod(temporary, stat.S_IMODE(local.stat().st_mode))  # private stays private
            received = remote_sha256(host, temporary, size)
            if received != sha256:
                raise UploadError(f"{local.name} arrived on {where} with sha256 {received}, not "
                                  f"{sha256}; the transfer corrupted it: check the host's disk "
                                  "and memory, then try again")
            sftp.posix_rename(temporary, remote_path)
    except (RemoteHostError, UploadError, paramiko.SSHException, OSError, EOFError) as error:
        _remove_quietly(host, temporary)
        # EOFError: the SFTP channel closed under us, often before the transport notices
        lost = isinstance(error, EOFError) or not host.connected
        reason = f"the SSH connection was lost ({type(error).__name__})" if lost \
            else str(error) or type(error).__name__
        message = error if isinstance(error, UploadError) else \
            f"uploading {local} to {where}:{remote_path} failed: {reason}"
        raise UploadError(f"{message}; {remote_path} on {where} is as it was before") from None
    return UploadResult(host.name, local, remote_path, sha256, size, uploaded=True)


def _remove_quietly(host: RemoteHost, path: str) -> None:
    """Best effort: with the connection gone, the next upload of that file removes the part."""
    try:
        host.run(f"rm -f {shlex.quote(path)}", timeout_s=10)
    except RemoteHostError:
        pass


def remove_secret(host: CommandHost, remote_path: str) -> None:
    """Remove an uploaded file that holds secrets (a run's initramfs: the guest's SSH host key and
    root password hash) and its content-addressed directory once empty. A run's initramfs is
    unique to the run (its keys are made for it), so no other run boots from that path. Raises
    RemoteHostError saying what to remove by hand."""
    quoted = shlex.quote(remote_path)
    try:
        host.run(f"rm -f {quoted} && {{ rmdir {shlex.quote(posixpath.dirname(remote_path))} "
                 "2>/dev/null || true; }", check=True, timeout_s=COMMAND_TIMEOUT_S)
    except RemoteHostError as error:
        raise RemoteHostError(f"{remote_path} on host '{host.name}' holds this run's guest keys "
                              f"and could not be removed ({error}); remove it by hand") from None


def upload_qemu_build(host: RemoteHost, tree: Path) -> str:
    """Put a QEMU build's binary and the firmware it loads on `host`; return the binary's path.

    For a GiantVM QEMU built on one machine and run on hosts that have no build of their own. The
    tree's layout is kept, because a QEMU 2.8 binary finds its firmware in ../pc-bios; the
    directory is named after the binary's digest, so builds never overwrite each other.
    """
    binary = tree / QEMU_BUILD_BINARY
    files = [binary] + [tree / "pc-bios" / name for name in QEMU_BUILD_FIRMWARE]
    missing = [str(path.relative_to(tree)) for path in files if not path.is_file()]
    if missing:
        raise UploadError(f"{tree} is not a built QEMU tree: {', '.join(missing)} missing "
                          "(configure --target-list=x86_64-softmmu, then make)")
    digest = sha256_file(binary)
    root = f"{host.spec.work_dir}/{ARTIFACT_DIR}/qemu-{digest}"
    for path in files:
        upload_file(host, path, f"{root}/{path.relative_to(tree)}",
                    digest if path == binary else None)
    remote_binary = f"{root}/{QEMU_BUILD_BINARY}"
    try:
        host.run(f"chmod 755 {shlex.quote(remote_binary)}", check=True)
    except RemoteHostError as error:
        raise UploadError(f"cannot make {remote_binary} executable on host '{host.name}': "
                          f"{error}") from None
    return remote_binary


def upload_artifacts(hosts: Sequence[RemoteHost],
                     files: Sequence[Path]) -> ParallelResult[tuple[UploadResult, ...]]:
    """The same files to every host at once, each as `<work_dir>/artifacts/<sha256>/<name>`."""
    digests = {path: sha256_file(path) for path in files}

    def upload_all(host: RemoteHost) -> tuple[UploadResult, ...]:
        store = f"{host.spec.work_dir}/{ARTIFACT_DIR}"
        return tuple(upload_file(host, path, artifact_path(store, digest, path.name), digest)
                     for path, digest in digests.items())

    return on_hosts(hosts, f"upload {', '.join(path.name for path in files)}", upload_all)
