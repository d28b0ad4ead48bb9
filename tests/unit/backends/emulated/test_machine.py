"""The emulated host's QEMU line: AMD SVM under TCG, management SSH on a loopback forward, the
private network on 127.0.0.1 sockets, the node's address for the init script."""

from pathlib import Path

from harness.backends.emulated.machine import EmulatedHostLauncher, PrivateLink, private_links


def launcher(index: int, link: PrivateLink | None, ip: str | None = "10.9.9.1"):
    return EmulatedHostLauncher(index=index, qemu_binary="qemu-system-x86_64",
                                kernel=Path("/k/bzImage"), initrd=Path("/r/initramfs.cpio"),
                                cmdline="console=ttyS0 idle=halt", cpus=2, memory_mb=1024,
                                ssh_port=40022, private_ip=ip, link=link, run_dir=Path("/r"))


def values(line: list[str], option: str) -> list[str]:
    return [line[i + 1] for i, word in enumerate(line) if word == option]


def test_two_hosts_are_a_dgram_pair_with_their_own_macs() -> None:
    first, second = private_links(2, [5001, 5002])
    lines = [launcher(0, first).command_line(), launcher(1, second, "10.9.9.2").command_line()]
    assert values(lines[0], "-netdev")[1] == (
        "dgram,id=private,local.type=inet,local.host=127.0.0.1,local.port=5001,"
        "remote.type=inet,remote.host=127.0.0.1,remote.port=5002")
    assert "local.port=5002" in values(lines[1], "-netdev")[1]
    macs = [device.split("mac=")[1] for line in lines for device in values(line, "-device")]
    assert len(set(macs)) == 4, macs
    assert values(lines[0], "-cpu") == ["max"] and values(lines[0], "-accel") == ["tcg"]
    assert values(lines[0], "-netdev")[0] == "user,id=manage,hostfwd=tcp:127.0.0.1:40022-:22"
    assert values(lines[1], "-append") == ["console=ttyS0 idle=halt gvm_private_ip=10.9.9.2/24"]
    assert values(lines[0], "-serial") == ["file:/r/host0-console.log"]


def test_more_hosts_share_a_multicast_group_and_loopback_nodes_need_no_network() -> None:
    links = private_links(3, [6000, 6001, 6002])
    assert {link.netdev() for link in links} == {
        "socket,id=private,mcast=230.0.9.9:6000,localaddr=127.0.0.1"}
    alone = launcher(0, None, ip=None).command_line()
    assert values(alone, "-append") == ["console=ttyS0 idle=halt"]
    assert len(values(alone, "-netdev")) == 1
