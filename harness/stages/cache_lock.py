"""One harness run at a time may change the cache: the guest series is applied to the cached
kernel tree in place, and every run builds into the same build directory, so two runs at once
(a user's `./gvm run` beside `./gvm test`) would patch and build over each other.

An exclusive flock(2) on `<cache>/lock` is held while a run patches and builds; the kernel drops
it when the holder exits, however it exits, so a crashed run never leaves the cache locked. The
build's make inherits the lock's descriptor, so a killed run's compilers (stopped by its tether,
transport/local_process.py) hold the lock until the last of them has exited. A second run waits
and says for whom.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.progress import Progress
from harness.transport.local_process import inherited_by_builds

LOCK_FILE = "lock"


@contextmanager
def cache_lock(cache_dir: Path, progress: Progress) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            with progress.step(f"wait for the harness run (pid {holder}) that is patching or "
                               f"building in {cache_dir}"):
                fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            with inherited_by_builds(lock.fileno()):  # a killed run's make keeps it locked
                yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
