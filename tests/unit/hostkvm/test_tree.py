"""Host-tree detection and build selection on small fake Linux-DSM trees made in the test.

The fake trees carry only what detection reads: the version lines of the top Makefile and the
marks of the two ktcp.c variants. The real trees are built by tests/integration/test_host_build.py.
"""

import io
import re
from pathlib import Path

import pytest

from harness.hostkvm import tree as host_tree
from harness.errors import BuildError
from harness.hostkvm.tree import (HOST_PATCHES, HostBase, HostTreeError, KvmBuildMode, build_kvm,
                               build_mode, detect_base, open_host_tree)
from harness.stages.patches import PatchSeries
from harness.progress import Progress

SOCKET_KTCP = "struct ktcp_cb {\n\tstruct socket *socket;\n};\n" \
              "len = kernel_sendmsg(sock, &msg, &vec, 1, left);\n"
LOCAL_KTCP = "static void ktcp_cache_put(int channel, uint32_t txid, struct ktcp_hdr* hdr)\n" \
             "ret=1<<(ret-37710);\n"
# What moharaka's write_update* branches have in ivy.c.
ORIGINAL_ATOMIC_INC = "int send_upd_request(struct kvm *kvm, phys_addr_t var_gpa, long var_size," \
                      "long var_datas);\n"
MODULE_CONFIG = {"CONFIG_KVM": "m", "CONFIG_KVM_INTEL": "m", "CONFIG_KVM_DSM": "y",
                 "CONFIG_INFINIBAND": "m", "CONFIG_INFINIBAND_ADDR_TRANS": "y"}


def fake_tree(root: Path, ktcp: str, version: tuple[int, int, int] = (4, 9, 76),
              ivy: str = "int ivy_kvm_dsm_handle_req(void *data);\n") -> Path:
    major, minor, sublevel = version
    (root / "arch/x86/kvm").mkdir(parents=True)
    (root / "Makefile").write_text(f"VERSION = {major}\nPATCHLEVEL = {minor}\n"
                                   f"SUBLEVEL = {sublevel}\nEXTRAVERSION =\n")
    (root / "arch/x86/kvm/ktcp.c").write_text(ktcp)
    (root / "arch/x86/kvm/ivy.c").write_text(ivy)
    (root / "arch/x86/kvm/dsm.c").write_text("static int kvm_dsm_init(void);\n")
    return root


@pytest.mark.parametrize("ktcp, base", [(SOCKET_KTCP, HostBase.GIANTVM_MASTER),
                                        (LOCAL_KTCP, HostBase.MOHARAKA_SHARED_MEM)])
def test_detects_base_and_maps_it_to_its_series(tmp_path: Path, ktcp: str,
                                                base: HostBase) -> None:
    tree = open_host_tree(fake_tree(tmp_path / "linux", ktcp))
    assert tree.base is base
    assert tree.series_dir == HOST_PATCHES / base.value
    assert tree.load_series().names  # the series directory of the repository, with patches


def test_an_already_patched_tree_is_still_recognised(tmp_path: Path) -> None:
    """Our own series leaves the base marks alone, so status/revert work on a patched tree."""
    ivy = "int send_upd_request(struct kvm_vcpu *vcpu, gpa_t gpa, unsigned long size,\n"
    assert detect_base(fake_tree(tmp_path, LOCAL_KTCP, ivy=ivy)) is HostBase.MOHARAKA_SHARED_MEM


