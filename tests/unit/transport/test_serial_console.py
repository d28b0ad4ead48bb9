"""The marker protocol against a real interactive `sh` behind a unix socket (no QEMU needed)."""

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from harness.transport.serial_console import SerialConsole
from harness.errors import ConsoleError


@pytest.fixture
def shell_socket(tmp_path: Path):
    path = tmp_path / "shell.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    processes = []

    def serve() -> None:
        connection, _ = server.accept()
        processes.append(subprocess.Popen(["sh", "-i"], stdin=connection, stdout=connection,
                                          stderr=connection, env={"PS1": "$ ", "PATH": "/usr/bin:/bin"}))
        connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    thread.join(timeout=5)
    for process in processes:
        process.kill()
        process.wait()
    server.close()


def test_output_exit_status_and_transcript(shell_socket: Path, tmp_path: Path) -> None:
    console = SerialConsole(shell_socket, tmp_path / "transcript.log", command_timeout_s=10)
    try:
        assert console.run("echo hello").output == "hello"
        result = console.run("printf 'a\\nb'; (exit 3)")
        assert (result.output, result.exit_status) == ("a\nb", 3)
        assert console.run("echo \"it's\" '$HOME'").output == "it's $HOME"
        multi = console.run("for i in 1 2\ndo echo $i\ndone")
        assert multi.output.splitlines() == ["1", "2"]
        assert console.run("true").output == ""
    finally:
        console.close()
    assert "hello" in (tmp_path / "transcript.log").read_text()


def test_command_that_hangs_times_out_with_context(shell_socket: Path, tmp_path: Path) -> None:
    console = SerialConsole(shell_socket, tmp_path / "transcript.log", command_timeout_s=10)
    try:
        with pytest.raises(ConsoleError, match="timed out after 1s waiting for the end of `sleep 5`"):
            console.run("sleep 5", timeout_s=1)
    finally:
        console.close()


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConsoleError, match="cannot connect to the serial console"):
        SerialConsole(tmp_path / "absent.sock", tmp_path / "t.log", command_timeout_s=1)
