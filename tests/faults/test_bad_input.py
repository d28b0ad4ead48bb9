"""Bad input, through the CLI in a process of its own: each is refused with exit 2 and a message
that says whose fault it is and what to do, and leaves the kernel tree as it was. Findings 1, 2 and
7 of issue 14; no QEMU and no kernel build here (a test tree, a test cache)."""

from __future__ import annotations

import fcntl
import os
import re
import signal
from pathlib import Path

import pytest
import yaml

from harness.run_folder import OUTCOME_FILE
from harness.transport.local_process import free_loopback_port
from tests.faults.gvm_process import (Gvm, gvm, kernel_tree, series, snapshot, tree_config,
                                      write_config)

pytestmark = pytest.mark.faults

CREATE_THEN_EDIT = [
    ("include/kvm_para.h", "#define D 4\n", "#define D 4\n#define KVM_HC_ATOMIC_INC 10\n"),
    ("kernel/time/gvm_jiffies.c", "", "int a;\nint b;\n"),
    ("kernel/time/gvm_jiffies.c", "int b;\n", "int c;\n"),  # edits the file 0002 created
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return kernel_tree(tmp_path / "linux")


def test_a_patch_that_does_not_apply_leaves_the_tree_byte_identical(tmp_path, tree) -> None:
    bad = series(tmp_path, "bad", [
        ("include/kvm_para.h", "#define A 1\n", "#define A 11\n"),
        ("kernel/time/timekeeping.c", "line 30\n", "line thirty\n"),
    ])
    patch = next(bad.glob("0002-*.patch"))
    patch.write_text(patch.read_text().replace("-line 30\n", "-line 300\n"))
    pristine = snapshot(tree)
    status, output = gvm(tree_config(tmp_path, tree, bad), "patch")
    assert status == 2, output
    assert f"{patch.name} (patch 2 of 2) does not apply" in output
    assert "kernel/time/timekeeping.c: hunk #1 (@@ -27,7 +27,7 @@ line 26) does not match" in output
    assert "The tree was not changed" in output and "Traceback" not in output
    assert snapshot(tree) == pristine


def test_revert_removes_a_file_the_series_created_and_a_later_patch_edited(tmp_path,
                                                                          tree) -> None:
    config = tree_config(tmp_path, tree, series(tmp_path, "create-edit", CREATE_THEN_EDIT))
    pristine = snapshot(tree)
    assert gvm(config, "patch")[0] == 0
    assert (tree / "kernel/time/gvm_jiffies.c").read_text() == "int a;\nint c;\n"
    status, output = gvm(config, "patch", "--revert")
    assert status == 0 and "reverted: 0001-" in output, output
    assert snapshot(tree) == pristine
    assert "not applied" in gvm(config, "status")[1]


def test_a_hand_edit_in_a_patched_file_is_refused_before_the_build(tmp_path, tree) -> None:
    config = tree_config(tmp_path, tree, series(tmp_path, "create-edit", CREATE_THEN_EDIT))
    pristine = snapshot(tree)
    assert gvm(config, "patch")[0] == 0
    created = tree / "kernel/time/gvm_jiffies.c"
    created.write_text("int a;\nint c;\nint my_experiment;\n")
    edited = snapshot(tree)
    status, output = gvm(config, "status")
    assert "changed: kernel/time/gvm_jiffies.c" in output, output
    status, output = gvm(config, "build")
    assert status == 2, output
    assert "differ from what the series makes of them: kernel/time/gvm_jiffies.c." in output
    assert "`./gvm patch --revert`" in output
    assert "configure kernel" not in output  # refused before make ran
    assert snapshot(tree) == edited
    status, output = gvm(config, "patch", "--revert")
    assert status == 0, output
    assert snapshot(tree) == pristine
    kept = Path(output.split("your edited versions of the files it touches: ")[1].split()[0])
    assert (kept / "kernel/time/gvm_jiffies.c").read_text() == "int a;\nint c;\nint my_experiment;\n"


@pytest.mark.parametrize("change, message", [
    (lambda d: d["probe"].update(transports=["ssh", "ssh"]),
     r"probe\.transports: names a transport twice"),
    (lambda d: d["vm"].update(vcpu=4), r"vm\.vcpu: unknown key; allowed here: launcher, accel"),
    (lambda d: d["timeouts"].update(boot_s="soon"), r"timeouts\.boot_s"),
], ids=["duplicate transport", "unknown key", "wrong type"])
def test_a_bad_config_is_refused_naming_file_and_key(tmp_path, tree, change, message) -> None:
    config = tree_config(tmp_path, tree, None)
    data = yaml.safe_load(config.read_text())
    change(data)
    write_config(config, data)
    status, output = gvm(config, "run")
    assert status == 2, output
    assert str(config) in output and "Traceback" not in output
    assert re.search(message, output), output
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_a_duplicate_yaml_key_is_refused(tmp_path, tree) -> None:
    config = tree_config(tmp_path, tree, None)
    config.write_text(config.read_text() + "name: twice\n")
    status, output = gvm(config, "status")
    assert status == 2, output
    assert f"{config}: not valid YAML" in output
    assert re.search(r"found key 'name' a second time \(first at line \d+\)", output), output


def test_an_unreachable_host_is_refused_before_any_patch_or_build(tmp_path, tree) -> None:
    closed = free_loopback_port()  # nothing listens: connection refused
    config = tree_config(tmp_path, tree, series(tmp_path, "s", CREATE_THEN_EDIT[:1]),
                         hosts=[{"name": "far", "address": "127.0.0.1", "port": closed,
                                 "known_hosts": str(tmp_path / "known_hosts")}])
    pristine = snapshot(tree)
    status, output = gvm(config, "run")
    assert status == 2, output
    assert f"host 'far' (root@127.0.0.1:{closed}): cannot connect" in output
    assert "nothing was built or started" in output
    assert snapshot(tree) == pristine  # not even patched
    (run,) = [p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]
    assert not (run / "build.log").exists()
    assert (run / OUTCOME_FILE).read_text().startswith("error: reach the hosts")


def test_a_second_harness_on_the_same_cache_says_whom_it_waits_for_and_stops_on_sigint(
        tmp_path, tree) -> None:
    """Also finding 7's last point: started like `./gvm run &`, SIGINT (ignored by the shell for
    background jobs) still stops it."""
    config = tree_config(tmp_path, tree, series(tmp_path, "s", CREATE_THEN_EDIT[:1]))
    pristine = snapshot(tree)
    (tmp_path / "cache").mkdir()
    with (tmp_path / "cache" / "lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        waiting = Gvm.start(config, "build", ignore_sigint=True)
        waiting.wait_for_text(f"wait for the harness run (pid {os.getpid()}) that is patching "
                              f"or building in {tmp_path / 'cache'}")
        waiting.process.send_signal(signal.SIGINT)
        status, output = waiting.finish(timeout_s=120)  # an ignored SIGINT would hang here
    assert status == 130, output
    assert "interrupted" in output
    assert snapshot(tree) == pristine
    (run,) = [p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]
    assert (run / OUTCOME_FILE).read_text().startswith("interrupted")