@pytest.mark.parametrize("setup, message", [
    (lambda root: root.mkdir(), "no Makefile"),
    (lambda root: (root.mkdir(), (root / "Makefile").write_text("VERSION = 4\n")),
     "not a Linux-DSM tree"),
    (lambda root: fake_tree(root, SOCKET_KTCP, version=(4, 18, 20)), "Linux 4.18.20, but"),
    (lambda root: fake_tree(root, "len = kernel_sendmsg(sock, &msg, &vec, 1, left);\n"),
     "neither moharaka's local ktcp nor GiantVM master's socket ktcp"),
    (lambda root: fake_tree(root, LOCAL_KTCP + SOCKET_KTCP), "neither"),
    (lambda root: fake_tree(root, LOCAL_KTCP, ivy=ORIGINAL_ATOMIC_INC), "start from moharaka"),
])
def test_refuses_other_trees_and_says_what_fits(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "linux"
    setup(root)
    with pytest.raises(HostTreeError) as raised:
        detect_base(root)
    assert message in str(raised.value)
    assert "moharaka/Linux-DSM shared_mem" in str(raised.value)  # says what would fit


def test_module_config_builds_modules_and_built_in_kvm_the_kernel() -> None:
    assert build_mode(MODULE_CONFIG) is KvmBuildMode.MODULES
    built_in = dict(MODULE_CONFIG, CONFIG_KVM="y", CONFIG_KVM_INTEL="y", CONFIG_INFINIBAND="y")
    assert build_mode(built_in) is KvmBuildMode.FULL_KERNEL


@pytest.mark.parametrize("changes, named", [
    ({"CONFIG_KVM": "n"}, ["CONFIG_KVM is not enabled"]),
    ({"CONFIG_KVM_DSM": "n", "CONFIG_INFINIBAND_ADDR_TRANS": "n"},
     ["CONFIG_KVM_DSM=y (is n)", "CONFIG_INFINIBAND_ADDR_TRANS=y (is n)"]),
    # krdma.o is linked into kvm: a built-in kvm cannot use a modular ib_core.
    ({"CONFIG_KVM": "y", "CONFIG_KVM_INTEL": "y"}, ["CONFIG_INFINIBAND=y (is m)"]),
])
def test_config_that_cannot_build_the_dsm_kvm_names_the_options(changes: dict[str, str],
                                                                named: list[str]) -> None:
    config = {name: value for name, value in dict(MODULE_CONFIG, **changes).items()
              if value != "n"}
    with pytest.raises(BuildError) as raised:
        build_mode(config)
    for text in named:
        assert text in str(raised.value)


def test_build_without_config_says_where_it_looked(tmp_path: Path) -> None:
    tree = open_host_tree(fake_tree(tmp_path / "linux", SOCKET_KTCP))
    with pytest.raises(BuildError, match=r"linux/\.config is missing"):
        build_kvm(tree, tmp_path / "build.log", Progress(io.StringIO()))


def test_module_build_with_modversions_needs_the_kernels_symvers(tmp_path: Path) -> None:
    tree = open_host_tree(fake_tree(tmp_path / "linux", SOCKET_KTCP))
    config = dict(MODULE_CONFIG, CONFIG_MODVERSIONS="y")
    (tree.path / ".config").write_text("".join(f"{name}={value}\n"
                                               for name, value in config.items()))
    with pytest.raises(BuildError, match=r"linux/Module\.symvers is missing"):
        build_kvm(tree, tmp_path / "build.log", Progress(io.StringIO()))


@pytest.mark.parametrize("make_version, refused", [("GNU Make 4.3\n", True),
                                                   ("GNU Make 4.2.1\n", False)])
def test_stack_validation_is_refused_only_with_a_make_that_breaks_objtool(
        monkeypatch: pytest.MonkeyPatch, make_version: str, refused: bool) -> None:
    monkeypatch.setattr(host_tree, "run_captured", lambda args: make_version)
    config = dict(MODULE_CONFIG, CONFIG_STACK_VALIDATION="y")
    if refused:
        with pytest.raises(BuildError, match="scripts/config -d STACK_VALIDATION"):
            host_tree._refuse_objtool_with_new_make(config)
    else:
        host_tree._refuse_objtool_with_new_make(config)


@pytest.mark.parametrize("base", list(HostBase))
def test_each_series_is_a_format_patch_series_of_the_expected_files(base: HostBase) -> None:
    series = PatchSeries.load(base.series_dir)
    touched = set()
    for patch in series.patches:
        assert re.search(r"^From: .+$", patch.text, re.M), patch.name
        assert re.search(r"^Subject: \[PATCH \d+/\d+\] kvm: dsm: ", patch.text, re.M), patch.name
        touched |= set(re.findall(r"^\+\+\+ b/(\S+)$", patch.text, re.M))
    assert {"include/uapi/linux/kvm_para.h", "arch/x86/kvm/x86.c", "arch/x86/kvm/ivy.c",
            "arch/x86/kvm/ivy.h", "arch/x86/kvm/dsm.c"} <= touched
    assert touched <= {"include/uapi/linux/kvm_para.h", "arch/x86/include/asm/kvm_host.h",
                       "arch/x86/kvm/x86.c", "arch/x86/kvm/ivy.c", "arch/x86/kvm/ivy.h",
                       "arch/x86/kvm/dsm.c", "arch/x86/kvm/dsm-util.h",
                       "arch/x86/kvm/dsm-util.c",  # giantvm-master: latency samples, TCP_NODELAY
                       "arch/x86/kvm/ktcp.c",  # giantvm-master: its socket ktcp
                       "arch/x86/kvm/ktcp.h"}  # both: the receive takes a size and a timeout
    added = "".join(line for patch in series.patches for line in patch.text.splitlines(True)
                    if line.startswith("+"))
    assert re.search(r"#define KVM_HC_ATOMIC_INC\s+10\b", added)
    assert "module_param_cb(atomic_inc_mode," in added
