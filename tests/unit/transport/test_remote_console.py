"""The console tail: a growing remote file copied into a local one by polling."""

from __future__ import annotations

import threading
import time

from harness.transport.remote_console import TAIL_CHUNK, ConsoleTail
from harness.transport.remote_host import RemoteHostError


def test_console_tail_copies_growth_and_keeps_errors(tmp_path) -> None:
    remote = bytearray(b"Linux version 6.1\n")
    failing = threading.Event()

    def read(offset: int) -> bytes:
        if failing.is_set():
            raise RemoteHostError("host 'node-a': the SSH connection was lost")
        return bytes(remote[offset:offset + TAIL_CHUNK])

    local = tmp_path / "console-kernel.log"
    local.write_bytes(b"an older boot\n")
    tail = ConsoleTail(read, local, fresh=True, interval_s=0.02)
    try:
        deadline = time.monotonic() + 5
        while local.read_bytes() != bytes(remote):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        failing.set()
        remote += b"GVM-HARNESS: guest ready\n"
        while tail.last_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "connection was lost" in tail.last_error
        failing.clear()
        while local.read_bytes() != bytes(remote):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        tail.close()
    assert not tail.running
    remote += b"x" * (TAIL_CHUNK + 5)  # more than one read's worth, fetched by one poll
    assert tail.poll() == TAIL_CHUNK + 5
    assert local.read_bytes() == bytes(remote)
    resumed = ConsoleTail(read, local, fresh=False, interval_s=10)
    try:
        assert resumed.offset == len(remote) and resumed.poll() == 0
    finally:
        resumed.close()
