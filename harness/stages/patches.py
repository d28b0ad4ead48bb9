"""Quilt-style patch series applied to a source tree: check, apply, revert, status.

All-or-nothing comes from `git apply` itself: one `git apply` on the concatenation of the whole
series checks every hunk before it writes any file, so a conflict in patch 3 leaves the tree exactly
as it was. (Several patch files given to one `git apply` are *not* atomic: each file is written as
it goes.) The same command works on plain unpacked trees, as long as git cannot discover an outer
repository: GIT_CEILING_DIRECTORIES stops it from looking above the tree.

Reverting cannot use one call: `git apply --reverse` of a concatenation where a later patch edits
a file an earlier one creates exits 0 and leaves the file behind, and the concatenation in reverse
order is refused ("has been renamed/deleted"). So a revert undoes one patch at a time, last first,
on a scratch copy of the files the series touches, and only when every step worked there are the
results copied over the tree's files (or the files removed).

What is applied is recorded inside the tree (`.gvm-harness/applied/`: the series order, a copy
of every patch, and under `result/` a copy of every file the series touches as the series left it),
so a tree is never patched twice, the recorded series can be reverted even after the patch files in
the repository have changed, and a hand edit in a file the series touches is found before it is
built and judged under the series' name (`status` names it, `apply` refuses). `revert` puts such
files back as the series made them first, keeping the edited versions in a folder beside the tree.
A tree recorded before the copies were kept gets them derived on a scratch copy (revert, apply).

Over 400 lines because apply, revert, status and the hand-edit check all read and write that one
record, and change together with it.
"""

from __future__ import annotations

import enum
import filecmp
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.errors import PatchError

RECORD_DIR = Path(".gvm-harness") / "applied"
RECORD_INDEX = "series"
RESULT_DIR = "result"  # in RECORD_DIR: the touched files as the series left them
RESTORE_COMMAND = "./gvm patch --revert"  # with the run's --config


@dataclass(frozen=True)
class Patch:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class SeriesState(enum.Enum):
    NOT_APPLIED = "not applied"
    APPLIED = "applied"
    APPLIED_CHANGED = "applied, but files it touches were changed since"
    APPLIED_UNRECORDED = "applied, but not by the harness"
    OTHER_SERIES_APPLIED = "another series is applied"


@dataclass(frozen=True)
class SeriesStatus:
    state: SeriesState
    applied_names: tuple[str, ...]
    changed_files: tuple[str, ...] = ()

    def describe(self) -> str:
        text = self.state.value
        if self.applied_names:
            text += f": {', '.join(self.applied_names)}"
        if self.changed_files:
            text += f"; changed: {', '.join(self.changed_files)} (`{RESTORE_COMMAND}` restores)"
        return text


@dataclass(frozen=True)
class Reverted:
    names: tuple[str, ...]
    kept_edits: Path | None  # where the hand-edited versions of touched files went, if any


@dataclass(frozen=True)
class ApplyOutcome:
    reverted: tuple[str, ...]
    applied: tuple[str, ...]
    already_applied: bool


