"""GiantVM's own subcommands: `deploy` (the host kvm onto every node's host) and `plan` (the
node command lines, run nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.backends.base import BackendCommand, BootSpec
from harness.backends.giantvm.backend import launcher_for
from harness.backends.giantvm.config import LAUNCHER
from harness.backends.giantvm.deploy import deploy_host_kvm
from harness.config import ClusterConfig
from harness.progress import Progress
from harness.run_folder import RunFolder


def deploy(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    run = RunFolder.create(config.run_root, f"deploy-{config.name}")
    deploy_host_kvm(config, run, progress)
    progress.say(f"run folder: {run.path}")
    return 0


def plan(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    """What `up` would start, with placeholders for the files only a build can name."""
    boot = BootSpec(Path("<bzImage>"), Path("<initramfs>"), config.guest.cmdline,
                    config.vm.vcpus, config.vm.memory_mb)
    if config.vm.launcher != LAUNCHER:
        print(f"one stock QEMU ({config.vm.qemu_binary}) on {config.hosts[0].name}; "
              "`harness up` prints its line into launch.json")
        return 0
    launcher = launcher_for(config, boot, "<run>")
    for command in launcher.node_commands():
        print(f"# node {command.node} on {command.host}\n{command.shell()}")
    print("# TCP ports that must be free:")
    for need in launcher.required_ports():
        print(f"#   {need.host} {need.ip}:{need.port} node {need.node} {need.purpose}")
    return 0


COMMANDS = (
    BackendCommand("deploy", "install the host kvm (GiantVM configs) on every node's host",
                   deploy),
    BackendCommand("plan", "print the QEMU command line of every node, run nothing", plan),
)
