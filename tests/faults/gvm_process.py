"""The harness as the user runs it, in a process of its own, so a test can send it signals (SIGINT
as from a shell's `&`, SIGTERM, SIGKILL) and read what it printed; and the small, real inputs the
fault tests give it: a kernel tree made in the test (a top Makefile and the files a series
touches) and the config around it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.config import REPO_ROOT
from tests.configs import shipped_config

WAIT_S = 600.0  # a deadline for the harness to get somewhere, never a speed target


@dataclass
class Gvm:
    """One harness command running as `python -m harness`; its output goes to a file."""

    process: subprocess.Popen
    output: Path

    @classmethod
    def start(cls, config: Path, *args: str, ignore_sigint: bool = False) -> Gvm:
        output = config.parent / f"gvm-{time.monotonic_ns()}.out"
        # `./gvm run &` from a script: the shell starts the job with SIGINT ignored, and an
        # ignored signal stays ignored across exec
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore_sigint else None
        try:
            with output.open("wb") as sink:
                process = subprocess.Popen(
                    [sys.executable, "-m", "harness", "--config", str(config), *args],
                    cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=sink,
                    stderr=subprocess.STDOUT)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return cls(process, output)

    @property
    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str,
                 timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"the harness ended before {what}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f}s:\n{self.text}"
            time.sleep(0.1)

    def wait_for_text(self, text: str, timeout_s: float = WAIT_S) -> None:
        self.wait_for(lambda: text in self.text, repr(text), timeout_s)

    def finish(self, timeout_s: float = WAIT_S) -> tuple[int, str]:
        self.process.wait(timeout=timeout_s)
        return self.process.returncode, self.text


def gvm(config: Path, *args: str) -> tuple[int, str]:
    return Gvm.start(config, *args).finish()


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def real_guest_config(tmp_path: Path, **probe) -> Path:
    """The shipped local config (the cached kernel tree and build), runs in tmp_path."""
    data = shipped_config(tmp_path / "runs")
    data["probe"].update(probe)
    return write_config(tmp_path / "local.yaml", data)


TREE_FILES = {
    "kernel/time/timekeeping.c": "".join(f"line {n}\n" for n in range(1, 41)),
    "include/kvm_para.h": "#define A 1\n#define B 2\n#define C 3\n#define D 4\n",
}


def kernel_tree(root: Path, recipe: str = "@echo make $@") -> Path:
    """A tree the harness takes for a Linux 6.1 tree: its version in the top Makefile, `kernel/`,
    and the files the test series touch. Every make target runs `recipe`."""
    for name, text in TREE_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "Makefile").write_text(f"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\n%:\n\t{recipe}\n")
    return root


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def series(tmp_path: Path, name: str, edits: list[tuple[str, str, str]]) -> Path:
    """A quilt series made with `git format-patch`: each (file, old, new) edit one patch (old
    empty: the file is created with `new`)."""
    repo = tmp_path / f"{name}-repo"
    kernel_tree(repo)
    git(repo, "init", "-q")
    for number, (path, old, new) in enumerate([("Makefile", "", None)] + edits):
        if new is not None:
            target = repo / path
            target.parent.mkdir(parents=True, exist_ok=True)
            text = target.read_text() if target.exists() else ""
            target.write_text(text.replace(old, new, 1) if old else new)
        git(repo, "add", "-A")
        git(repo, "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm",
            f"edit {number}")
    out = tmp_path / name
    git(repo, "format-patch", "-q", "-o", str(out), f"HEAD~{len(edits)}")
    (out / "series").write_text("".join(f"{p.name}\n" for p in sorted(out.glob("*.patch"))))
    return out


def tree_config(tmp_path: Path, tree: Path, patches: Path | None, **top) -> Path:
    """The shipped config pointed at a test tree and series, with its cache and runs in
    tmp_path (so the shared kernel cache and its lock are never touched)."""
    data = shipped_config(tmp_path / "runs")
    kernel = data["guest"]["kernel"]
    kernel["source"] = str(tree)
    kernel["patches"] = str(patches) if patches else None
    kernel["config"]["fragments"] = []
    data["cache_dir"] = str(tmp_path / "cache")
    data.update(top)
    if kernel["patches"] is None:
        del kernel["patches"]
    return write_config(tmp_path / "tree.yaml", data)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the tree, byte for byte (the harness's own record excluded)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".gvm-harness" not in p.parts}
