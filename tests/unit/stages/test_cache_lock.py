import io
import os
import threading
from pathlib import Path

from harness.stages.cache_lock import LOCK_FILE, cache_lock
from harness.progress import Progress


def test_a_second_run_waits_for_the_first_and_says_for_whom(tmp_path: Path) -> None:
    first_has_it, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with cache_lock(tmp_path, Progress(io.StringIO())):
            order.append("first in")
            first_has_it.set()
            release.wait(10)
            order.append("first out")

    holder = threading.Thread(target=first)
    holder.start()
    first_has_it.wait(10)
    said = io.StringIO()
    threading.Timer(0.3, release.set).start()
    with cache_lock(tmp_path, Progress(said)):
        order.append("second in")
    holder.join()
    assert order == ["first in", "first out", "second in"]
    assert f"wait for the harness run (pid {os.getpid()})" in said.getvalue()


def test_an_uncontended_lock_is_silent_and_records_its_holder(tmp_path: Path) -> None:
    said = io.StringIO()
    with cache_lock(tmp_path / "cache", Progress(said)):
        holder = (tmp_path / "cache" / LOCK_FILE).read_text().strip()
    assert said.getvalue() == "" and holder == str(os.getpid())
    with cache_lock(tmp_path / "cache", Progress(said)):  # released: taken again at once
        pass
    assert said.getvalue() == ""
