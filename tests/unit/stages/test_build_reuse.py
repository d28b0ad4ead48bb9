"""The warm path: a build directory's last result is reused only while nothing it came from
changed, and never after a build that did not finish."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness.progress import Progress
from harness.stages import build, build_reuse
from harness.stages.build import KernelBuildSpec, build_kernel
from harness.stages.patches import RECORD_DIR


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "linux"
    (tree / "kernel/time").mkdir(parents=True)
    (tree / "Makefile").write_text("VERSION = 6\n")
    (tree / "kernel/time/timekeeping.c").write_text("int jiffies;\n")
    return tree


def _later(path: Path) -> None:
    """Make sure the next change gets a newer timestamp on coarse-clock filesystems."""
    time.sleep(0.01)
    os.utime(path)


def test_the_tree_fingerprint_moves_on_edit_add_and_remove(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    first = build_reuse.tree_fingerprint(tree)
    assert first[0] == 2 and build_reuse.tree_fingerprint(tree) == first
    _later(tree / "Makefile")
    edited = build_reuse.tree_fingerprint(tree)
    assert edited[1] > first[1]
    (tree / "kernel/new.c").write_text("")
    assert build_reuse.tree_fingerprint(tree)[0] == 3
    (tree / "kernel/new.c").unlink()
    assert build_reuse.tree_fingerprint(tree)[0] == 2


def test_an_owned_tree_is_known_by_its_series_record_and_version(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    pristine = build_reuse.owned_tree_state(tree)
    record = tree / RECORD_DIR
    record.mkdir(parents=True)
    (record / "series").write_text("0001-a.patch\n")
    (record / "0001-a.patch").write_text("--- a\n+++ b\n")
    applied = build_reuse.owned_tree_state(tree)
    assert applied != pristine
    (record / "0001-a.patch").write_text("--- a\n+++ c\n")  # another version of the patch
    assert build_reuse.owned_tree_state(tree) not in (pristine, applied)
    (tree / "Makefile").write_text("VERSION = 7\n")
    assert build_reuse.build_inputs(tree, "tinyconfig", (), True).tree_state.startswith("owned ")


def test_the_key_follows_fragments_and_base(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    fragment = tmp_path / "guest.config"
    fragment.write_text("CONFIG_SMP=y\n")
    key = build_reuse.build_inputs(tree, "tinyconfig", (fragment,), False).key()
    assert build_reuse.build_inputs(tree, "tinyconfig", (fragment,), False).key() == key
    assert build_reuse.build_inputs(tree, "defconfig", (fragment,), False).key() != key
    fragment.write_text("CONFIG_SMP=n\n")
    assert build_reuse.build_inputs(tree, "tinyconfig", (fragment,), False).key() != key


def _built(tmp_path: Path) -> tuple[KernelBuildSpec, str]:
    """A build directory as a successful build leaves it, with its stamp."""
    tree = _tree(tmp_path)
    spec = KernelBuildSpec(tree, tmp_path / "build", "tinyconfig", (), 2, tmp_path / "ccache")
    (spec.build_dir / "arch/x86/boot").mkdir(parents=True)
    (spec.build_dir / "arch/x86/boot/bzImage").write_bytes(b"kernel")
    (spec.build_dir / ".config").write_text("CONFIG_HZ=250\n")
    key = build_reuse.build_inputs(tree, "tinyconfig", (), False).key()
    image = build.Artifact.of(spec.build_dir / "arch/x86/boot/bzImage")
    config = build.Artifact.of(spec.build_dir / ".config")
    build_reuse.write_stamp(spec.build_dir, build_reuse.BuildStamp(key, "6.1.0", image.sha256,
                                                                   config.sha256))
    return spec, key


def test_an_unchanged_build_is_reused_without_make(tmp_path: Path, monkeypatch) -> None:
    spec, _ = _built(tmp_path)

    def no_make(*args, **kwargs):
        raise AssertionError("make ran on a warm build")
    monkeypatch.setattr(build, "run_logged", no_make)
    monkeypatch.setattr(build, "run_captured", no_make)
    result = build_kernel(spec, tmp_path / "build.log", Progress())
    assert result.kernel_release == "6.1.0"
    assert result.bzimage.path == str(spec.build_dir / "arch/x86/boot/bzImage")


@pytest.mark.parametrize("change", ["tree", "bzImage", ".config", "stamp"])
def test_anything_changed_means_a_build(tmp_path: Path, change: str) -> None:
    spec, key = _built(tmp_path)
    if change == "tree":
        _later(spec.tree / "kernel/time/timekeeping.c")
        key = build_reuse.build_inputs(spec.tree, "tinyconfig", (), False).key()
    elif change == "bzImage":
        (spec.build_dir / "arch/x86/boot/bzImage").write_bytes(b"relinked by a stopped build")
    elif change == ".config":
        (spec.build_dir / ".config").write_text("CONFIG_HZ=1000\n")
    else:
        build_reuse.forget(spec.build_dir)
    assert build.reused_build(spec.build_dir, key, time.monotonic()) is None


def test_a_failed_build_leaves_no_stamp(tmp_path: Path, monkeypatch) -> None:
    spec, _ = _built(tmp_path)
    _later(spec.tree / "Makefile")

    def failing(*args, **kwargs):
        raise build.BuildError("make failed")
    monkeypatch.setattr(build, "configure_kernel", failing)
    with pytest.raises(build.BuildError):
        build_kernel(spec, tmp_path / "build.log", Progress())
    assert build_reuse.read_stamp(spec.build_dir) is None
