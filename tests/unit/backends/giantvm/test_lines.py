"""GiantVM launch lines: the documented examples, node-0-only devices, and every refusal."""

import shlex
from pathlib import Path

import pytest

from harness.backends.base import BootSpec
from harness.backends.giantvm.lines import (
    GiantVMLauncher, GiantVMSpecError, NodePlacement, PortRequirement, busy_ports,
    check_node_addresses, parse_ip_addr, parse_listeners, scan_dmesg)


def launcher(ips: list[str], hosts: list[str] | None = None, vcpus: int = 2,
             memory_mb: int = 2048, machine: str = "q35", ssh_port: int = 10022) -> GiantVMLauncher:
    hosts = hosts or ["h0"] * len(ips)
    return GiantVMLauncher(
        qemu_binary="/opt/giantvm/qemu-system-x86_64",
        boot=BootSpec(kernel=Path("/w/bzImage"), initrd=Path("/w/initramfs.cpio"),
                      cmdline="console=ttyS0 panic=-1", vcpus=vcpus, memory_mb=memory_mb),
        nodes=tuple(NodePlacement(host, ip, f"/w/node{i}")
                    for i, (host, ip) in enumerate(zip(hosts, ips))),
        ssh_port=ssh_port, machine=machine)


def option_values(argv, option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == option]


def contains(argv, fragment: str) -> bool:
    """True if the shell fragment, split as a shell would, appears in argv as is."""
    words = shlex.split(fragment)
    return any(list(argv[i:i + len(words)]) == words for i in range(len(argv)))


def test_boot_md_single_machine_two_qemus() -> None:
    # GiantVM/doc boot.md: `-smp 2 -m 2048 ... -local-cpu 1,start=0,iplist="127.0.0.1 127.0.0.1"`
    # in terminal 1 and start=1 in terminal 2; the doc's -machine is QEMU 2.8's default, pc.
    node0, node1 = launcher(["127.0.0.1", "127.0.0.1"], machine="pc").node_commands()
    for node in (node0, node1):
        assert contains(node.argv, "--enable-kvm -cpu host -machine pc,kernel-irqchip=off")
        assert contains(node.argv, "-smp 2 -m 2048")
    assert contains(node0.argv, '-local-cpu 1,start=0,iplist="127.0.0.1 127.0.0.1"')
    assert contains(node1.argv, '-local-cpu 1,start=1,iplist="127.0.0.1 127.0.0.1"')
    assert (node0.start, node1.start) == (0, 1)


def test_boot_2_ysh_two_cpus_per_node() -> None:
    node0, node1 = launcher(["127.0.0.1", "127.0.0.1"], vcpus=4).node_commands()
    assert option_values(node0.argv, "-smp") == option_values(node1.argv, "-smp") == ["4"]
    assert option_values(node0.argv, "-local-cpu") == ["2,start=0,iplist=127.0.0.1 127.0.0.1"]
    assert option_values(node1.argv, "-local-cpu") == ["2,start=2,iplist=127.0.0.1 127.0.0.1"]


def test_giantvm_github_io_two_machines() -> None:
    # The site runs `-local-cpu 16,start=0,iplist="10.0.0.1 10.0.0.2"` and start=16, but shows
    # `-smp 2`: 16 local CPUs on each of 2 nodes needs -smp 32, which is what we emit.
    cluster = launcher(["10.0.0.1", "10.0.0.2"], hosts=["m1", "m2"], vcpus=32)
    node0, node1 = cluster.node_commands()
    assert contains(node0.argv, '-local-cpu 16,start=0,iplist="10.0.0.1 10.0.0.2"')
    assert contains(node1.argv, '-local-cpu 16,start=16,iplist="10.0.0.1 10.0.0.2"')
    assert option_values(node0.argv, "-smp") == ["32"]
    assert "-machine" in node0.argv and "q35,kernel-irqchip=off" in node0.argv
    # Its `-smp 2` would give each node one local CPU, not 16.
    assert launcher(["10.0.0.1", "10.0.0.2"], hosts=["m1", "m2"], vcpus=2).vcpus_per_node == 1
    # It also pairs "machine 1 (ip 10.0.0.2)" with start=0, but node 0 binds on iplist[0]:
    with pytest.raises(GiantVMSpecError, match=r"node 0 \(10.0.0.1\) is placed on host 'm1', "
                                               r"which has 10.0.0.2"):
        check_node_addresses(cluster, {"m1": ["10.0.0.2"], "m2": ["10.0.0.1"]})
    check_node_addresses(cluster, {"m1": ["10.0.0.1", "192.168.1.5"], "m2": ["10.0.0.2"]})


