"""Out-of-tree guest kernel build: base config + fragments, verified, cached by ccache.

The config is `make <base>` (tinyconfig, defconfig, ...), then every fragment merged with the
tree's own scripts/kconfig/merge_config.sh, then `olddefconfig`. Kconfig drops an option silently
when its dependencies are missing, so the result is checked against every fragment and the build
stops with the list of options that did not survive.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import BuildError
from harness.stages import build_reuse
from harness.transport.local_process import run_captured, run_logged
from harness.progress import Progress

ARCH = "x86_64"
_KBUILD_ACTION = re.compile(r"^\s+(CC|LD|AR|AS|GEN|HOSTCC|OBJCOPY|BUILD|VDSO\w*)\s+(\S+)")


@dataclass(frozen=True)
class KernelBuildSpec:
    tree: Path
    build_dir: Path
    base_config: str
    fragments: tuple[Path, ...]
    jobs: int
    ccache_dir: Path
    tree_owned: bool = False  # unpacked by the harness, changed only by its patch and revert


@dataclass(frozen=True)
class Artifact:
    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> "Artifact":
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return cls(path=str(path), sha256=digest.hexdigest(), size=path.stat().st_size)


@dataclass(frozen=True)
class KernelBuildResult:
    kernel_release: str
    bzimage: Artifact
    config: Artifact
    duration_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def reproducible_build_env(**extra: str) -> dict[str, str]:
    """Fixed build user, host and time: the same tree, config and compiler give the same image on
    every machine, so checksums can show that all nodes run the same build."""
    return dict(os.environ, KBUILD_BUILD_USER="gvm-harness", KBUILD_BUILD_HOST="gvm-harness",
                KBUILD_BUILD_TIMESTAMP="2000-01-01", **extra)


def read_config_options(text: str) -> dict[str, str]:
    """Options of a .config or fragment; `# CONFIG_X is not set` reads as 'n'."""
    options = {}
    for line in text.splitlines():
        line = line.strip()
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if unset:
            options[unset.group(1)] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            options[name] = value
    return options


def dropped_options(requested: dict[str, str], final: dict[str, str]) -> list[str]:
    """Requested options whose final value differs; an absent option counts as 'n'."""
    return [f"{name}={value} (got {final.get(name, 'n')})"
            for name, value in sorted(requested.items()) if final.get(name, "n") != value]


def build_kernel(spec: KernelBuildSpec, log_path: Path, progress: Progress) -> KernelBuildResult:
    started = time.monotonic()
    for tool in ("make", "gcc", "ccache", "flex", "bison", "bc"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` is missing; run ./gvm setup to install the build tools")
    inputs = build_reuse.build_inputs(spec.tree, spec.base_config, spec.fragments,
                                      spec.tree_owned)
    reused = reused_build(spec.build_dir, inputs.key(), started)
    if reused is not None:
        progress.say(f"    reused the bzImage built in {spec.build_dir}: tree, config and "
                     f"compiler unchanged ({reused.duration_s:.1f}s, no make)")
        return reused
    build_reuse.forget(spec.build_dir)
    env = reproducible_build_env(CCACHE_DIR=str(spec.ccache_dir))
    make = ["make", "-C", str(spec.tree), f"O={spec.build_dir}", f"ARCH={ARCH}"]
    configure_kernel(spec.tree, spec.build_dir, spec.base_config, spec.fragments, log_path,
                     progress, env)
    with progress.step(f"build bzImage with -j{spec.jobs} (log: {log_path})"):
        run_logged(make + [f"-j{spec.jobs}", "CC=ccache gcc", "bzImage"], log_path, progress,
                   env=env, summarize=_summarize_kbuild_line)
    release = run_captured(make + ["-s", "kernelrelease"], env=env).strip()
    bzimage = spec.build_dir / "arch/x86/boot/bzImage"
    if not bzimage.is_file():
        raise BuildError(f"make finished but {bzimage} is missing; see {log_path}")
    result = KernelBuildResult(kernel_release=release, bzimage=Artifact.of(bzimage),
                               config=Artifact.of(spec.build_dir / ".config"),
                               duration_s=round(time.monotonic() - started, 1))
    build_reuse.write_stamp(spec.build_dir, build_reuse.BuildStamp(
        inputs.key(), release, result.bzimage.sha256, result.config.sha256))
    return result


def reused_build(build_dir: Path, key: str, started: float) -> KernelBuildResult | None:
    """The last build's result when its inputs had this key and its bzImage and .config are
    still the files it produced; None: build."""
    stamp = build_reuse.read_stamp(build_dir)
    bzimage, config = build_dir / "arch/x86/boot/bzImage", build_dir / ".config"
    if stamp is None or stamp.key != key or not bzimage.is_file() or not config.is_file():
        return None
    image, config_file = Artifact.of(bzimage), Artifact.of(config)
    if (image.sha256, config_file.sha256) != (stamp.bzimage_sha256, stamp.config_sha256):
        return None
    return KernelBuildResult(kernel_release=stamp.kernel_release, bzimage=image,
                             config=config_file, duration_s=round(time.monotonic() - started, 1))


def configure_kernel(tree: Path, build_dir: Path, base_config: str, fragments: tuple[Path, ...],
                     log_path: Path, progress: Progress, env: dict[str, str]) -> None:
    """`make <base>`, the fragments merged in order, `olddefconfig`, then every fragment's options
    checked in the result (guest kernels and emulated-host kernels alike)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    make = ["make", "-C", str(tree), f"O={build_dir}", f"ARCH={ARCH}"]
    with progress.step(f"configure kernel ({base_config} + {len(fragments)} fragments)"):
        run_logged(make + [base_config], log_path, progress, env=env)
        if fragments:
            run_logged([str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O",
                        str(build_dir), str(build_dir / ".config"), *map(str, fragments)],
                       log_path, progress, cwd=tree, env=dict(env, ARCH=ARCH))
        run_logged(make + ["olddefconfig"], log_path, progress, env=env)
        _verify_fragments(build_dir, fragments)


def _verify_fragments(build_dir: Path, fragments: tuple[Path, ...]) -> None:
    final = read_config_options((build_dir / ".config").read_text())
    problems = []
    for fragment in fragments:
        for option in dropped_options(read_config_options(fragment.read_text()), final):
            problems.append(f"  {fragment.name}: {option}")
    if problems:
        raise BuildError("these config options did not survive olddefconfig (usually a missing "
                         "dependency; add it to the fragment):\n" + "\n".join(problems))


def _summarize_kbuild_line(line: str) -> str | None:
    match = _KBUILD_ACTION.match(line)
    return f"{match.group(1)} {match.group(2)}" if match else None
