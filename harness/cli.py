"""Command line: `./gvm <command> [--config vm_configs/local.yaml]` (or `python -m harness`).

Exit codes: 0 the verdict passed (or the command succeeded), 1 the verdict failed, 2 the harness
could not get that far (the message says why), 130 interrupted.

Over 400 lines because it holds one short handler per command, each turning its arguments into
one call below (suite.py, the stages, the backends' own commands through the registry) and the
outcome into an exit code and the run folder's reports; none of the work is done here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from harness import guest_session, modelcheck, suite
from harness.backends.base import Backend, BackendCommand
from harness.backends import registry
from harness.backends.registry import load_config
from harness.config import DEFAULT_CONFIG, REPO_ROOT, ClusterConfig
from harness.errors import HarnessError, KernelUnderTestError
from harness.hostkvm import tree as host_tree
from harness.hostkvm.qemu_build import build_giantvm_qemu
from harness.progress import Progress, Verbosity
from harness.run_folder import RunFolder, runs_to_prune
from harness.stages.cache_lock import cache_lock
from harness.transport.local_process import run_captured
from harness.stages.guest_kernel import apply_series, guest_series, prepare_guest_tree
from harness.stages.report import RunError, write_junit, write_run_reports
from harness.stages.verdict import Verdict

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
    progress = Progress(verbosity=args.verbosity)
    try:
        config = load_config(_config_path(args.config))
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


def _config_path(given: Path) -> Path:
    """The default config ships with the checkout, not with a plain install: say so."""
    if given == DEFAULT_CONFIG and not DEFAULT_CONFIG.is_file():
        raise HarnessError(f"no --config given, and this installation has no default config "
                           f"({DEFAULT_CONFIG} ships with a checkout of gvm-harness): pass "
                           "--config FILE (a copy of the checkout's vm_configs/local.yaml)")
    return given


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def version() -> str:
    """The checkout's commit when there is one (runs name the harness that made them), else the
    installed package's version."""
    try:
        return run_captured(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                            timeout=5).strip()
    except HarnessError:
        try:
            return importlib.metadata.version("gvm-harness")
        except importlib.metadata.PackageNotFoundError:
            return "(neither a git checkout nor installed)"


def _with_parent(parent: argparse.ArgumentParser) -> type:
    """A subcommand parser class that also takes the parent's options (`--config` after the
    command as well as before it)."""
    class Subcommand(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(parents=[parent], **kwargs)
    return Subcommand


def _common_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--config, -q and -v: on the main parser with their defaults, and on every subcommand
    without (so they work before or after the command and the later one wins)."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS
    parser.add_argument("--config", type=Path, default=default(DEFAULT_CONFIG),
                        help=f"cluster description (default: {DEFAULT_CONFIG.name})")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const",
                          const=Verbosity.QUIET, default=default(Verbosity.NORMAL),
                          help="only results, errors and failed steps")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const",
                          const=Verbosity.VERBOSE, default=default(Verbosity.NORMAL),
                          help="every line the long steps print (make, waits), one per line")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvm", description=__doc__.splitlines()[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    common = argparse.ArgumentParser(add_help=False)  # before or after the command
    _common_options(common, defaults=False)
    _common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=_with_parent(common))
    patch = commands.add_parser("patch", help="apply the guest series to the kernel tree")
    patch.add_argument("--revert", action="store_true", help="revert what the harness applied")
    patch.set_defaults(handler=_patch)
    status = commands.add_parser("status", help="which series the tree holds, whether a guest "
                                                "runs")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(handler=_status)
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
        else:
            sub.add_argument("--json", action="store_true",
                             help="print the verdict as JSON (verdict.json) instead of the table")
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
    _add_gc(commands)
    _complete(parser)
    return parser


def _add_gc(commands: argparse._SubParsersAction) -> None:
    gc = commands.add_parser("gc", help="delete old run folders (never one whose guest runs)")
    gc.add_argument("--keep", type=int, default=20, metavar="N",
                    help="keep the newest N run folders (default: 20)")
    gc.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                    help="delete only folders older than DAYS, still keeping the newest N")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    gc.set_defaults(handler=_gc)


def _complete(parser: argparse.ArgumentParser) -> None:
    """Tab completion through argcomplete when it is installed (the `completion` extra):
    `eval "$(register-python-argcomplete gvm)"`. Without it the CLI is the same."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


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


@dataclass(frozen=True)
class GuestState:
    """What `status` knows of one run's guest."""

    run: str
    state: str  # running | stopped | unknown
    where: str | None = None
    pid: int | None = None
    problem: str | None = None

    def describe(self) -> str:
        if self.state == "unknown":
            return f"unknown ({self.problem})"
        return f"guest {self.state} on {self.where} (pid {self.pid})"


