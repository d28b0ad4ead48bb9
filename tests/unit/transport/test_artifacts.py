from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import pytest

from harness.transport.artifacts import (
    UploadError, artifact_path, remote_sha256, sha256_file, upload_file)
from harness.transport.remote_host import RemoteResult


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
