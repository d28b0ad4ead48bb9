"""The static GiantVM QEMU build, short of running it: which trees it takes, what it changes in
its copy, and what it runs in the chroot."""

from pathlib import Path

import pytest

from harness.errors import BuildError
from harness.hostkvm.qemu_build import build_script, check_giantvm_tree, fix_memfd


def test_only_a_giantvm_tree_is_taken(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a GiantVM QEMU tree"):
        check_giantvm_tree(tmp_path)
    (tmp_path / "vl.c").write_text("int main;\n")
    (tmp_path / "qemu-options.hx").write_text("DEF(\"smp\", ...)\n")
    with pytest.raises(BuildError, match="no -local-cpu"):
        check_giantvm_tree(tmp_path)
    (tmp_path / "qemu-options.hx").write_text("DEF(\"local-cpu\", HAS_ARG, ...)\n")
    check_giantvm_tree(tmp_path)


def test_the_memfd_header_is_the_one_glibc_has() -> None:
    source = "#include <unistd.h>\n#include <sys/memfd.h>\n"
    assert fix_memfd(source) == "#include <unistd.h>\n#include <sys/mman.h>\n"


def test_the_build_is_static_x86_64_with_python2_and_fcommon() -> None:
    script = build_script(jobs=2)
    assert "--python=python2" in script and "--static" in script
    assert "--target-list=x86_64-softmmu" in script and "-fcommon" in script
    assert script.rstrip().endswith("make -j2")
