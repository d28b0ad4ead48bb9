"""Benchmark: harness time from `gvm up` to QEMU's start on a warm cache, with the build reused
(nothing changed: no configure, no make) beside the old path (configure + a make with nothing to
do, forced by removing the reuse stamp).

Measured from spawning `python -m harness up` (interpreter start and imports included) until the
run folder's launch.json appears, which the backend writes just before it starts QEMU; each guest
is stopped with `down` afterwards.

Usage: .venv/bin/python benchmarks/warm_start.py [--config vm_configs/local.yaml] [--repeat 3]
Needs the guest kernel built once (`./gvm build`). Prints a table; asserts nothing. Other runs
that patch or build in the same cache meanwhile (another series, a lock to wait for) show up as
rebuilds in the reused column: measure on a machine of its own.

Measured (2 cores, load 10-11 from other work, the cache kept to itself): reused 1.25 s median
(1.25-1.45 s), configure + no-op make 39.8 s median (31.4-46.5 s), 3 runs each.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.backends.registry import load_config  # noqa: E402
from harness.config import DEFAULT_CONFIG  # noqa: E402
from harness.stages import build_reuse  # noqa: E402


def time_to_qemu(config_file: Path, runs: Path) -> float:
    """Seconds from spawning `up` to launch.json; the guest is then waited for and stopped."""
    before = set(runs.glob("*/launch.json"))
    started = time.monotonic()
    up = subprocess.Popen([sys.executable, "-m", "harness", "-q", "--config", str(config_file),
                           "up"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    while not set(runs.glob("*/launch.json")) - before:
        if up.poll() is not None:
            raise SystemExit(f"`up` exited with {up.returncode} before QEMU started:\n"
                             f"{up.stderr.read()}")
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    up.wait()
    subprocess.run([sys.executable, "-m", "harness", "-q", "--config", str(config_file), "down"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="gvm-warm-") as scratch:
        runs = Path(scratch) / "runs"
        data = yaml.safe_load(args.config.read_text())
        data["run_dir"] = str(runs)
        copy = args.config.resolve().parent / f".warm-start-{Path(scratch).name}.yaml"
        copy.write_text(yaml.safe_dump(data))  # beside the original: its relative paths hold
        try:
            time_to_qemu(copy, runs)  # make sure the build and its stamp exist
            reused = [time_to_qemu(copy, runs) for _ in range(args.repeat)]
            rebuilt = []
            for _ in range(args.repeat):
                for build_dir in (config.cache_dir / "build").iterdir():
                    build_reuse.forget(build_dir)
                rebuilt.append(time_to_qemu(copy, runs))
        finally:
            copy.unlink()
    print(f"{'warm `up` until QEMU starts':40} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in (("build reused (no configure, no make)", reused),
                         ("configure + no-op make (before)", rebuilt)):
        print(f"{name:40} {statistics.median(values):7.2f}s {min(values):7.2f}s "
              f"{max(values):7.2f}s")


if __name__ == "__main__":
    main()