@dataclass(frozen=True)
class PatchSeries:
    """An ordered list of patches, read from a directory that holds a quilt `series` file."""

    directory: Path
    patches: tuple[Patch, ...]

    @classmethod
    def load(cls, directory: Path) -> "PatchSeries":
        series_file = directory / "series"
        if not series_file.is_file():
            raise PatchError(f"{series_file}: no series file; a patch directory needs one "
                             "(one patch file name per line, '#' starts a comment)")
        patches = []
        for number, line in enumerate(series_file.read_text().splitlines(), start=1):
            name = line.split("#", 1)[0].strip()
            if not name:
                continue
            if " " in name:
                raise PatchError(f"{series_file}:{number}: '{name}': quilt options after the "
                                 "name are not supported; list only the file name")
            path = directory / name
            if not path.is_file():
                raise PatchError(f"{series_file}:{number}: lists '{name}', which does not exist "
                                 f"in {directory}")
            patches.append(Patch(name=name, text=path.read_text()))
        return cls(directory=directory, patches=tuple(patches))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(patch.name for patch in self.patches)

    def status(self, tree: Path) -> SeriesStatus:
        recorded = _read_record(tree)
        if recorded:
            if [(p.name, p.sha256) for p in recorded] == [(p.name, p.sha256) for p in self.patches]:
                changed = changed_files(tree)
                return SeriesStatus(SeriesState.APPLIED_CHANGED if changed else
                                    SeriesState.APPLIED, self.names, changed)
            return SeriesStatus(SeriesState.OTHER_SERIES_APPLIED, tuple(p.name for p in recorded))
        if not self.patches:
            return SeriesStatus(SeriesState.APPLIED, ())
        if _git_apply_ok(tree, self.patches, reverse=True):
            return SeriesStatus(SeriesState.APPLIED_UNRECORDED, self.names)
        return SeriesStatus(SeriesState.NOT_APPLIED, ())

    def check(self, tree: Path) -> None:
        """Raise PatchError naming the patch, file and hunk that would not apply.

        The check is against the tree as `apply` would see it: with any other recorded series
        reverted first.
        """
        _require_tree(tree)
        if self.status(tree).state is SeriesState.APPLIED:
            return
        recorded = _read_record(tree)
        if not recorded:
            if self.patches and not _git_apply_ok(tree, self.patches, reverse=False):
                _explain_failure(tree, self, shown_tree=tree)
            return
        refuse_changed(tree)
        # git cannot check "revert A, then apply B" in one call: do it on a scratch copy of just
        # the files the two series touch, so the real tree is written only once both will work.
        with _scratch(tree, "check") as scratch:
            _copy_files(tree, scratch, _touched_files(recorded + self.patches))
            _revert_each(scratch, recorded,
                         failure=f"{tree}: the recorded series "
                                 f"({', '.join(p.name for p in recorded)}) no longer reverts "
                                 "cleanly; the tree was changed by hand. Restore a pristine tree.")
            if self.patches and not _git_apply_ok(scratch, self.patches, reverse=False):
                _explain_failure(scratch, self, shown_tree=tree)

    def apply(self, tree: Path) -> ApplyOutcome:
        """Bring the tree to exactly this series, reverting a different recorded one first."""
        status = self.status(tree) if tree.is_dir() else None
        if status and status.state is SeriesState.APPLIED:
            if self.patches and not (tree / RECORD_DIR / RESULT_DIR).is_dir():  # derived, equal
                _keep_result(tree, self.patches)
            return ApplyOutcome(reverted=(), applied=(), already_applied=True)
        if status and status.state is SeriesState.APPLIED_CHANGED:
            refuse_changed(tree)
        if status and status.state is SeriesState.APPLIED_UNRECORDED:
            raise PatchError(f"{tree}: the series {self.directory} is already applied, but not "
                             "by the harness. Revert it by hand (or start from a pristine tree) "
                             "so the harness can track what it changed.")
        self.check(tree)
        reverted = self.revert(tree).names
        if self.patches:
            _run_git_apply(tree, self.patches, reverse=False)
            _write_record(tree, self.patches)
        return ApplyOutcome(reverted=reverted, applied=self.names, already_applied=False)

    def revert(self, tree: Path) -> Reverted:
        """Revert whatever series the harness recorded in the tree. Touched files changed by
        hand since are first put back as the series made them; their edited versions are kept in
        a folder beside the tree (Reverted.kept_edits)."""
        _require_tree(tree)
        recorded = _read_record(tree)
        if not recorded:
            return Reverted((), None)
        touched = _touched_files(recorded)
        with _scratch(tree, "revert") as scratch:
            with _series_result(tree, recorded) as result:
                changed = _differing(tree, result, touched)
                _copy_files(result, scratch, touched)
            _revert_each(scratch, recorded,
                         failure=f"{tree}: the recorded series does not revert cleanly; the tree "
                                 "was changed by hand. Nothing was changed.")
            kept = _keep_edits(tree, changed) if changed else None
            _copy_files(scratch, tree, touched)
        _clear_record(tree)
        return Reverted(tuple(p.name for p in recorded), kept)


def changed_files(tree: Path) -> tuple[str, ...]:
    """The files the recorded series touches whose content is not what the series made of them
    (edited, created or removed by hand since); () when no series is recorded."""
    recorded = _read_record(tree)
    if not recorded:
        return ()
    with _series_result(tree, recorded) as result:
        return _differing(tree, result, _touched_files(recorded))


