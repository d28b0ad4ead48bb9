"""The initramfs: a valid newc archive that the system cpio reads back, deterministic by design."""

import subprocess
from pathlib import Path

from harness.stages.rootfs import (DROPBEAR, DROPBEAR_SFTP_PATH, READY_MARKER, CpioArchive,
                            build_initramfs)


def test_archive_is_deterministic_and_readable(tmp_path: Path) -> None:
    def make() -> bytes:
        archive = CpioArchive()
        archive.add_file("etc/motd", b"hello\n", 0o644)
        archive.add_symlink("bin/sh", "/bin/busybox")
        archive.add_device("dev/console", 5, 1)
        return archive.finish()

    first, second = make(), make()
    assert first == second and len(first) % 4 == 0
    (tmp_path / "a.cpio").write_bytes(first)
    listing = subprocess.run(["cpio", "-itv"], input=first, capture_output=True, check=True)
    names = listing.stdout.decode()
    assert "etc/motd" in names and "bin/sh -> /bin/busybox" in names
    assert names.splitlines()[-1].startswith("crw")


def test_initramfs_has_init_keys_and_login(tmp_path: Path) -> None:
    result = build_initramfs(tmp_path)
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=result.path.read_bytes(), cwd=extract,
                   check=True)
    assert (extract / "bin/busybox").is_file()
    assert (extract / "usr/sbin/dropbear").is_file()
    assert (extract / DROPBEAR_SFTP_PATH).is_file()
    assert READY_MARKER in (extract / "etc/init.d/rcS").read_text()
    assert (extract / "root/.ssh/authorized_keys").read_text() == \
        result.credentials.client_key.with_suffix(".pub").read_text()
    assert (extract / "etc/shadow").read_text().startswith("root:$6$")
    assert result.credentials.host_key_type == "ssh-ed25519"
    assert (tmp_path / "keys/root_password").stat().st_mode & 0o077 == 0
    for secret in (result.path, tmp_path / "keys"):  # the archive holds the host's private key
        assert secret.stat().st_mode & 0o077 == 0, secret


def test_the_sftp_server_sits_where_this_dropbear_looks_for_it() -> None:
    """A dropbear built with another SFTPSERVER_PATH would leave every upload failing."""
    assert ("/" + DROPBEAR_SFTP_PATH).encode() in DROPBEAR.read_bytes()
