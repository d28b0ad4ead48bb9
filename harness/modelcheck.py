"""Check the Promela model of the ATOMIC_INC write-update protocol (models/) with spin.

Every (variant, nodes, page traffic) combination is generated once with `spin -a` and compiled
twice: with the LTL claims, so that each safety property gets its own pan run, and with
-DNOCLAIM, because pan reports invalid end states (deadlocks) only without a claim. A violation
is replayed with `pan -S`, which prints only the model's own "ev:" lines: the story of ticks,
UPDATE messages, applies and page faults that led there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness.errors import CommandError, HarnessError, SetupError
from harness.transport.local_process import run_captured

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

VARIANTS = (
    "orig_send_all",          # moharaka write_update_send_all
    "orig_update_first",      # moharaka write_update_update_first
    "contract_v1_send_all",     # the first contract, without the page-install rule
    "contract_v1_local_first",  # the same for local_first
    "shipped_send_all",         # host_patches/, kvm.atomic_inc_mode=send_all
    "shipped_local_first",      # host_patches/, kvm.atomic_inc_mode=local_first
    "bounded_send_all",         # shipped_send_all with timeouts, the epoch fence and fallback
    "bounded_local_first",      # the same for local_first
    "bounded_noepoch_send_all",  # bounded_send_all without the epoch check
)
LTL_PROPERTIES = ("monotonic", "converge", "skew", "no_late_update")
DEADLOCK_PROPERTY = "no_deadlock"
PROPERTIES = (*LTL_PROPERTIES, DEADLOCK_PROPERTY)
VIOLATION_MEANING = {
    "monotonic": "a guest read on some node returned less than an earlier read there",
    "converge": "once nothing could move any more, some node did not read the number of ticks",
    "skew": "two nodes read jiffies values more than one tick apart",
    "no_late_update": "an UPDATE changed a node's copy after that node answered a failed round's "
                      "fence",
    DEADLOCK_PROPERTY: "threads are stuck forever (invalid end state)",
}

# Bounds that keep one combination to seconds; models/README.md explains them.
TICKS = 3
SERVERS_PER_NODE = 2
MAX_SEARCH_DEPTH = 100_000
HASH_TABLE_BITS = 20          # pan -w: 1M slots is plenty for the < 1M states stored here
COMMAND_TIMEOUT_SECONDS = 1800
# -O0 compiles pan.c in half a second, several times faster than -O2; only the largest N = 4
# searches would run faster optimised.
PAN_CFLAGS = ["-O0", "-DSAFETY", "-DNOREDUCE"]

EVENT_PREFIX = "ev: "
STUCK_PROCESS = re.compile(r"proc\s+\d+ \(([^)]+)\).*\(invalid end state\)")


@dataclass(frozen=True)
class ModelCheckResult:
    """The outcome of checking one property on one model configuration."""

    variant: str
    nodes: int
    page_traffic: bool          # Ivy faults move the jiffies page too (models/README.md)
    property: str
    passed: bool
    states: int                 # states stored by pan (the whole space when passed)
    seconds: float              # wall time of the search and the replay
    trail: tuple[str, ...]      # the counterexample as model events; empty when passed
    trail_file: Path | None     # where that text was written


def run_model_checks(out_dir: Path, variants: tuple[str, ...] | list[str] | None = None,
                     nodes: tuple[int, ...] = (2, 3, 4),
                     page_traffic: tuple[bool, ...] = (False, True),
                     jobs: int | None = None) -> list[ModelCheckResult]:
    """Check every property for each combination; build products and trails go under out_dir.

    Combinations run in parallel (`jobs`, default: one per CPU) since each is a few compiler
    and pan processes on one core.
    """
    chosen = tuple(variants) if variants else VARIANTS
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        raise HarnessError(f"unknown model variant(s) {', '.join(unknown)}; "
                           f"known: {', '.join(VARIANTS)}")
    bad_nodes = [count for count in nodes if not 2 <= count <= 4]
    if bad_nodes:
        raise HarnessError(f"the model supports 2 to 4 nodes (generate_txid's limit), "
                           f"not {bad_nodes}")
    _require_tools()
    combinations = [(variant, count, traffic)
                    for variant in chosen for count in nodes for traffic in page_traffic]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        per_combination = pool.map(lambda combo: _check_combination(out_dir, *combo),
                                   combinations)
        return [result for results in per_combination for result in results]


def format_table(results: list[ModelCheckResult]) -> str:
    """One row per (variant, nodes, page traffic): each property's verdict, states, time."""
    rows: dict[tuple[str, int, bool], dict[str, ModelCheckResult]] = {}
    for result in results:
        rows.setdefault((result.variant, result.nodes, result.page_traffic),
                        {})[result.property] = result
    header = ["variant", "N", "page traffic", *PROPERTIES, "states", "time"]
    lines = [header]
    for (variant, count, traffic), by_property in rows.items():
        verdicts = [("pass" if by_property[name].passed else "FAIL")
                    if name in by_property else "-" for name in PROPERTIES]
        states = max(result.states for result in by_property.values())
        seconds = sum(result.seconds for result in by_property.values())
        lines.append([variant, str(count), "ivy faults" if traffic else "none", *verdicts,
                      str(states), f"{seconds:.1f}s"])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    numeric = {1, len(header) - 2, len(header) - 1}
    return "\n".join(
        "  ".join(cell.rjust(width) if column in numeric else cell.ljust(width)
                  for column, (cell, width) in enumerate(zip(line, widths))).rstrip()
        for line in lines)


