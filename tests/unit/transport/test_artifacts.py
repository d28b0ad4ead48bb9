from __future__ import annotations

import hashlib
import shlex
import subprocess
from pathlib import Path

import pytest

from harness.transport.artifacts import (
    UploadError, artifact_path, remove_secret, remote_sha256, sha256_file, upload_file)
from harness.transport.remote_host import RemoteHostError, RemoteResult


def test_sha256_and_content_addressed_paths(tmp_path: Path) -> None:
    artifact = tmp_path / "bzImage"
    artifact.write_bytes(b"kernel" * 100000)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert sha256_file(artifact) == digest
    assert artifact_path("/srv/gvm/artifacts", digest, "bzImage") == \
        f"/srv/gvm/artifacts/{digest}/bzImage"


class HashingHost:
    """Answers only `sha256sum`; any attempt to transfer would fail on the missing sftp()."""

    name = "hashing"

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.timeouts: dict[str, float] = {}

    def run(self, command: str, timeout_s: float = 60, check: bool = False,
            as_root: bool = False) -> RemoteResult:
        path = shlex.split(command)[3]
        self.timeouts[path] = timeout_s
        digest = self.files.get(path)
        return RemoteResult(self.name, command, 0, f"{digest}  {path}\n" if digest else "", "")


def test_an_unchanged_file_is_not_sent(tmp_path: Path) -> None:
    artifact = tmp_path / "initramfs.cpio"
    artifact.write_bytes(b"cpio")
    host = HashingHost({"/w/initramfs.cpio": sha256_file(artifact)})
    assert remote_sha256(host, "/w/initramfs.cpio") == sha256_file(artifact)
    assert remote_sha256(host, "/w/other") is None
    result = upload_file(host, artifact, "/w/initramfs.cpio")  # type: ignore[arg-type]
    assert not result.uploaded and result.size == 4


def test_hashing_a_large_file_may_take_longer_than_a_command() -> None:
    host = HashingHost({})
    remote_sha256(host, "/w/small", size=1 << 10)
    remote_sha256(host, "/w/qemu", size=44 << 20)
    assert host.timeouts["/w/small"] == pytest.approx(60, abs=1)
    assert host.timeouts["/w/qemu"] > 60 + 44


def test_upload_refuses_relative_targets_and_missing_files(tmp_path: Path) -> None:
    host = HashingHost({})
    with pytest.raises(UploadError, match="'w/bzImage' must be an absolute path"):
        upload_file(host, tmp_path, "w/bzImage")  # type: ignore[arg-type]
    with pytest.raises(UploadError, match="does not exist; build it first"):
        upload_file(host, tmp_path / "nope", "/w/bzImage")  # type: ignore[arg-type]


class ShellHost:
    """Runs each command with this machine's sh: the host's file system is a temporary one."""

    name = "shell"

    def run(self, command: str, timeout_s: float = 60, check: bool = False,
            as_root: bool = False) -> RemoteResult:
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        result = RemoteResult(self.name, command, done.returncode, done.stdout, done.stderr)
        if check:
            result.check()
        return result


def test_a_secret_is_removed_with_its_digest_directory_once_empty(tmp_path: Path) -> None:
    store = tmp_path / "artifacts"
    secret = store / "aa" / "initramfs.cpio"
    shared = store / "bb" / "initramfs.cpio"
    for path in (secret, shared):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"keys")
    (shared.parent / "bzImage").write_bytes(b"kernel")
    remove_secret(ShellHost(), str(secret))
    remove_secret(ShellHost(), str(shared))
    remove_secret(ShellHost(), str(secret))  # twice: nothing left to do
    assert not secret.parent.exists()
    assert not shared.exists() and (shared.parent / "bzImage").exists()


def test_a_secret_that_cannot_be_removed_says_so(tmp_path: Path) -> None:
    blocked = tmp_path / "aa" / "initramfs.cpio"
    blocked.mkdir(parents=True)  # rm -f refuses a directory
    with pytest.raises(RemoteHostError, match=r"holds this run's guest keys and could not be "
                                              r"removed .*remove it by hand"):
        remove_secret(ShellHost(), str(blocked))
