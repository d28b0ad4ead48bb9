"""Patch-series logic against small git repositories made in the test, with real `git format-patch`."""

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import PatchError
from harness.stages.patches import RECORD_DIR, RESULT_DIR, PatchSeries, SeriesState

ORIGINAL = {
    "kernel/time/timekeeping.c": "".join(f"line {n}\n" for n in range(1, 41)),
    "include/kvm_para.h": "#define A 1\n#define B 2\n#define C 3\n#define D 4\n",
}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.parts}


def make_series(tmp_path: Path, name: str, edits: list[tuple[str, str, str]]) -> PatchSeries:
    """Commit each (file, old, new) edit in a scratch repo and export them with format-patch."""
    repo = tmp_path / f"{name}-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.invalid")
    git(repo, "config", "user.name", "t")
    write_tree(repo, ORIGINAL)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    for number, (path, old, new) in enumerate(edits, start=1):
        target = repo / path
        text = target.read_text() if target.exists() else ""
        assert old in text
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace(old, new, 1) if old else new)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"edit {number}")
    out = tmp_path / name
    git(repo, "format-patch", "-q", "-o", str(out), f"HEAD~{len(edits)}")
    names = sorted(p.name for p in out.glob("*.patch"))
    (out / "series").write_text("# test series\n" + "\n".join(names) + "\n")
    return PatchSeries.load(out)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "linux"
    write_tree(root, ORIGINAL)
    return root


@pytest.fixture
def series(tmp_path: Path) -> PatchSeries:
    return make_series(tmp_path, "good", [
        ("include/kvm_para.h", "#define D 4\n", "#define D 4\n#define KVM_HC_ATOMIC_INC 10\n"),
        ("kernel/time/timekeeping.c", "line 20\n", "line 20\nhypercall\n"),
        ("kernel/time/timekeeping.c", "hypercall\n", "hypercall(ticks)\n"),
        ("kernel/time/probe.c", "", "new file\n"),
    ])


def test_clean_apply_then_idempotent(tree: Path, series: PatchSeries) -> None:
    assert series.status(tree).state is SeriesState.NOT_APPLIED
    outcome = series.apply(tree)
    assert outcome.applied == series.names and not outcome.already_applied
    assert "hypercall(ticks)\n" in (tree / "kernel/time/timekeeping.c").read_text()
    assert (tree / "kernel/time/probe.c").read_text() == "new file\n"
    assert series.status(tree).state is SeriesState.APPLIED
    patched = snapshot(tree)
    assert series.apply(tree).already_applied
    assert snapshot(tree) == patched


def test_revert_restores_the_pristine_tree(tree: Path, series: PatchSeries) -> None:
    pristine = snapshot(tree)
    series.apply(tree)
    assert series.revert(tree).names == series.names
    assert snapshot(tree) == pristine
    assert not (tree / ".gvm-harness").exists() or not any((tree / ".gvm-harness").rglob("*"))


def test_conflict_in_third_patch_leaves_tree_unchanged(tmp_path: Path, tree: Path) -> None:
    series = make_series(tmp_path, "bad", [
        ("include/kvm_para.h", "#define A 1\n", "#define A 11\n"),
        ("kernel/time/timekeeping.c", "line 5\n", "line five\n"),
        ("kernel/time/timekeeping.c", "line 30\n", "line thirty\n"),
    ])
    (tree / "kernel/time/timekeeping.c").write_text(
        ORIGINAL["kernel/time/timekeeping.c"].replace("line 29\n", "drifted 29\n"))
    before = snapshot(tree)
    with pytest.raises(PatchError) as error:
        series.apply(tree)
    message = str(error.value)
    assert "patch 3 of 3" in message and series.names[2] in message
    assert "kernel/time/timekeeping.c" in message and "hunk #1 (@@ -27," in message
    assert "not changed" in message
    assert snapshot(tree) == before


def test_already_applied_by_hand_is_detected_and_refused(tree: Path, series: PatchSeries) -> None:
    series.apply(tree)
    for recorded in sorted((tree / ".gvm-harness").rglob("*"), reverse=True):
        recorded.unlink() if recorded.is_file() else recorded.rmdir()
    assert series.status(tree).state is SeriesState.APPLIED_UNRECORDED
    before = snapshot(tree)
    with pytest.raises(PatchError, match="already applied, but not by the harness"):
        series.apply(tree)
    assert snapshot(tree) == before


