"""GiantVM host trees (Linux-DSM 4.9.76): which base a tree is, its ATOMIC_INC series, its build.

The host series exist for two bases that differ exactly where the series touch them (see
host_patches/README.md): GiantVM/Linux-DSM master talks real TCP between hosts, moharaka's
`shared_mem` branch replaced arch/x86/kvm/ktcp.c with an in-kernel message table, so all of its
nodes run on one host. The base is read from the tree's files, so a git checkout, a `git archive`
or a copied tree are all recognised, and no commit id is needed.

The kvm build follows the tree's own .config: with CONFIG_KVM=m only kvm.ko and kvm-intel.ko are
rebuilt (`make modules_prepare`, `make M=arch/x86/kvm modules`); with KVM built in, the whole
kernel is (`make bzImage modules`), as GiantVM's own instructions do.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness.stages.build import (Artifact, configure_kernel, read_config_options,
                                  reproducible_build_env)
from harness.errors import BuildError, HarnessError
from harness.stages.kernel_source import KernelVersion, kernel_version
from harness.transport.local_process import run_captured, run_logged
from harness.stages.patches import PatchSeries
from harness.progress import Progress

HOST_PATCHES = Path(__file__).resolve().parents[2] / "host_patches"
LINUX_DSM_VERSION = KernelVersion(4, 9, 76)
KVM_DIR = "arch/x86/kvm"

# Marks of the two ktcp.c variants: moharaka's local one queues messages in a kernel hash table,
# GiantVM master's sends them through kernel sockets wrapped in a struct ktcp_cb.
_LOCAL_KTCP_MARK = "ktcp_cache_put("
_SOCKET_KTCP_MARKS = ("kernel_sendmsg(", "struct ktcp_cb")
# moharaka's write_update* branches carry the original ATOMIC_INC code; the series replace it.
_ORIGINAL_ATOMIC_INC_MARK = "var_datas"


class HostTreeError(HarnessError):
    """The host tree is not one of the Linux-DSM bases the host series are written for."""


class HostBase(enum.Enum):
    """A Linux-DSM base; the value is the name of its series directory under host_patches/."""

    GIANTVM_MASTER = "giantvm-master"
    MOHARAKA_SHARED_MEM = "moharaka-shared_mem"

    @property
    def series_dir(self) -> Path:
        return HOST_PATCHES / self.value


@dataclass(frozen=True)
class HostTree:
    """A Linux-DSM tree and the base it was recognised as."""

    path: Path
    base: HostBase

    @property
    def series_dir(self) -> Path:
        return self.base.series_dir

    def load_series(self) -> PatchSeries:
        return PatchSeries.load(self.series_dir)


class KvmBuildMode(enum.Enum):
    MODULES = "kvm modules only (CONFIG_KVM=m)"
    FULL_KERNEL = "full kernel (CONFIG_KVM=y)"


@dataclass(frozen=True)
class KvmModulesBuild:
    """kvm.ko and kvm-intel.ko; they load only into the kernel built from this tree and config."""

    base: HostBase
    kernel_release: str
    series: str
    kvm: Artifact
    kvm_intel: Artifact
    config: Artifact
    log_path: Path
    duration_s: float


@dataclass(frozen=True)
class HostKernelBuild:
    """A bzImage with KVM built in; its modules are installed with `make modules_install`."""

    base: HostBase
    kernel_release: str
    series: str
    bzimage: Artifact
    config: Artifact
    log_path: Path
    duration_s: float


HostBuildResult = KvmModulesBuild | HostKernelBuild


def open_host_tree(path: Path) -> HostTree:
    return HostTree(path=path, base=detect_base(path))


def detect_base(tree: Path) -> HostBase:
    """Tell the two Linux-DSM bases apart by their files; refuse anything else, saying why."""
    wanted = ("the host series need GiantVM/Linux-DSM master or moharaka/Linux-DSM shared_mem "
              "(host_patches/README.md names the commits)")
    if not (tree / "Makefile").is_file():
        raise HostTreeError(f"{tree}: no Makefile; give the top directory of an unpacked "
                            f"Linux-DSM tree; {wanted}")
    kvm = tree / KVM_DIR
    if not all((kvm / name).is_file() for name in ("dsm.c", "ivy.c", "ktcp.c")):
        raise HostTreeError(f"{tree}: not a Linux-DSM tree ({KVM_DIR}/dsm.c, ivy.c or ktcp.c "
                            f"is missing); {wanted}")
    try:
        version = kernel_version(tree)
    except BuildError as error:
        raise HostTreeError(f"{error}; {wanted}") from None
    if version != LINUX_DSM_VERSION:
        raise HostTreeError(f"{tree}: Linux {version}, but the host series are for Linux-DSM "
                            f"{LINUX_DSM_VERSION} (newer GiantVM generations such as "
                            f"memos_framework or GVM-kernel are not supported); {wanted}")
    ktcp = (kvm / "ktcp.c").read_text(errors="replace")
    local = _LOCAL_KTCP_MARK in ktcp
    sockets = all(mark in ktcp for mark in _SOCKET_KTCP_MARKS)
    if local == sockets:
        raise HostTreeError(f"{tree}: {KVM_DIR}/ktcp.c is neither moharaka's local ktcp nor "
                            "GiantVM master's socket ktcp (struct ktcp_cb), or looks like both; "
                            "older Linux-DSM commits such as the GiantVM init commit are not "
                            f"supported; {wanted}")
    if _ORIGINAL_ATOMIC_INC_MARK in (kvm / "ivy.c").read_text(errors="replace"):
        raise HostTreeError(f"{tree}: {KVM_DIR}/ivy.c already has moharaka's original "
                            "ATOMIC_INC code (a write_update* branch); the series replace it, "
                            "so start from moharaka/Linux-DSM shared_mem instead")
    return HostBase.MOHARAKA_SHARED_MEM if local else HostBase.GIANTVM_MASTER


def build_mode(config: dict[str, str]) -> KvmBuildMode:
    """Pick the build from the .config, or say which options the GiantVM host kvm needs."""
    kvm = config.get("CONFIG_KVM", "n")
    if kvm not in ("y", "m"):
        raise BuildError("CONFIG_KVM is not enabled; GiantVM needs CONFIG_VIRTUALIZATION=y, "
                         "CONFIG_KVM and CONFIG_KVM_INTEL (=m to rebuild only the modules)")
    needed = {"CONFIG_KVM_INTEL": ("y", "m"), "CONFIG_KVM_DSM": ("y",),
              "CONFIG_INFINIBAND_ADDR_TRANS": ("y",),
              # krdma.o is always linked into kvm, so a built-in kvm needs a built-in ib_core.
              "CONFIG_INFINIBAND": ("y", "m") if kvm == "m" else ("y",)}
    wrong = [f"{name}={'/'.join(values)} (is {config.get(name, 'n')})"
             for name, values in needed.items() if config.get(name, "n") not in values]
    if wrong:
        raise BuildError("the host .config does not fit the GiantVM kvm build: "
                         + ", ".join(wrong) + "; set them (scripts/config), then "
                         "`make olddefconfig`")
    return KvmBuildMode.MODULES if kvm == "m" else KvmBuildMode.FULL_KERNEL


@dataclass(frozen=True)
class HostConfigSpec:
    """A host .config made by the harness: `make <base>`, the fragments, olddefconfig (for an
    emulated host: tinyconfig + bochs-host.config + emulated-host.config)."""

    base: str
    fragments: tuple[Path, ...]


def build_kvm(host: HostTree, log_path: Path, progress: Progress, build_dir: Path | None = None,
              jobs: int | None = None, configure: HostConfigSpec | None = None) -> HostBuildResult:
    """Build what the .config asks for; the whole make output goes to `log_path`.

    `build_dir` is the O= directory holding the .config, or None for an in-tree build;
    `configure` writes that .config first, else it must be there already.
    """
    started = time.monotonic()
    out = build_dir or host.path
    if configure is not None:
        configure_kernel(host.path, out, configure.base, configure.fragments, log_path, progress,
                         reproducible_build_env())
    config_path = out / ".config"
    if not config_path.is_file():
        raise BuildError(f"{config_path} is missing: the host kvm must be built with the config "
                         "of the host kernel it will load into (copy it there, then "
                         "`make olddefconfig`)")
    config = read_config_options(config_path.read_text())
    mode = build_mode(config)
    if mode is KvmBuildMode.MODULES:
        _require_symvers(config, out)
    for tool in ("make", "gcc", "bc"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` is missing; install the kernel build tools (make, gcc, bc, "
                             "libelf-dev, libssl-dev)")
    _refuse_objtool_with_new_make(config)
    series = _series_state(host)
    make = ["make", "-C", str(host.path)] + ([f"O={build_dir}"] if build_dir else [])
    make_jobs = f"-j{jobs or os.cpu_count() or 1}"
    env = reproducible_build_env()
    with progress.step(f"build host {mode.value} of {host.base.value} (log: {log_path})"):
        if mode is KvmBuildMode.MODULES:
            run_logged(make + ["modules_prepare"], log_path, progress, env=env)
            run_logged(make + [make_jobs, f"M={KVM_DIR}", "modules"], log_path, progress, env=env)
        else:  # modules too where the kernel has any (an emulated host's kernel has none)
            targets = ["bzImage", "modules"] if config.get("CONFIG_MODULES") == "y" else \
                ["bzImage"]
            run_logged(make + [make_jobs, *targets], log_path, progress, env=env)
    release = run_captured(make + ["-s", "kernelrelease"], env=env).strip()
    duration_s = round(time.monotonic() - started, 1)
    if mode is KvmBuildMode.MODULES:
        return KvmModulesBuild(base=host.base, kernel_release=release, series=series,
                               kvm=_artifact(out / KVM_DIR / "kvm.ko", log_path),
                               kvm_intel=_artifact(out / KVM_DIR / "kvm-intel.ko", log_path),
                               config=Artifact.of(config_path), log_path=log_path,
                               duration_s=duration_s)
    return HostKernelBuild(base=host.base, kernel_release=release, series=series,
                           bzimage=_artifact(out / "arch/x86/boot/bzImage", log_path),
                           config=Artifact.of(config_path), log_path=log_path,
                           duration_s=duration_s)


def _series_state(host: HostTree) -> str:
    """Recorded with the build, so a result always says whether ATOMIC_INC is in it."""
    return f"{host.series_dir.name}: {host.load_series().status(host.path).describe()}"


def _require_symvers(config: dict[str, str], out: Path) -> None:
    """With MODVERSIONS, modules built without the kernel's symbol CRCs do not load into it."""
    if config.get("CONFIG_MODVERSIONS", "n") == "y" and not (out / "Module.symvers").is_file():
        raise BuildError(f"CONFIG_MODVERSIONS=y but {out / 'Module.symvers'} is missing: copy the "
                         "Module.symvers of the host kernel's own build there, or the kernel "
                         "will refuse kvm.ko (no symbol versions)")


def _refuse_objtool_with_new_make(config: dict[str, str]) -> None:
    """Linux 4.9's objtool does not build with GNU make 4.3 or later: say so before building."""
    if config.get("CONFIG_STACK_VALIDATION", "n") != "y":
        return
    version = re.search(r"GNU Make (\d+)\.(\d+)", run_captured(["make", "--version"]))
    if version and (int(version.group(1)), int(version.group(2))) >= (4, 3):
        raise BuildError("CONFIG_STACK_VALIDATION=y: the objtool of Linux 4.9 does not build "
                         f"with {version.group(0)} ('missing separator' in "
                         "tools/objtool/.fixdep.o.cmd). Turn it off (`scripts/config -d "
                         "STACK_VALIDATION && make olddefconfig`; it only adds build-time "
                         "checks) or build with GNU make 4.2")


def _artifact(path: Path, log_path: Path) -> Artifact:
    if not path.is_file():
        raise BuildError(f"make finished but {path} is missing; see {log_path}")
    return Artifact.of(path)
