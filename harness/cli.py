"""Command line: `./gvm <command> [--config vm_configs/local.yaml]` (or `python -m harness`).

Exit codes: 0 the verdict passed (or the command succeeded), 1 the verdict failed, 2 the harness
could not get that far (the message says why), 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from harness import guest_session, modelcheck, suite
from harness.backends.base import Backend, BackendCommand
from harness.backends import registry
from harness.backends.registry import load_config
from harness.config import DEFAULT_CONFIG, REPO_ROOT, ClusterConfig
from harness.errors import HarnessError, KernelUnderTestError
from harness.hostkvm import tree as host_tree
from harness.hostkvm.qemu_build import build_giantvm_qemu
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages.cache_lock import cache_lock
from harness.transport.local_process import run_captured
from harness.stages.guest_kernel import apply_series, guest_series, prepare_guest_tree

EXIT_FAIL, EXIT_ERROR, EXIT_INTERRUPTED = 1, 2, 130


EPILOG = """exit codes:
  0    the verdict passed, or the command did what it says
  1    the verdict failed (a check, or the kernel under test died or never became ready)
  2    the harness or its hosts could not get that far (the message says why)
  130  interrupted (Ctrl-C or SIGTERM): every QEMU the command started was stopped"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        return EXIT_ERROR
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with `&`, which ignores it
    progress = Progress()
    try:
        config = load_config(args.config)
        return args.handler(args, config, progress)
    except KernelUnderTestError as error:
        progress.say(f"FAIL: {error}")
        return EXIT_FAIL
    except HarnessError as error:
        progress.say(f"error: {error}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        progress.say("interrupted: every QEMU this command started has been stopped")
        return EXIT_INTERRUPTED


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def version() -> str:
    """The checkout's commit when there is one: runs name the harness that made them."""
    try:
        return run_captured(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                            timeout=5).strip()
    except HarnessError:
        return "(not a git checkout)"


def _with_parent(parent: argparse.ArgumentParser) -> type:
    """A subcommand parser class that also takes the parent's options (`--config` after the
    command as well as before it)."""
    class Subcommand(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(parents=[parent], **kwargs)
    return Subcommand


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvm", description=__doc__.splitlines()[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    config_option = argparse.ArgumentParser(add_help=False)  # before or after the command
    config_option.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                               help=f"cluster description (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"cluster description (default: {DEFAULT_CONFIG.name})")
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=_with_parent(config_option))
    patch = commands.add_parser("patch", help="apply the guest series to the kernel tree")
    patch.add_argument("--revert", action="store_true", help="revert what the harness applied")
    patch.set_defaults(handler=_patch)
    commands.add_parser("status", help="which series the tree holds, whether a guest runs") \
        .set_defaults(handler=_status)
    commands.add_parser("build", help="patch and build the guest kernel") \
        .set_defaults(handler=_build)
    commands.add_parser("up", help="patch, build, boot and leave the guest running") \
        .set_defaults(handler=_up)
    for name, handler, text in (("probe", _probe, "probe the running guest and judge it"),
                                ("down", _down, "stop the running guest")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--run", type=Path,
                         help="run folder (default: the newest that started a guest)")
        if name == "down":
            sub.add_argument("--all", action="store_true",
                             help="stop the guest of every run that still has one running")
        sub.set_defaults(handler=handler)
    for command, backend in registry.commands():
        sub = commands.add_parser(command.name, help=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=_backend_command(command, backend))
    host = commands.add_parser("host-build", help="apply the host series to a Linux-DSM tree and "
                                                  "build its kvm (modules, or the whole kernel)")
    host.add_argument("--tree", type=Path, required=True, help="the Linux-DSM source tree")
    host.add_argument("--build-dir", type=Path, help="its O= directory (default: in the tree)")
    host.add_argument("--fragment", type=Path, action="append", dest="fragments",
                      help="configure first: `make --base`, then merge this fragment "
                           "(repeatable; e.g. host_patches/bochs-host.config then "
                           "host_patches/emulated-host.config for an emulated host)")
    host.add_argument("--base", default="tinyconfig",
                      help="the make target the fragments are merged onto (default: tinyconfig)")
    host.set_defaults(handler=_host_build)
    qemu = commands.add_parser("qemu-build", help="build GiantVM's QEMU 2.8 statically from a "
                                                  "tree you give, for every host to run")
    qemu.add_argument("--tree", type=Path, required=True, help="a GiantVM/QEMU checkout")
    qemu.add_argument("--out", type=Path,
                      help="where the build goes (default: <cache>/giantvm-qemu); use it as "
                           "emulated_hosts.qemu_tree or bochs_host.qemu_tree")
    qemu.add_argument("--chroot", type=Path,
                      help="the Debian bullseye build chroot (default: <cache>/qemu-chroot; "
                           "made with debootstrap when missing)")
    qemu.set_defaults(handler=_qemu_build)
    model = commands.add_parser("model-check", help="check the ATOMIC_INC protocol models with spin")
    model.add_argument("--variant", action="append", dest="variants",
                       choices=modelcheck.VARIANTS, help="only this variant (repeatable)")
    model.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4], help="node counts")
    model.set_defaults(handler=_model_check)
    run = commands.add_parser("run", help="patch, build, boot, probe, judge, stop")
    run.add_argument("--keep", action="store_true", help="leave the guest running afterwards")
    run.set_defaults(handler=_run)
    return parser