def test_switching_series_reverts_the_old_one(tmp_path: Path, tree: Path,
                                             series: PatchSeries) -> None:
    other = make_series(tmp_path, "other", [
        ("kernel/time/timekeeping.c", "line 20\n", "line 20\nother\n"),
    ])
    series.apply(tree)
    outcome = other.apply(tree)
    assert outcome.reverted == series.names and outcome.applied == other.names
    text = (tree / "kernel/time/timekeeping.c").read_text()
    assert "other\n" in text and "hypercall" not in text
    assert not (tree / "kernel/time/probe.c").exists()
    assert other.status(tree).state is SeriesState.APPLIED
    assert series.status(tree).state is SeriesState.OTHER_SERIES_APPLIED


def test_switch_to_a_conflicting_series_keeps_the_old_one(tmp_path: Path, tree: Path,
                                                          series: PatchSeries) -> None:
    broken = make_series(tmp_path, "broken", [
        ("include/kvm_para.h", "#define B 2\n", "#define B 22\n"),
    ])
    (broken.directory / broken.names[0]).write_text(
        (broken.directory / broken.names[0]).read_text().replace("-#define B 2", "-#define B 7"))
    broken = PatchSeries.load(broken.directory)
    series.apply(tree)
    before = snapshot(tree)
    with pytest.raises(PatchError, match="include/kvm_para.h"):
        broken.apply(tree)
    assert snapshot(tree) == before
    assert series.status(tree).state is SeriesState.APPLIED


def test_tree_inside_another_git_work_tree(tmp_path: Path, series: PatchSeries) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    git(outer, "init", "-q")
    tree = outer / "src" / "linux"
    write_tree(tree, ORIGINAL)
    series.apply(tree)
    assert "hypercall(ticks)" in (tree / "kernel/time/timekeeping.c").read_text()


def test_tree_that_is_a_git_repository(tmp_path: Path, series: PatchSeries) -> None:
    tree = tmp_path / "repo-tree"
    write_tree(tree, ORIGINAL)
    git(tree, "init", "-q")
    series.apply(tree)
    assert "KVM_HC_ATOMIC_INC" in (tree / "include/kvm_para.h").read_text()


def test_series_file_errors_are_specific(tmp_path: Path) -> None:
    with pytest.raises(PatchError, match="no series file"):
        PatchSeries.load(tmp_path)
    (tmp_path / "series").write_text("0001-missing.patch\n")
    with pytest.raises(PatchError, match=r"series:1: lists '0001-missing.patch'"):
        PatchSeries.load(tmp_path)


def test_empty_series_is_a_no_op(tmp_path: Path, tree: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "series").write_text("# nothing yet\n")
    before = snapshot(tree)
    assert PatchSeries.load(empty).apply(tree).applied == ()
    assert snapshot(tree) == before


def test_missing_tree(tmp_path: Path, series: PatchSeries) -> None:
    with pytest.raises(PatchError, match="not a directory"):
        series.apply(tmp_path / "nope")


def test_a_file_created_then_edited_by_the_series_is_removed_by_revert(tmp_path: Path,
                                                                         tree: Path) -> None:
    pristine = snapshot(tree)
    series = make_series(tmp_path, "create-edit", [
        ("kernel/time/gvm_jiffies.c", "", "int a;\nint b;\n"),
        ("kernel/time/gvm_jiffies.c", "int b;\n", "int c;\n"),
    ])
    series.apply(tree)
    assert (tree / "kernel/time/gvm_jiffies.c").read_text() == "int a;\nint c;\n"
    assert series.revert(tree).names == series.names
    assert snapshot(tree) == pristine
    other = make_series(tmp_path, "other", [("kernel/time/gvm_jiffies.c", "", "int z;\n")])
    series.apply(tree)
    other.apply(tree)  # switching series used to fail: "gvm_jiffies.c: already exists"
    assert (tree / "kernel/time/gvm_jiffies.c").read_text() == "int z;\n"


def two_file_series(tmp_path: Path) -> PatchSeries:
    return make_series(tmp_path, "two", [
        ("include/kvm_para.h", "#define A 1\n", "#define A 10\n"),
        ("kernel/time/timekeeping.c", "line 3\n", "line three\n"),
    ])


def test_a_revert_that_fails_half_way_changes_nothing(tmp_path: Path, tree: Path) -> None:
    series = two_file_series(tmp_path)
    series.apply(tree)
    shutil.rmtree(tree / RECORD_DIR / RESULT_DIR)  # recorded before the harness kept copies
    (tree / "include/kvm_para.h").write_text("edited by hand\n")
    applied = snapshot(tree)
    with pytest.raises(PatchError, match="does not revert cleanly.*Restore a pristine tree"):
        series.revert(tree)
    assert snapshot(tree) == applied  # timekeeping.c was reverted only in the scratch copy