def _require_tools() -> None:
    """Fail before any work if spin or the C compiler for pan.c is missing."""
    missing = [tool for tool in ("spin", "gcc") if shutil.which(tool) is None]
    if missing:
        raise SetupError(f"{' and '.join(missing)} not found: the model checks need the spin "
                         "model checker and gcc to compile its verifier; run the project's "
                         "setup (./gvm setup), which installs the Debian packages spin and gcc")


def _check_combination(out_dir: Path, variant: str, nodes: int,
                       page_traffic: bool) -> list[ModelCheckResult]:
    """Build the two verifiers in a fresh directory and check each property."""
    work_dir = out_dir / f"{variant}-n{nodes}-{'ivy' if page_traffic else 'quiet'}"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    for model_file in MODELS_DIR.glob("*.pml"):
        shutil.copy(model_file, work_dir)
    model = f"{variant}.pml"
    defines = [f"-DN={nodes}", f"-DTICKS={TICKS}", f"-DSERVERS={SERVERS_PER_NODE}",
               f"-DPAGE_TRAFFIC={int(page_traffic)}"]
    _run(["spin", *defines, "-a", model], work_dir)
    _run(["gcc", *PAN_CFLAGS, "-o", "pan_claims", "pan.c"], work_dir)
    _run(["gcc", *PAN_CFLAGS, "-DNOCLAIM", "-o", "pan_deadlock", "pan.c"], work_dir)
    return [_check_property(work_dir, model, variant, nodes, page_traffic, name)
            for name in PROPERTIES]


def _check_property(work_dir: Path, model: str, variant: str, nodes: int, page_traffic: bool,
                    name: str) -> ModelCheckResult:
    """Search for a violation of one property and replay the first one pan finds."""
    if name == DEADLOCK_PROPERTY:
        verifier, claim, end_states = "./pan_deadlock", [], []
    else:
        # -E: invalid end states are the no-claim build's business.
        verifier, claim, end_states = "./pan_claims", ["-N", name], ["-E"]
    started = time.monotonic()
    # -t<name>: one trail file per property, <model>.<name>.
    output = _run([verifier, *claim, *end_states, "-n", f"-m{MAX_SEARCH_DEPTH}",
                   f"-w{HASH_TABLE_BITS}", f"-t{name}"], work_dir)
    (work_dir / f"{name}.pan.txt").write_text(output)
    if "max search depth too small" in output:
        raise CommandError(f"pan hit its depth limit of {MAX_SEARCH_DEPTH} in {work_dir}: "
                           "raise MAX_SEARCH_DEPTH in harness/modelcheck.py")
    errors = re.search(r"errors: (\d+)", output)
    states = re.search(r"(\d+) states, stored", output)
    if errors is None or states is None:
        raise CommandError(f"unexpected pan output in {work_dir / (name + '.pan.txt')}")
    trail: tuple[str, ...] = ()
    trail_file = None
    if int(errors.group(1)) > 0:
        replay = _run([verifier, "-S", f"{model}.{name}", *claim], work_dir)
        trail = _story(replay, name)
        trail_file = work_dir / f"{name}.trail.txt"
        trail_file.write_text("\n".join(trail) + "\n")
    return ModelCheckResult(variant=variant, nodes=nodes, page_traffic=page_traffic,
                            property=name, passed=not trail, states=int(states.group(1)),
                            seconds=time.monotonic() - started, trail=trail,
                            trail_file=trail_file)


def _story(replay: str, name: str) -> tuple[str, ...]:
    """The model's event lines from a replay, then who is stuck and what was violated."""
    events = [line[len(EVENT_PREFIX):] for line in replay.splitlines()
              if line.startswith(EVENT_PREFIX)]
    if name == DEADLOCK_PROPERTY:
        stuck = Counter(STUCK_PROCESS.findall(replay))
        events.append("stuck forever: " + ", ".join(
            f"{process} x{count}" if count > 1 else process for process, count in stuck.items()))
    events.append(f"VIOLATED {name}: {VIOLATION_MEANING[name]}")
    return tuple(events)


def _run(args: list[str], work_dir: Path) -> str:
    """Run a spin, gcc or pan step in the combination's directory."""
    try:
        return run_captured(args, cwd=work_dir, timeout=COMMAND_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise CommandError(f"`{' '.join(args)}` ran longer than {COMMAND_TIMEOUT_SECONDS}s in "
                           f"{work_dir}; the model's bounds are too large for this machine"
                           ) from None
