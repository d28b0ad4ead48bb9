"""The jiffies suite on the real guest: built from linux-source-6.1, booted under QEMU, probed over
SSH and over the serial console, judged with the config's thresholds."""

import re
from pathlib import Path

import pytest

from harness import suite
from harness.stages.judge import check_samples
from harness.stages.probe import JiffiesProbe
from harness.transport.remote_host import RemoteHost, RemoteHostError, RemoteHostSpec
from harness.transport.forward import UnixTarget

pytestmark = pytest.mark.e2e


def test_console_and_ssh_reach_the_same_guest(guest_console, guest_ssh) -> None:
    boot_id_serial = guest_console.run("cat /proc/sys/kernel/random/boot_id").check("boot_id")
    boot_id_ssh = guest_ssh.run("cat /proc/sys/kernel/random/boot_id").check("boot_id")
    assert re.fullmatch(r"[0-9a-f-]{36}", boot_id_serial)
    assert boot_id_serial == boot_id_ssh


def test_console_reports_exit_codes_and_multiline_output(guest_console) -> None:
    result = guest_console.run("printf 'a\\nb\\n'; echo err >&2; (exit 7)")
    assert result.exit_status == 7
    assert result.output.splitlines() == ["a", "b", "err"]


def test_every_vcpu_is_online(guest_ssh, cluster_config) -> None:
    assert guest_ssh.run("nproc").check("nproc").strip() == str(cluster_config.vm.vcpus)


@pytest.mark.parametrize("transport", ["ssh", "serial"])
def test_jiffies_coherent_over(transport, cluster, cluster_config, guest_ssh,
                               guest_console) -> None:
    runner = guest_ssh if transport == "ssh" else guest_console
    probe = JiffiesProbe(runner, transport, cluster_config.vm.vcpus,
                         cluster_config.vm.vcpus_per_node)
    samples = probe.sample(rounds=8, interval_s=0.2)
    assert {s.vcpu for s in samples} == set(range(cluster_config.vm.vcpus))
    verdict = check_samples(samples, cluster.record.hz, cluster_config.checks)
    failures = [c for c in verdict.checks if not c.passed]
    assert verdict.passed, failures


def test_full_probe_writes_the_run_artifacts(cluster, cluster_config, progress) -> None:
    observation = suite.probe_guest(cluster, progress)
    assert observation.stream is not None and observation.stream.readings, "the stream ran"
    verdict = suite.judge(observation, cluster.record.hz, cluster_config, cluster.run)
    assert verdict.passed, [c for c in verdict.checks if not c.passed]
    for name in ("samples.json", "verdict.json", "junit.xml", "lag.png", "launch.json",
                 "stream.json",
                 "console-kernel.log", "console-shell.log"):
        assert cluster.run.file(name).stat().st_size > 0, name
    assert cluster.run.file("qemu.log").is_file()  # empty while QEMU has nothing to complain about


def test_the_guest_as_a_host_reads_files_and_says_why_it_forwards_no_unix_socket(
        cluster, tmp_path) -> None:
    """The guest's dropbear, as on a Bochs host: SFTP works, unix-socket forwarding does not."""
    access, port = cluster.record.access, cluster.guest.endpoints.ssh_port
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {access.host_key_type} "
                           f"{access.host_key_base64}\n")
    spec = RemoteHostSpec("guest", "127.0.0.1", port=port,
                          key_file=Path(access.client_key), known_hosts=known_hosts)
    with RemoteHost(spec) as guest:
        assert guest.read_file("/proc/sys/kernel/ostype") == b"Linux\n"
        with pytest.raises(RemoteHostError, match=r"cannot forward to unix:/tmp/no.sock .*dropbear"):
            guest.open_channel_to(UnixTarget("/tmp/no.sock"))
