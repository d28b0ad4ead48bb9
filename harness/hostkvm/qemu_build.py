"""GiantVM's QEMU 2.8.1.1, built once as one static x86_64 binary that every host can run (the
emulated hosts have only the harness's initramfs; CloudLab hosts need no build of their own).

Why a Debian bullseye chroot: QEMU 2.8's configure refuses Python 3 and bookworm has no Python 2,
and gcc 12/glibc 2.36 break the 2017 tree in more places than bullseye's gcc 10/glibc 2.31. Two
fixes are applied to the copy, never to the user's tree: glibc >= 2.27 declares memfd_create in
<sys/mman.h> and has no <sys/memfd.h> (configure's probe and util/memfd.c, as upstream QEMU did
later), and -fcommon, since gcc 10 defaults to -fno-common and the tree has tentative definitions
in headers. The output keeps the build tree's layout (x86_64-softmmu/, pc-bios/), which is what
`upload_qemu_build` and a config's `qemu_tree` expect.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.errors import BuildError
from harness.progress import Progress
from harness.transport.artifacts import QEMU_BUILD_BINARY, QEMU_BUILD_FIRMWARE
from harness.transport.local_process import run_logged

SUITE = "bullseye"
MIRROR = "http://deb.debian.org/debian"
CHROOT_PACKAGES = ("python2", "build-essential", "pkg-config", "libglib2.0-dev",
                   "libpixman-1-dev", "zlib1g-dev", "libfdt-dev", "libpcre3-dev")
MEMFD_FIXED = ("configure", "util/memfd.c")
# Only what a -kernel boot of the harness's guest needs; every optional library is off, so the
# static link needs nothing the chroot does not have.
CONFIGURE = (
    "./configure --python=python2 --target-list=x86_64-softmmu --static --disable-werror "
    "--enable-kvm --extra-cflags=-fcommon --disable-tools --disable-docs --disable-guest-agent "
    "--disable-gtk --disable-sdl --disable-vnc --disable-curses --disable-vte --disable-opengl "
    "--disable-spice --disable-libusb --disable-usb-redir --disable-smartcard --disable-seccomp "
    "--disable-glusterfs --disable-rbd --disable-libiscsi --disable-libnfs --disable-curl "
    "--disable-gnutls --disable-nettle --disable-gcrypt --disable-bluez --disable-brlapi "
    "--disable-cap-ng --disable-attr --disable-numa --disable-tpm --disable-lzo --disable-snappy "
    "--disable-bzip2 --disable-libssh2 --disable-linux-aio --disable-rdma --disable-xen "
    "--disable-virtfs --disable-tcmalloc --disable-jemalloc")


@dataclass(frozen=True)
class QemuBuild:
    tree: Path  # the output: x86_64-softmmu/qemu-system-x86_64 (stripped) and pc-bios/
    binary: Path
    size: int


def check_giantvm_tree(tree: Path) -> None:
    options = tree / "qemu-options.hx"
    if not (tree / "vl.c").is_file() or not options.is_file() or \
            "local-cpu" not in options.read_text(errors="replace"):
        raise BuildError(f"{tree} is not a GiantVM QEMU tree (no vl.c, or no -local-cpu in "
                         "qemu-options.hx); point --tree at a GiantVM/QEMU checkout")


def fix_memfd(text: str) -> str:
    return text.replace("#include <sys/memfd.h>", "#include <sys/mman.h>")


def build_script(jobs: int) -> str:
    return f"set -e\ncd /build/qemu\n{CONFIGURE}\nmake -j{jobs}\n"


def build_giantvm_qemu(tree: Path, out: Path, chroot: Path, log_path: Path, progress: Progress,
                       jobs: int) -> QemuBuild:
    """Build `tree` in `chroot` (made with debootstrap when it has no python2 yet) into `out`."""
    check_giantvm_tree(tree)
    for tool in ("debootstrap", "chroot", "strip", "mount"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` is missing; run ./gvm setup (package debootstrap)")
    if not (chroot / "usr/bin/python2").exists():
        with progress.step(f"debootstrap a Debian {SUITE} chroot into {chroot} (log: {log_path})"):
            run_logged(["debootstrap", "--variant=minbase",
                        f"--include={','.join(CHROOT_PACKAGES)}", SUITE, str(chroot), MIRROR],
                       log_path, progress)
    work = chroot / "build/qemu"
    with progress.step(f"copy {tree} into the chroot"):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tree, work, ignore=shutil.ignore_patterns(".git"), symlinks=True)
        for relative in MEMFD_FIXED:
            path = work / relative
            path.write_text(fix_memfd(path.read_text(errors="surrogateescape")),
                            errors="surrogateescape")
    with progress.step(f"configure and make QEMU 2.8 statically with -j{jobs} (log: {log_path})"):
        subprocess.run(["mount", "--bind", "/proc", str(chroot / "proc")], check=False,
                       capture_output=True)
        try:
            run_logged(["chroot", str(chroot), "/bin/bash", "-c", build_script(jobs)], log_path,
                       progress)
        finally:
            subprocess.run(["umount", str(chroot / "proc")], check=False, capture_output=True)
    binary = out / QEMU_BUILD_BINARY
    binary.parent.mkdir(parents=True, exist_ok=True)
    (out / "pc-bios").mkdir(exist_ok=True)
    subprocess.run(["strip", "-o", str(binary), str(work / QEMU_BUILD_BINARY)], check=True)
    for name in QEMU_BUILD_FIRMWARE:
        shutil.copy2(work / "pc-bios" / name, out / "pc-bios" / name)
    return QemuBuild(out, binary, binary.stat().st_size)