def _patch(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    with cache_lock(config.cache_dir, progress):
        return _patch_locked(args, config, progress)


def _patch_locked(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    if args.revert:
        tree, _, series = guest_series(config, progress)
        if series is None:
            progress.say("no guest series configured; nothing to revert")
            return 0
        reverted = series.revert(tree)
        progress.say(f"reverted: {', '.join(reverted.names) or 'nothing was applied'}")
        if reverted.kept_edits is not None:
            progress.say(f"    your edited versions of the files it touches: {reverted.kept_edits}")
        return 0
    prepare_guest_tree(config, progress)
    return 0


def _status(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    tree, version, series = guest_series(config, progress)
    print(f"guest tree: {tree} (Linux {version})")
    if series is not None:
        print(f"series {series.directory}: {series.status(tree).describe()}")
    runs = RunFolder.all_with(config.run_root, guest_session.SESSION_FILE)
    if not runs:
        print("no guest started yet")
    for run in runs:  # every run's guest: one orphaned by a killed harness is not hidden
        print(f"{run.path}: {_guest_state(config, run)}")
    return 0


def _guest_state(config: ClusterConfig, run: RunFolder) -> str:
    try:
        session = guest_session.attach_session(config, run, forwards=False)
    except HarnessError as error:
        return f"unknown ({error})"
    try:
        return _describe(session)
    finally:
        session.detach()


def _describe(session: guest_session.GuestSession) -> str:
    try:
        alive = session.guest.exit_status() is None
    except HarnessError as error:
        return f"unknown ({error})"
    return (f"guest {'running' if alive else 'stopped'} on {session.guest.where} "
            f"(pid {session.guest.pid})")


def _build(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    run = RunFolder.create(config.run_root, config.name)
    with run.noting_failure():
        suite.build_guest(config, run, progress)
    progress.say(f"run folder: {run.path}")
    return 0


def _up(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    run = RunFolder.create(config.run_root, config.name)
    with run.noting_failure():
        session = suite.up(config, run, progress)
        try:
            session.open_ssh()
        except BaseException:
            session.close()
            raise
    session.detach()
    progress.say(f"guest is up on {session.guest.where} (pid {session.guest.pid}); "
                 f"run folder: {run.path}")
    login = session.guest.login_command(session.record.access.client_key)
    if login is not None:
        progress.say(f"    {login}")
    progress.say("    then: ./gvm probe; ./gvm down")
    return 0


def _chosen_run(args: argparse.Namespace, config: ClusterConfig) -> RunFolder:
    run = RunFolder(args.run.resolve()) if args.run else \
        RunFolder.newest_with(config.run_root, guest_session.SESSION_FILE)
    if run is None:
        raise HarnessError(f"no guest was started under {config.run_root}; start one with `up`")
    return run


def _probe(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    run = _chosen_run(args, config)
    return _report(suite.probe(config, run, progress), run)


def _down(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    if not args.all:
        session = suite.down(config, _chosen_run(args, config))
        progress.say(f"stopped the guest of {session.run.path}")
        return 0
    failures = 0
    for run in RunFolder.all_with(config.run_root, guest_session.SESSION_FILE):
        try:  # one attach per run: the state is read and the guest stopped on it
            session = guest_session.attach_session(config, run, forwards=False)
        except HarnessError:
            continue  # another config's run, or not one this harness wrote: `status` names it
        if not _describe(session).startswith("guest running"):
            session.detach()
            continue
        try:
            session.close()
            progress.say(f"stopped the guest of {run.path}")
        except HarnessError as error:
            failures += 1
            progress.say(f"error: the guest of {run.path} could not be stopped: {error}")
    return EXIT_ERROR if failures else 0


def _run(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    run = RunFolder.create(config.run_root, config.name)
    with run.noting_failure():
        verdict = suite.run_suite(config, run, progress, keep=args.keep)
    return _report(verdict, run)


def _backend_command(command: BackendCommand, backend: Backend):
    """The handler of a backend's own subcommand; with its suite flag, the whole suite on that
    backend (the backend checks the config first: nothing is built for a config it cannot run)."""
    def handle(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
        if command.suite_flag is None or not getattr(args, command.suite_flag):
            return command.run(args, config, progress)
        backend.judged_config(config)
        run = RunFolder.create(config.run_root, f"{backend.kind}-{config.name}")
        return _report(suite.run_suite(config, run, progress, backend=backend), run)
    return handle


def _host_build(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    tree = host_tree.open_host_tree(args.tree.resolve())
    apply_series(tree.load_series(), tree.path, str(tree.path), progress)
    run = RunFolder.create(config.run_root, f"host-{tree.base.value}")
    configure = host_tree.HostConfigSpec(args.base, tuple(f.resolve() for f in args.fragments)) \
        if args.fragments else None
    result = host_tree.build_kvm(tree, run.file("host-build.log"), progress,
                                 build_dir=args.build_dir.resolve() if args.build_dir else None,
                                 jobs=config.guest.kernel.make_jobs, configure=configure)
    run.write_json("host-build.json", {**asdict(result), "base": result.base.value,
                                       "log_path": str(result.log_path)})
    progress.say(f"    {type(result).__name__}: {result.kernel_release}; run folder: {run.path}")
    return 0


def _qemu_build(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    run = RunFolder.create(config.run_root, "qemu-build")
    out = (args.out or config.cache_dir / "giantvm-qemu").resolve()
    chroot = (args.chroot or config.cache_dir / "qemu-chroot").resolve()
    build = build_giantvm_qemu(args.tree.resolve(), out, chroot, run.file("qemu-build.log"),
                               progress, config.guest.kernel.make_jobs)
    run.write_json("qemu-build.json", {"tree": str(args.tree.resolve()), "out": str(build.tree),
                                       "binary_bytes": build.size})
    progress.say(f"    {build.binary} ({build.size >> 20} MB); qemu_tree: {build.tree}; "
                 f"run folder: {run.path}")
    return 0


def _model_check(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    """Exit 1 only if a shipped variant fails: the original ones are expected to."""
    run = RunFolder.create(config.run_root, "model-check")
    with progress.step(f"spin on {', '.join(args.variants or modelcheck.VARIANTS)}, "
                       f"N = {' '.join(map(str, args.nodes))}"):
        results = modelcheck.run_model_checks(run.path, args.variants, tuple(args.nodes))
    table = modelcheck.format_table(results)
    run.file("model-check.txt").write_text(table + "\n")
    print(table)
    for result in results:
        if not result.passed and result.nodes == min(args.nodes):
            print(f"\n{result.variant}, N={result.nodes}, "
                  f"{'ivy faults' if result.page_traffic else 'no page traffic'}: "
                  f"{result.property} violated\n  " + "\n  ".join(result.trail))
    print(f"run folder: {run.path}")
    shipped_failures = [r for r in results if r.variant.startswith("shipped_") and not r.passed]
    return EXIT_FAIL if shipped_failures else 0


def _report(verdict, run: RunFolder) -> int:
    """The table the suite wrote (with what the run exercised), then where the rest is."""
    print(run.file("verdict.txt").read_text(), end="")
    print(f"run folder: {run.path}")
    return 0 if verdict.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