def test_moharaka_quoting_is_the_display_form() -> None:
    # GiantVM/Linux-DSM PR #3: -local-cpu '1,start=0,iplist=140.77.13.166 140.77.13.116'
    node0, _ = launcher(["140.77.13.166", "140.77.13.116"], hosts=["a", "b"]).node_commands()
    assert "-local-cpu '1,start=0,iplist=140.77.13.166 140.77.13.116'" in node0.shell()
    assert shlex.split(node0.shell()) == list(node0.argv)


def test_devices_only_on_node_0_and_the_shape_everywhere() -> None:
    cluster = launcher(["10.1.0.1", "10.1.0.2", "10.1.0.3"], hosts=["a", "b", "c"], vcpus=6)
    commands = cluster.node_commands()
    node0 = commands[0].argv
    assert option_values(node0, "-serial") == ["file:/w/node0/console-kernel.log",
                                               "unix:/w/node0/console-shell.sock,server,nowait"]
    assert option_values(node0, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22"]
    assert option_values(node0, "-device") == ["e1000,netdev=net0"]
    for command in commands:
        argv = command.argv
        assert "-shm-path" not in argv
        assert "-nodefaults" in argv
        for option in ("-smp", "-m", "-machine", "-kernel", "-initrd", "-append", "-cpu"):
            assert option_values(argv, option) == option_values(node0, option)
        if command.node:
            assert not {"-serial", "-netdev", "-device", "-net"} & set(argv)
    assert [c.host for c in commands] == ["a", "b", "c"]
    endpoints = cluster.endpoints
    assert (endpoints.host, endpoints.ssh_port) == ("a", 10022)
    assert endpoints.shell_socket == "/w/node0/console-shell.sock"
    assert cluster.command_lines() == [list(c.argv) for c in commands]


def test_required_ports_per_host() -> None:
    cluster = launcher(["10.1.0.1", "10.1.0.2"], hosts=["a", "b"])
    assert cluster.required_ports() == [
        PortRequirement("a", 0, "127.0.0.1", 10022, "guest SSH forward"),
        PortRequirement("a", 0, "10.1.0.1", 37710, "DSM (host kernel)"),
        PortRequirement("a", 0, "10.1.0.1", 40000, "I/O router (QEMU)"),
        PortRequirement("b", 1, "10.1.0.2", 37711, "DSM (host kernel)"),
        PortRequirement("b", 1, "10.1.0.2", 40001, "I/O router (QEMU)"),
    ]


def test_markers_name_the_node_and_its_peers() -> None:
    cluster = launcher(["10.1.0.1", "10.1.0.2", "10.1.0.3"], hosts=["a", "b", "c"], vcpus=6)
    assert cluster.qemu_markers(1) == [
        "QEMU nums: 3, Total CPU nums: 6, CPU per QEMU: 2",
        "QEMU 1 listen on TCP socket 10.1.0.2:40001",
        "connect_io_router...", "connect_io_router done"]
    assert cluster.dmesg_markers(1) == [
        "Enable kvm dsm mode, this kvm instance will be node-1",
        "kvm-dsm: node-1 established connection with node-0",
        "kvm-dsm: node-1 established connection with node-2"]


@pytest.mark.parametrize("ips, hosts, vcpus, machine, ssh_port, message", [
    (["127.0.0.1"], None, 2, "q35", 10022, r"needs 2 to 4 nodes, got 1; .* stock 'qemu'"),
    (["127.0.0.1"] * 5, None, 5, "q35", 10022, r"at most 4 nodes .* ids 0-3\), got 5"),
    (["127.0.0.1"] * 2, None, 3, "q35", 10022, r"3 vCPUs cannot be split evenly over 2"),
    (["127.0.0.1"] * 2, None, 0, "q35", 10022, r"0 vCPUs cannot be split"),
    (["node-a", "10.0.0.2"], ["a", "b"], 2, "q35", 10022, r"'node-a' is not an IPv4 .* digits"),
    (["fd00::1", "10.0.0.2"], ["a", "b"], 2, "q35", 10022, r"'fd00::1' is not an IPv4"),
    (["10.0.0.1 ", "10.0.0.2"], ["a", "b"], 2, "q35", 10022, r"no spaces"),
    (["10.0.0", "10.0.0.2"], ["a", "b"], 2, "q35", 10022, r"'10.0.0' is not a dotted-quad"),
    (["10.0.0.1", "10.0.0.256"], ["a", "b"], 2, "q35", 10022, r"node 1: .*'10.0.0.256'"),
    (["127.0.0.1", "127.0.0.1"], ["a", "b"], 2, "q35", 10022, r"loopback .* on 2 hosts"),
    (["127.0.0.1", "10.0.0.2"], ["a", "b"], 2, "q35", 10022, r"mixes loopback"),
    (["10.0.0.1", "10.0.0.1"], ["a", "b"], 2, "q35", 10022, r"nodes 0 and 1 both have .*10.0.0.1"),
    (["127.0.0.1", "127.0.0.1"], None, 2, "q35", 40001,
     r"127.0.0.1:40001 on host 'h0' is wanted twice: guest SSH forward of node 0 and I/O router"),
    (["127.0.0.1", "127.0.0.1"], None, 2, "microvm", 10022, r"'microvm' is not one of: q35, pc"),
    (["127.0.0.1", "127.0.0.1"], None, 2, "q35", 0, r"ssh_port 0 is not a TCP port"),
])
def test_refusals(ips, hosts, vcpus, machine, ssh_port, message) -> None:
    with pytest.raises(GiantVMSpecError, match=message):
        launcher(ips, hosts=hosts, vcpus=vcpus, machine=machine, ssh_port=ssh_port)


def test_memory_must_be_positive() -> None:
    with pytest.raises(GiantVMSpecError, match="memory_mb must be positive"):
        launcher(["127.0.0.1", "127.0.0.1"], memory_mb=0)


def test_loopback_nodes_need_no_address_check() -> None:
    check_node_addresses(launcher(["127.0.0.1", "127.0.0.1"]), {})


def test_address_check_names_every_misplaced_node() -> None:
    cluster = launcher(["10.0.0.1", "10.0.0.2"], hosts=["a", "b"])
    with pytest.raises(GiantVMSpecError, match=r"node 0 .*; node 1 \(10.0.0.2\) is placed on host "
                                               r"'b', which has no IPv4 address"):
        check_node_addresses(cluster, {"a": ["10.9.9.9"]})


IP_ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
7: eth0    inet 10.231.7.11/24 brd 10.231.7.255 scope global eth0\\       valid_lft forever
"""

SS = """\
LISTEN 0      128        10.231.7.11:22        0.0.0.0:*
LISTEN 0      5            127.0.0.1:10022     0.0.0.0:*
LISTEN 0      4096           0.0.0.0:40001     0.0.0.0:*
LISTEN 0      4096              [::]:37711        [::]:*
LISTEN 0      10    127.0.0.53%lo:53        0.0.0.0:*
"""


def test_parse_ip_addr_and_listeners() -> None:
    assert parse_ip_addr(IP_ADDR) == ["127.0.0.1", "10.231.7.11"]
    assert parse_listeners(SS) == [("10.231.7.11", 22), ("127.0.0.1", 10022), ("*", 40001),
                                   ("*", 37711), ("127.0.0.53", 53)]
    assert parse_listeners(BUSYBOX_NETSTAT) == [("*", 22), ("10.9.9.1", 37710),
                                                ("127.0.0.1", 20022)]


BUSYBOX_NETSTAT = """\
Active Internet connections (only servers)
Proto Recv-Q Send-Q Local Address           Foreign Address         State
tcp        0      0 0.0.0.0:22              0.0.0.0:*               LISTEN
tcp        0      0 10.9.9.1:37710          0.0.0.0:*               LISTEN
tcp        0      0 127.0.0.1:20022         0.0.0.0:*               LISTEN
"""


def test_busy_ports_reports_wildcards_and_exact_matches_only() -> None:
    cluster = launcher(["10.0.0.1", "10.0.0.2"], hosts=["a", "b"])
    listeners = {"a": [("127.0.0.1", 10022), ("10.0.0.9", 37710)],
                 "b": [("*", 40001), ("127.0.0.1", 37711)]}
    assert busy_ports(cluster.required_ports(), listeners) == [
        "host 'a': 127.0.0.1:10022 is in use, but node 0 needs 127.0.0.1:10022 for its guest "
        "SSH forward",
        "host 'b': *:40001 is in use, but node 1 needs 10.0.0.2:40001 for its I/O router (QEMU)"]
    assert busy_ports(cluster.required_ports(), {}) == []


DMESG = """\
[   10.0] kvm_dsm_init: Enable kvm dsm mode, this kvm instance will be node-0
[   11.0] WARNING: CPU: 1 PID: 99 at arch/x86/kvm/dsm.c:300 kvm_dsm_release_page+0x1/0x2
[   12.0] gvm-harness: run r2 starts
[   13.0] kvm-dsm: node-0 established connection with node-1 [10.0.0.2:37711]
[   14.0] kvm_dsm_fetch: DEADLOCK gfn 1234
[   15.0] kvm-dsm: invalid gfn 99999
[   16.0] BUG: unable to handle kernel NULL pointer dereference at 0000000000000008
[   17.0] kernel BUG at arch/x86/kvm/ivy.c:510!
[   18.0] WARNING: CPU: 0 PID: 7 at arch/x86/kvm/dsm.c:420 __kvm_dsm_acquire_page+0x3/0x4
[   19.0] kvm-dsm: node-0 KVM_HC_ATOMIC_INC on gpa 0x1c0b000 failed at node-1: -104
[   20.0] kvm-dsm: refusing node-4 of 5 nodes: supported are 1 to 4 nodes with ids below the node count
[   21.0] kvm-dsm: node-1 failed to connect to node-0
[   22.0] slot of gfn 77 doesn't exist
"""


def test_dmesg_scan_after_the_run_marker() -> None:
    findings = scan_dmesg(DMESG, run_id="r2")
    assert [f.kind for f in findings] == [
        "DEADLOCK", "invalid gfn", "BUG", "BUG", "WARNING", "ATOMIC_INC failed", "node refused",
        "connect failed", "invalid gfn"]
    assert findings[0].line == "[   14.0] kvm_dsm_fetch: DEADLOCK gfn 1234"
    assert [f.kind for f in scan_dmesg(DMESG)][:1] == ["WARNING"]


def test_dmesg_scan_without_the_marker_says_why() -> None:
    booted = "[    0.000000] Linux version 4.9.76\n" + DMESG
    with pytest.raises(GiantVMSpecError, match="no 'gvm-harness: run r9 starts' line"):
        scan_dmesg(booted, run_id="r9")


def test_a_log_that_wrapped_since_the_run_began_says_so() -> None:
    """The original send_all prints a line per hypercall: its 4.9 tinyconfig ring buffer held
    only the last few seconds when the run ended, the run marker long gone."""
    with pytest.raises(GiantVMSpecError, match="ring buffer wrapped .* starts at '\\[   10.0\\] "
                                               "kvm_dsm_init.*log_buf_len="):
        scan_dmesg(DMESG, run_id="r9")


def test_dmesg_scan_names_oopses_hung_tasks_and_lockups() -> None:
    text = """\
[   30.0] Oops: 0000 [#1] SMP
[   31.0] INFO: task qemu-system-x86:123 blocked for more than 120 seconds.
[   32.0] NMI watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [dsm-conn/0:2:99]
[   33.0] INFO: rcu_sched self-detected stall on CPU
[   34.0] general protection fault: 0000 [#2] SMP
"""
    assert [f.kind for f in scan_dmesg(text)] == ["Oops", "hung task", "lockup", "lockup", "Oops"]