@dataclass(frozen=True)
class StatusReport:
    tree: str
    linux: str
    series: str | None
    series_state: str | None
    applied: tuple[str, ...]
    guests: tuple[GuestState, ...]


def _status(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    tree, version, series = guest_series(config, progress)
    applied = series.status(tree) if series is not None else None
    report = StatusReport(
        tree=str(tree), linux=str(version),
        series=str(series.directory) if series is not None else None,
        series_state=applied.state.value if applied is not None else None,
        applied=applied.applied_names if applied is not None else (),
        # every run's guest: one orphaned by a killed harness is not hidden
        guests=tuple(_guest_state(config, run) for run in
                     RunFolder.all_with(config.run_root, guest_session.SESSION_FILE)))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    print(f"guest tree: {tree} (Linux {version})")
    if series is not None and applied is not None:
        print(f"series {series.directory}: {applied.describe()}")
    if not report.guests:
        print("no guest started yet")
    for guest in report.guests:
        print(f"{guest.run}: {guest.describe()}")
    return 0


def _guest_state(config: ClusterConfig, run: RunFolder) -> GuestState:
    try:
        session = guest_session.attach_session(config, run, forwards=False)
    except HarnessError as error:
        return GuestState(str(run.path), "unknown", problem=str(error))
    try:
        return _state_of(session)
    finally:
        session.detach()


def _state_of(session: guest_session.GuestSession) -> GuestState:
    try:
        alive = session.guest.exit_status() is None
    except HarnessError as error:
        return GuestState(str(session.run.path), "unknown", problem=str(error))
    return GuestState(str(session.run.path), "running" if alive else "stopped",
                      session.guest.where, session.guest.pid)


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
    return _report(suite.probe(config, run, progress), run, as_json=args.json)


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
        if _state_of(session).state != "running":
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
    with run.noting_failure(), _reports_on_every_exit(run, config):
        verdict = suite.run_suite(config, run, progress, keep=args.keep)
    return _report(verdict, run)


@contextmanager
def _reports_on_every_exit(run: RunFolder, config: ClusterConfig) -> Iterator[None]:
    """A run that stops before its verdict (a build or boot failure, a host, Ctrl-C) still
    leaves junit.xml, report.html and summary.md, with the reason as an error test case: CI
    gets a report whatever the exit code."""
    try:
        yield
    except KeyboardInterrupt:
        _write_stopped(run, config, RunError("interrupted", "interrupted (Ctrl-C or SIGTERM) "
                                             "before the verdict"))
        raise
    except HarnessError as error:
        stage = error.culprit if isinstance(error, KernelUnderTestError) else \
            type(error).__name__
        _write_stopped(run, config, RunError(stage, str(error)))
        raise


def _write_stopped(run: RunFolder, config: ClusterConfig, error: RunError) -> None:
    name = f"gvm-harness.{config.name}"
    write_junit(Verdict(()), run.file("junit.xml"), name, started=run.started_at(), error=error)
    write_run_reports(run.path, f"gvm-harness {config.name}", None, error=error)


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


def _gc(args: argparse.Namespace, config: ClusterConfig, progress: Progress) -> int:
    """Old run folders go; the newest `--keep`, any whose guest may still run (running or not
    known: another config's) and `latest` stay."""
    runs = RunFolder.all(config.run_root)
    live = {guest.run for guest in (_guest_state(config, run) for run in runs
                                    if run.file(guest_session.SESSION_FILE).is_file())
            if guest.state != "stopped"}
    latest = (config.run_root / "latest").resolve()
    older_than_s = args.older_than * 86400 if args.older_than is not None else None
    doomed = runs_to_prune(runs, args.keep, older_than_s, time.time(),
                           keep=lambda run: str(run.path) in live or run.path == latest)
    freed = 0
    for run in doomed:
        size = run.size()
        freed += size
        if not args.dry_run:
            run.remove()
        progress.say(f"{'would delete' if args.dry_run else 'deleted'} {run.path} "
                     f"({size >> 20} MB)")
    progress.say(f"{'would free' if args.dry_run else 'freed'} {freed >> 20} MB in "
                 f"{len(doomed)} run folders; kept {len(runs) - len(doomed)} "
                 f"({len(live)} with a guest that runs or may run)")
    return 0


def _report(verdict: Verdict, run: RunFolder, as_json: bool = False) -> int:
    """The table the suite wrote (with what the run exercised), then where the rest is; or, as
    JSON, verdict.json for scripts."""
    if as_json:
        print(json.dumps({**run.read_json("verdict.json"), "run": str(run.path)}, indent=2))
        return 0 if verdict.passed else EXIT_FAIL
    print(run.file("verdict.txt").read_text(), end="")
    print(f"run folder: {run.path}")
    return 0 if verdict.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
