"""`gvm bochs-host`: boot the config's Bochs machine, say what it offers KVM, stop it; with
`--guest`, the CLI runs the whole suite on the Bochs backend instead."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from harness.backends.base import BackendCommand
from harness.backends.bochs.backend import describe
from harness.backends.bochs.config import bochs_host_of
from harness.backends.bochs.host import start_bochs_host
from harness.config import ClusterConfig
from harness.progress import Progress
from harness.run_folder import RunFolder


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest", action="store_true",
                        help="also build the guest and run the jiffies suite on it under KVM on "
                             "the Bochs machine (needs bochs_host.qemu_tree)")


def bochs_host(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    bochs = bochs_host_of(config)
    run = RunFolder.create(config.run_root, f"bochs-{config.name}")
    host = start_bochs_host(bochs, run, progress)
    try:
        facts = host.facts()
    finally:
        host.stop()
    print("\n".join(describe(host, facts)))
    run.write_json("bochs-host.json", {"boot_s": host.boot_s, "ssh_s": host.ssh_s,
                                       "facts": asdict(facts)})
    print(f"run folder: {run.path}")
    return 0


COMMANDS = (BackendCommand("bochs-host", "boot the config's Bochs-emulated VMX host, report what "
                                         "it offers KVM, stop it",
                           bochs_host, _add_arguments, suite_flag="guest"),)
