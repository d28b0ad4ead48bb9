"""The stock-QEMU launch line: accelerator, shape, consoles and the SSH forward."""

import socket
from pathlib import Path

from harness.backends.base import BootSpec, unix_socket_path
from harness.backends.local_qemu import QemuLauncher


def launcher(accelerator: str) -> QemuLauncher:
    return QemuLauncher(qemu_binary="qemu-system-x86_64", accelerator=accelerator,
                        boot=BootSpec(kernel=Path("/k/bzImage"), initrd=Path("/r/initramfs.cpio"),
                                      cmdline="console=ttyS0 atomic_inc_jiffies=on", vcpus=4,
                                      memory_mb=256),
                        run_dir=Path("/runs/r1"), ssh_port=40022)


def option_values(line: list[str], option: str) -> list[str]:
    return [line[i + 1] for i, word in enumerate(line) if word == option]


def test_tcg_line() -> None:
    (line,) = launcher("tcg").command_lines()
    assert option_values(line, "-accel") == ["tcg,thread=multi"]
    assert option_values(line, "-cpu") == ["max"]
    assert option_values(line, "-smp") == ["4"] and option_values(line, "-m") == ["256"]
    assert option_values(line, "-kernel") == ["/k/bzImage"]
    assert option_values(line, "-initrd") == ["/r/initramfs.cpio"]
    assert option_values(line, "-append") == ["console=ttyS0 atomic_inc_jiffies=on"]
    assert option_values(line, "-serial") == [
        "file:/runs/r1/console-kernel.log",
        "unix:/runs/r1/console-shell.sock,server=on,wait=off"]
    assert option_values(line, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22"]
    assert "-nodefaults" in line and "-no-reboot" in line
    assert "-shm-path" not in line


def test_kvm_line() -> None:
    (line,) = launcher("kvm").command_lines()
    assert "-enable-kvm" in line and "-accel" not in line
    assert option_values(line, "-cpu") == ["host"]


def test_endpoints_match_the_line() -> None:
    endpoints = launcher("tcg").endpoints
    assert endpoints.ssh_host == "127.0.0.1" and endpoints.ssh_port == 40022
    assert endpoints.shell_socket == Path("/runs/r1/console-shell.sock")


def test_a_socket_in_a_deep_run_folder_is_bound_under_tmp(tmp_path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = unix_socket_path(deep, "console-shell.sock")
    assert path.parent == Path("/tmp")
    assert path == unix_socket_path(deep, "console-shell.sock") != unix_socket_path(tmp_path, "x" * 120)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        try:
            assert path.is_socket()
        finally:
            path.unlink()
    assert unix_socket_path(tmp_path, "console-shell.sock") == tmp_path / "console-shell.sock"