def test_a_hand_edit_in_a_touched_file_is_named_and_refused(tmp_path: Path, tree: Path,
                                                           series: PatchSeries) -> None:
    series.apply(tree)
    timekeeping = tree / "kernel/time/timekeeping.c"
    timekeeping.write_text(timekeeping.read_text().replace("line 1\n", "line one\n"))
    (tree / "kernel/time/probe.c").unlink()  # created by the series, removed by hand
    (tree / "kernel/untouched.c").write_text("not the series' business\n")
    status = series.status(tree)
    assert status.state is SeriesState.APPLIED_CHANGED
    assert status.changed_files == ("kernel/time/probe.c", "kernel/time/timekeeping.c")
    assert "./gvm patch --revert" in status.describe()
    edited = snapshot(tree)
    with pytest.raises(PatchError, match=r"differ from what the series makes of them: "
                                         r"kernel/time/probe.c, kernel/time/timekeeping.c\. .*"
                                         r"`\./gvm patch --revert`.*Nothing was changed"):
        series.apply(tree)
    other = make_series(tmp_path, "other", [("include/kvm_para.h", "#define A 1\n", "#define A 2\n")])
    with pytest.raises(PatchError, match="kernel/time/timekeeping.c"):
        other.apply(tree)  # switching series refuses too, before anything is written
    assert snapshot(tree) == edited


def test_revert_of_a_hand_edited_tree_gives_the_pristine_tree_and_keeps_the_edits(
        tmp_path: Path, tree: Path, series: PatchSeries) -> None:
    pristine = snapshot(tree)
    series.apply(tree)
    timekeeping = tree / "kernel/time/timekeeping.c"
    edited = timekeeping.read_text().replace("hypercall(ticks)\n", "my experiment\n")
    timekeeping.write_text(edited)
    reverted = series.revert(tree)
    assert reverted.names == series.names
    assert snapshot(tree) == pristine
    assert reverted.kept_edits is not None and reverted.kept_edits.parent == tree.parent
    assert (reverted.kept_edits / "kernel/time/timekeeping.c").read_text() == edited
    series.apply(tree)
    assert series.status(tree).state is SeriesState.APPLIED


def test_a_tree_recorded_before_copies_were_kept_is_checked_by_deriving_them(
        tmp_path: Path, tree: Path) -> None:
    series = two_file_series(tmp_path)
    series.apply(tree)
    shutil.rmtree(tree / RECORD_DIR / RESULT_DIR)
    assert series.status(tree).state is SeriesState.APPLIED
    assert series.apply(tree).already_applied
    assert (tree / RECORD_DIR / RESULT_DIR / "kernel/time/timekeeping.c").is_file()  # kept now
    shutil.rmtree(tree / RECORD_DIR / RESULT_DIR)
    (tree / "kernel/time/timekeeping.c").write_text("rewritten\n")
    with pytest.raises(PatchError, match="does not revert cleanly"):
        series.apply(tree)


@pytest.mark.parametrize("seed", range(12))
def test_apply_then_revert_of_random_series_gives_the_pristine_tree(tmp_path: Path, tree: Path,
                                                                    seed: int) -> None:
    """Property: any small series of creates, edits of earlier edits and line edits reverts to
    the pristine tree byte for byte (seeded, so a failure names its case)."""
    rng = random.Random(seed)
    contents = {name: text for name, text in ORIGINAL.items()}
    edits = []
    for number in range(rng.randint(2, 6)):
        kind = rng.choice(["create", "edit", "append"])
        if kind == "create":
            path = f"kernel/new{number}.c"
            text = "".join(f"new {number} {line}\n" for line in range(rng.randint(1, 4)))
            edits.append((path, "", text))
            contents[path] = text
        else:
            path = rng.choice(sorted(contents))
            line = rng.choice(contents[path].splitlines(keepends=True))
            new = line + f"added {number}\n" if kind == "append" else f"changed {number}\n"
            edits.append((path, line, new))
            contents[path] = contents[path].replace(line, new, 1)
    pristine = snapshot(tree)
    series = make_series(tmp_path, f"random{seed}", edits)
    series.apply(tree)
    assert {name: text for name, text in snapshot(tree).items()
            if not name.startswith(".gvm-harness")} == {**pristine, **contents}
    series.revert(tree)
    assert snapshot(tree) == pristine