def refuse_changed(tree: Path) -> None:
    """PatchError listing the touched files that differ from what the recorded series makes, so
    a hand edit is never built and judged under the series' name."""
    changed = changed_files(tree)
    if changed:
        raise PatchError(f"{tree}: files the applied series touches differ from what the series "
                         f"makes of them: {', '.join(changed)}. Built now, they would be judged "
                         f"under the series' name. `{RESTORE_COMMAND}` (with this --config) puts "
                         "them back as the series made them and reverts it, keeping your edited "
                         "versions in a folder beside the tree; the next run applies the series "
                         "again. Nothing was changed.")


@contextmanager
def _scratch(tree: Path, purpose: str) -> Iterator[Path]:
    """An empty directory beside the tree (same file system, outside any git work tree the tree
    is not in), removed afterwards; unique, so a `status` beside a running `apply` is safe."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{tree.name}.gvm-harness-{purpose}-",
                                    dir=tree.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _series_result(tree: Path, recorded: tuple[Patch, ...]) -> Iterator[Path]:
    """A directory holding each file the recorded series touches as the series left it (a file
    it removed is absent there): the copy kept at apply time, or for a tree recorded before
    copies were kept, derived on a scratch copy by reverting and applying again."""
    kept = tree / RECORD_DIR / RESULT_DIR
    if kept.is_dir():
        yield kept
        return
    with _scratch(tree, "result") as scratch:
        _copy_files(tree, scratch, _touched_files(recorded))
        failure = (f"{tree}: the recorded series ({', '.join(p.name for p in recorded)}) does "
                   "not revert cleanly, so the tree was changed by hand in the lines it touches. "
                   "Restore a pristine tree (the cached debian:linux-source tree: remove it and "
                   "the next run unpacks it again)")
        _revert_each(scratch, recorded, failure=failure)
        _run_git_apply(scratch, recorded, reverse=False, failure=failure)
        yield scratch


def _differing(tree: Path, result: Path, relatives: list[str]) -> tuple[str, ...]:
    def same(relative: str) -> bool:
        ours, theirs = tree / relative, result / relative
        if not ours.is_file() or not theirs.is_file():
            return ours.is_file() == theirs.is_file()
        return filecmp.cmp(ours, theirs, shallow=False)

    return tuple(relative for relative in relatives if not same(relative))


def _keep_edits(tree: Path, changed: tuple[str, ...]) -> Path:
    """Copy the hand-edited versions of `changed` into a new folder beside the tree."""
    kept = Path(tempfile.mkdtemp(prefix=f"{tree.name}.edits-{time.strftime('%Y%m%d-%H%M%S')}-",
                                 dir=tree.parent))
    _copy_files(tree, kept, list(changed))
    return kept


def _require_tree(tree: Path) -> None:
    if not tree.is_dir():
        raise PatchError(f"{tree}: not a directory; point the config at an unpacked source tree")


def _concatenate(patches: tuple[Patch, ...]) -> str:
    """One input in series order, for apply and its checks (a revert goes patch by patch)."""
    return "".join(p.text if p.text.endswith("\n") else p.text + "\n" for p in patches)


def _git_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_CEILING_DIRECTORIES"] = str(tree.resolve().parent)
    return env


def _git_apply(tree: Path, patches: tuple[Patch, ...], reverse: bool,
               check_only: bool) -> subprocess.CompletedProcess[str]:
    args = ["git", "apply", "--whitespace=nowarn"]
    if reverse:
        args.append("--reverse")
    if check_only:
        args.append("--check")
    return subprocess.run(args, cwd=tree, env=_git_env(tree), input=_concatenate(patches),
                          capture_output=True, text=True)


def _git_apply_ok(tree: Path, patches: tuple[Patch, ...], reverse: bool) -> bool:
    return _git_apply(tree, patches, reverse, check_only=True).returncode == 0


def _run_git_apply(tree: Path, patches: tuple[Patch, ...], reverse: bool,
                   check_only: bool = False, failure: str = "") -> None:
    result = _git_apply(tree, patches, reverse, check_only)
    if result.returncode != 0:
        raise PatchError((failure or f"{tree}: git apply failed") + "\n" + result.stderr.strip())


_FAILED_AT = re.compile(r"^error: patch failed: (?P<file>.+):(?P<line>\d+)$", re.M)
_FILE_ERROR = re.compile(r"^error: (?P<file>[^:]+): (?P<why>.+)$", re.M)
_HUNK_HEADER = re.compile(r"^@@ -(?P<start>\d+)(?:,\d+)? \+\d+(?:,\d+)? @@.*$", re.M)


def _explain_failure(tree: Path, series: PatchSeries, shown_tree: Path) -> None:
    """Find the first patch of the series that does not apply and raise a PatchError about it."""
    for count in range(1, len(series.patches) + 1):
        result = _git_apply(tree, series.patches[:count], reverse=False, check_only=True)
        if result.returncode == 0:
            continue
        patch = series.patches[count - 1]
        raise PatchError(f"{series.directory / patch.name} (patch {count} of "
                         f"{len(series.patches)}) does not apply to {shown_tree}: "
                         f"{_describe_git_error(result.stderr, patch)}. The tree was not changed.")


def _describe_git_error(stderr: str, patch: Patch) -> str:
    failed_at = _FAILED_AT.search(stderr)
    if failed_at:
        hunk = _hunk_at(patch.text, failed_at["file"], int(failed_at["line"]))
        return f"{failed_at['file']}: {hunk} does not match"
    file_error = _FILE_ERROR.search(stderr)
    if file_error:
        return f"{file_error['file']}: {file_error['why']}"
    return stderr.strip() or "git apply failed without a message"


def _hunk_at(patch_text: str, path: str, old_start: int) -> str:
    section = _file_section(patch_text, path)
    for number, header in enumerate(_HUNK_HEADER.finditer(section), start=1):
        if int(header["start"]) == old_start:
            return f"hunk #{number} ({header.group(0).strip()})"
    return f"the hunk at line {old_start}"


def _file_section(patch_text: str, path: str) -> str:
    """The part of a patch that changes `path` (from its `---` header to the next file's)."""
    sections = re.split(r"^(?=diff --git |--- )", patch_text, flags=re.M)
    chosen = [s for s in sections if re.search(rf"^\+\+\+ b/{re.escape(path)}$", s, re.M)]
    return "".join(chosen)


def _revert_each(tree: Path, patches: tuple[Patch, ...], failure: str) -> None:
    """Undo the patches one by one, last first (see the module docstring for why)."""
    for patch in reversed(patches):
        _run_git_apply(tree, (patch,), reverse=True, failure=f"{failure} ({patch.name})")


def _copy_files(source: Path, target: Path, relatives: list[str]) -> None:
    """Make each of `relatives` in `target` what it is in `source`: copied, or removed when
    `source` has no such file (a revert removes what the series created)."""
    for relative in relatives:
        if (source / relative).is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, target / relative)
        else:
            (target / relative).unlink(missing_ok=True)


