"""The host series on real Linux-DSM trees: they apply, and kvm.ko / kvm-intel.ko build with them.

Set GVM_HOST_TREE_GIANTVM (GiantVM/Linux-DSM master) and GVM_HOST_TREE_MOHARAKA (moharaka/Linux-DSM
shared_mem) to pristine trees; each unset one is skipped (CI has no trees). The tree is copied, so
it stays untouched (the copy is removed afterwards, the build log kept); the copy gets the
compile-check config of host_patches/README.md, the series and a module build: 3 to 4 minutes per
tree on a busy 2-core machine, and about 1 GB of disk while it runs. Nothing here loads or runs the
modules: that needs a host with VT-x.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.hostkvm.tree import HostBase, KvmModulesBuild, build_kvm, open_host_tree
from harness.stages.patches import SeriesState
from harness.progress import Progress

CASES = [pytest.param("GVM_HOST_TREE_GIANTVM", HostBase.GIANTVM_MASTER, id="giantvm-master"),
         pytest.param("GVM_HOST_TREE_MOHARAKA", HostBase.MOHARAKA_SHARED_MEM,
                      id="moharaka-shared_mem")]
# x86_64_defconfig plus these (scripts/config syntax); STACK_VALIDATION off because Linux 4.9's
# objtool does not build with GNU make 4.3.
CONFIG = ["-e", "VIRTUALIZATION", "-m", "KVM", "-m", "KVM_INTEL", "-e", "KVM_DSM",
          "-m", "INFINIBAND", "-e", "INFINIBAND_ADDR_TRANS", "-d", "STACK_VALIDATION"]
# update_local, dsm_handle_send_upd_req and atomic_inc_install (the page-install rule) are
# noinline; gcc may still clone them (.isra.0).
NEW_SYMBOLS = ("send_upd_request", "update_local", "dsm_handle_send_upd_req", "atomic_inc_merge",
               "atomic_inc_install", "__param_atomic_inc_mode")
_EXPORT = re.compile(r"(EXPORT_\w*SYMBOL\w*|STANDARD_PARAM_DEF)\(\s*(\w+)")
_WARNING = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):\d+: warning: (?P<text>.*)$", re.M)


@pytest.mark.parametrize("variable, base", CASES)
def test_series_applies_and_kvm_modules_build(variable: str, base: HostBase,
                                              tmp_path: Path) -> None:
    source = os.environ.get(variable)
    if not source:
        pytest.skip(f"{variable} is not set: point it at a pristine {base.value} Linux-DSM tree "
                    "to build its host kvm modules")
    source_tree = Path(source)
    fingerprint = _fingerprint(source_tree)
    tree = tmp_path / "linux"
    log = tmp_path / "build.log"
    try:
        subprocess.run(["cp", "-a", f"{source_tree}/.", str(tree)], check=True)
        host = open_host_tree(tree)
        assert host.base is base
        series = host.load_series()
        assert series.status(tree).state is SeriesState.NOT_APPLIED, \
            f"{source_tree} is not pristine: {series.status(tree).describe()}"
        _configure(tree, log)
        assert series.apply(tree).applied == series.names

        result = build_kvm(host, log, Progress(sys.stderr))

        assert isinstance(result, KvmModulesBuild)
        assert result.base is base and result.kernel_release.startswith("4.9.76")
        assert result.series == f"{base.value}: applied: {', '.join(series.names)}"
        for artifact in (result.kvm, result.kvm_intel):
            assert re.fullmatch(r"[0-9a-f]{64}", artifact.sha256) and artifact.size > 0
        kvm, kvm_intel = Path(result.kvm.path), Path(result.kvm_intel.path)
        defined = _nm(kvm, "--defined-only")
        missing = [name for name in NEW_SYMBOLS
                   if not any(s == name or s.startswith(name + ".") for s in defined)]
        assert not missing, f"symbols missing from {kvm}: {missing}"
        assert re.search(r"^atomic_inc_mode:.*send_all.*local_first", _modinfo(kvm), re.M)
        exported = _exported_symbols(tree)
        for module in (kvm, kvm_intel):
            unresolved = sorted(_nm(module, "--undefined-only") - exported)
            assert not unresolved, f"{module.name} needs symbols the tree does not export: " \
                                   f"{unresolved}"
        new_warnings = _warnings_on_changed_lines(source_tree, tree, _touched_files(base),
                                                  log.read_text())
        assert not new_warnings, "the series adds compiler warnings:\n" + "\n".join(new_warnings)
    finally:
        shutil.rmtree(tree, ignore_errors=True)  # GBs; the build log stays in tmp_path
    assert _fingerprint(source_tree) == fingerprint, f"{source_tree} was changed"


def _configure(tree: Path, log: Path) -> None:
    with log.open("a") as out:
        for args in (["make", "-C", str(tree), "x86_64_defconfig"],
                     [str(tree / "scripts/config"), "--file", str(tree / ".config"), *CONFIG],
                     ["make", "-C", str(tree), "olddefconfig"]):
            out.write(f"$ {' '.join(args)}\n")
            out.flush()
            subprocess.run(args, check=True, stdout=out, stderr=subprocess.STDOUT)


def _fingerprint(tree: Path) -> dict[str, str]:
    """Checksums of every file a series touches, and whether the harness left a record."""
    files = set().union(*(_touched_files(base) for base in HostBase))
    sums = {name: hashlib.sha256((tree / name).read_bytes()).hexdigest() for name in sorted(files)}
    sums[".gvm-harness"] = str((tree / ".gvm-harness").exists())
    return sums


def _touched_files(base: HostBase) -> set[str]:
    return {path for patch in base.series_dir.glob("*.patch")
            for path in re.findall(r"^\+\+\+ b/(\S+)$", patch.read_text(), re.M)}


def _nm(module: Path, which: str) -> set[str]:
    output = subprocess.run(["nm", which, str(module)], check=True, capture_output=True,
                            text=True).stdout
    return {line.split()[-1] for line in output.splitlines() if line.strip()}


def _modinfo(module: Path) -> str:
    modinfo = shutil.which("modinfo") or "/sbin/modinfo"
    return subprocess.run([modinfo, "-p", str(module)], check=True, capture_output=True,
                          text=True).stdout


def _exported_symbols(tree: Path) -> set[str]:
    """Without vmlinux modpost cannot check a module build, so read the exports from the source."""
    output = subprocess.run(["grep", "-rhoE", "--include=*.c", "--include=*.h", "--include=*.S",
                             _EXPORT.pattern, str(tree)], capture_output=True, text=True).stdout
    exported = set()
    for macro, name in _EXPORT.findall(output):
        if macro == "STANDARD_PARAM_DEF":
            exported |= {f"param_ops_{name}", f"param_set_{name}", f"param_get_{name}"}
        elif "TRACEPOINT" in macro:
            exported.add(f"__tracepoint_{name}")
        else:
            exported.add(name)
    return exported


def _warnings_on_changed_lines(pristine: Path, patched: Path, touched: set[str],
                               build_log: str) -> list[str]:
    """Compiler warnings that point at a line the series added or changed."""
    changed: dict[str, set[int]] = {}
    found = []
    for warning in _WARNING.finditer(build_log):
        name = os.path.normpath(warning["file"])
        if name not in touched:
            continue
        if name not in changed:
            changed[name] = _changed_lines(pristine / name, patched / name)
        if int(warning["line"]) in changed[name]:
            found.append(warning.group(0))
    return found


def _changed_lines(before: Path, after: Path) -> set[int]:
    if not after.is_file():
        return set()
    old = before.read_text(errors="replace").splitlines() if before.is_file() else []
    new = after.read_text(errors="replace").splitlines()
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return {line + 1 for tag, _, _, start, end in matcher.get_opcodes()
            if tag in ("replace", "insert") for line in range(start, end)}
