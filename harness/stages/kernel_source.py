"""Where a guest kernel tree comes from, which version it is, and which patch series fits it.

`debian:linux-source-6.1` means Debian's linux-source-6.1 package: its tarball is unpacked once into
the cache (into a temporary folder first, renamed when complete, so an interrupted unpack is never
mistaken for a tree). A path is used as it is: a tree the user keeps, patched in place.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import BuildError, ConfigError
from harness.stages.patches import PatchSeries
from harness.progress import Progress, format_duration

DEBIAN_PREFIX = "debian:"
DEBIAN_SOURCE_DIR = Path("/usr/src")


@dataclass(frozen=True, order=True)
class KernelVersion:
    major: int
    minor: int
    sublevel: int

    @property
    def series_name(self) -> str:
        return f"linux-{self.major}.{self.minor}"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"


def resolve_tree(source: str, cache_dir: Path, progress: Progress) -> Path:
    if source.startswith(DEBIAN_PREFIX):
        return _unpacked_debian_source(source[len(DEBIAN_PREFIX):], cache_dir, progress)
    tree = Path(source).expanduser()
    if not (tree / "Makefile").is_file() or not (tree / "kernel").is_dir():
        raise ConfigError(f"guest.kernel.source: {tree} is not a Linux source tree "
                          "(no Makefile and kernel/ there)")
    return tree


def _unpacked_debian_source(package: str, cache_dir: Path, progress: Progress) -> Path:
    if not re.fullmatch(r"linux-source-\d+\.\d+", package):
        raise ConfigError(f"guest.kernel.source: 'debian:{package}' is not a Debian kernel "
                          "source package name such as 'debian:linux-source-6.1'")
    tree = cache_dir / "src" / package
    if (tree / "Makefile").is_file():
        return tree
    tarball = DEBIAN_SOURCE_DIR / f"{package}.tar.xz"
    if not tarball.is_file():
        raise ConfigError(f"{tarball} is missing: install Debian's {package} package "
                          "(./gvm setup does it)")
    staging = tree.parent / f".{package}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with progress.step(f"unpack {tarball.name} into {tree.parent}"):
        started = time.monotonic()
        with tarfile.open(tarball) as archive:
            for count, member in enumerate(archive, start=1):
                archive.extract(member, staging, filter="tar")
                if count % 2000 == 0:
                    progress.status(f"{count} files ({format_duration(time.monotonic() - started)})",
                                    started)
        unpacked = staging / package
        if not (unpacked / "Makefile").is_file():
            raise BuildError(f"{tarball} did not contain {package}/Makefile")
        unpacked.rename(tree)
        shutil.rmtree(staging)
    return tree


def kernel_version(tree: Path) -> KernelVersion:
    """Read VERSION, PATCHLEVEL and SUBLEVEL from the top Makefile (no make needed)."""
    fields = {}
    for line in (tree / "Makefile").read_text(errors="replace").splitlines()[:12]:
        match = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d+)\s*$", line)
        if match:
            fields[match.group(1)] = int(match.group(2))
    if len(fields) != 3:
        raise BuildError(f"{tree}/Makefile: cannot read the kernel version from its first lines")
    return KernelVersion(fields["VERSION"], fields["PATCHLEVEL"], fields["SUBLEVEL"])


def select_series(patches_dir: Path, version: KernelVersion) -> PatchSeries:
    """A directory with a `series` file is one series; otherwise pick its `linux-X.Y` subfolder."""
    if (patches_dir / "series").is_file():
        return PatchSeries.load(patches_dir)
    candidate = patches_dir / version.series_name
    if (candidate / "series").is_file():
        return PatchSeries.load(candidate)
    available = sorted(p.name for p in patches_dir.iterdir() if (p / "series").is_file()) \
        if patches_dir.is_dir() else []
    raise ConfigError(f"{patches_dir}: no series for Linux {version} (looked for "
                      f"{version.series_name}/series); available: {', '.join(available) or 'none'}")
