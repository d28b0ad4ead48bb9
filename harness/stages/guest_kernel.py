"""The guest kernel stage: the tree with the series that fits it applied, built while no other run
touches the shared cache."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from harness.config import ClusterConfig
from harness.errors import HarnessError
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages.build import KernelBuildResult, KernelBuildSpec, build_kernel, read_config_options
from harness.stages.cache_lock import cache_lock
from harness.stages.kernel_source import (DEBIAN_PREFIX, KernelVersion, kernel_version,
                                          resolve_tree, select_series)
from harness.stages.patches import ApplyOutcome, PatchSeries

SERIES_FRAGMENT = "kconfig.fragment"


@dataclass(frozen=True)
class PreparedTree:
    tree: Path
    version: KernelVersion
    series: PatchSeries | None
    outcome: ApplyOutcome | None


def guest_series(config: ClusterConfig,
                 progress: Progress) -> tuple[Path, KernelVersion, PatchSeries | None]:
    """The guest tree, its version and the series that fits it (None if none is configured)."""
    tree = resolve_tree(config.guest.kernel.source, config.cache_dir, progress)
    version = kernel_version(tree)
    if config.guest.kernel.patches is None:
        return tree, version, None
    return tree, version, select_series(config.guest.kernel.patches, version)


def apply_series(series: PatchSeries, tree: Path, what: str, progress: Progress) -> ApplyOutcome:
    with progress.step(f"apply {series.directory.name} ({len(series.patches)} patches) to {what}"):
        outcome = series.apply(tree)
    progress.say(f"    {'already applied' if outcome.already_applied else 'applied'}: "
                 f"{', '.join(series.names) or '(empty series)'}")
    return outcome


def prepare_guest_tree(config: ClusterConfig, progress: Progress) -> PreparedTree:
    tree, version, series = guest_series(config, progress)
    if series is None:
        return PreparedTree(tree, version, None, None)
    return PreparedTree(tree, version, series,
                        apply_series(series, tree, f"Linux {version}", progress))


def build_guest_kernel(config: ClusterConfig, prepared: PreparedTree, run: RunFolder,
                       progress: Progress) -> KernelBuildResult:
    kernel = config.guest.kernel
    fragments = kernel.fragments
    if prepared.series and (prepared.series.directory / SERIES_FRAGMENT).is_file():
        fragments += (prepared.series.directory / SERIES_FRAGMENT,)
    spec = KernelBuildSpec(
        tree=prepared.tree, build_dir=config.cache_dir / "build" /
        f"{prepared.tree.name}-{kernel.base_config}", base_config=kernel.base_config,
        fragments=fragments, jobs=kernel.make_jobs, ccache_dir=config.cache_dir / "ccache",
        tree_owned=kernel.source.startswith(DEBIAN_PREFIX))
    result = kept_in_run(build_kernel(spec, run.file("build.log"), progress), run)
    run.write_json("build.json", {**result.to_dict(), "tree": str(prepared.tree),
                                  "version": str(prepared.version),
                                  "series": list(prepared.series.names) if prepared.series else [],
                                  "fragments": [str(f) for f in fragments]})
    return result


def kept_in_run(result: KernelBuildResult, run: RunFolder) -> KernelBuildResult:
    """The bzImage and .config copied into the run folder while the cache lock is held: the
    shared build directory is another run's to rebuild (with another series) as soon as the lock
    is free, and the run folder can then boot again what it judged."""
    bzimage, config = run.file("bzImage"), run.file("kernel.config")
    shutil.copy2(result.bzimage.path, bzimage)
    shutil.copy2(result.config.path, config)
    return replace(result, bzimage=replace(result.bzimage, path=str(bzimage)),
                   config=replace(result.config, path=str(config)))


def patch_and_build(config: ClusterConfig, run: RunFolder,
                    progress: Progress) -> tuple[PreparedTree, KernelBuildResult]:
    """The guest kernel with the series applied, built while no other run touches the cache."""
    with cache_lock(config.cache_dir, progress):
        prepared = prepare_guest_tree(config, progress)
        return prepared, build_guest_kernel(config, prepared, run, progress)


def kernel_hz(config_file: Path) -> int:
    hz = read_config_options(config_file.read_text()).get("CONFIG_HZ")
    if hz is None:
        raise HarnessError(f"{config_file} has no CONFIG_HZ; cannot judge the tick rate")
    return int(hz)