def _touched_files(patches: tuple[Patch, ...]) -> list[str]:
    names = set()
    for patch in patches:
        for match in re.finditer(r"^(?:---|\+\+\+) [ab]/(\S+)", patch.text, re.M):
            names.add(match.group(1))
    return sorted(names)


def _read_record(tree: Path) -> tuple[Patch, ...]:
    index = tree / RECORD_DIR / RECORD_INDEX
    if not index.is_file():
        return ()
    names = index.read_text().split()
    return tuple(Patch(name=name, text=(tree / RECORD_DIR / name).read_text()) for name in names)


def _write_record(tree: Path, patches: tuple[Patch, ...]) -> None:
    record = tree / RECORD_DIR
    record.mkdir(parents=True, exist_ok=True)
    for patch in patches:
        (record / patch.name).write_text(patch.text)
    _keep_result(tree, patches)
    (record / RECORD_INDEX).write_text("".join(p.name + "\n" for p in patches))


def _keep_result(tree: Path, patches: tuple[Patch, ...]) -> None:
    """Copy the files the series touches, as they are now, into the record's result/."""
    result = tree / RECORD_DIR / RESULT_DIR
    shutil.rmtree(result, ignore_errors=True)  # from a record never finished
    result.mkdir()
    _copy_files(tree, result, _touched_files(patches))


def _clear_record(tree: Path) -> None:
    shutil.rmtree(tree / RECORD_DIR)
