"""The registry and the backend contract, with a minimal backend of the kind docs/architecture.md
describes: the suite starts it, records it by kind, finds it again, and stops it, without
knowing anything else about it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from harness import guest_session, suite
from harness.backends import registry
from harness.backends.base import GuestEndpoints, HostLog, StartSpec
from harness.config import load_config
from harness.errors import HarnessError
from harness.progress import Progress
from harness.run_folder import RunFolder
from harness.stages import rootfs


@dataclass(frozen=True)
class ScriptedRecord:
    console: str


@dataclass
class ScriptedGuest:
    endpoints: GuestEndpoints
    accelerator: str = "tcg"
    where: str = "nowhere"
    pid: int = 0
    stopped: bool = False
    detached: int = field(default=0)
    one_clock: bool = True

    def exit_status(self) -> int | None:
        return 0 if self.stopped else None

    def qemu_log_tail(self, lines: int = 10) -> str:
        return "(scripted)"

    def record(self) -> ScriptedRecord:
        return ScriptedRecord(str(self.endpoints.kernel_console_log))

    def host_logs(self) -> list[HostLog]:
        return [HostLog("nowhere", "nothing", ())]

    def host_counters(self) -> dict[str, dict[str, int]]:
        return {"nowhere": {"atomic_inc_sent": 0}}

    def stop(self) -> None:
        self.stopped = True

    def detach(self) -> None:
        self.detached += 1


@dataclass(frozen=True)
class ScriptedBackend:
    """Its guest is a console file that already says the guest is ready."""

    kind = "scripted"

    def wants(self, config) -> bool:
        return config.name == "scripted"

    def judged_config(self, config):
        return replace(config, timeouts=replace(config.timeouts, boot_s=5))

    def start(self, spec: StartSpec) -> ScriptedGuest:
        console = spec.run.file("console-kernel.log")
        console.write_text(f"Linux version 6.1\n{rootfs.READY_MARKER}\n")
        return ScriptedGuest(GuestEndpoints(console, spec.run.file("shell.sock"), "127.0.0.1", 1))

    def attach(self, config, run, record: dict, forwards: bool) -> ScriptedGuest:
        saved = ScriptedRecord(**record)
        return ScriptedGuest(GuestEndpoints(Path(saved.console), run.file("shell.sock"),
                                            "127.0.0.1", 1))


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "BACKENDS", (ScriptedBackend(), *registry.BACKENDS))
    config = replace(load_config(), name="scripted", run_root=tmp_path / "runs")
    return config, RunFolder.create(config.run_root, config.name)


def test_a_new_backend_plugs_in_with_one_registry_line(scripted, tmp_path) -> None:
    config, run = scripted
    session = guest_session.boot_guest(config, tmp_path / "bzImage", 250, run, Progress())
    assert isinstance(session.guest, ScriptedGuest)
    assert session.config.timeouts.boot_s == 5  # the backend's judged config
    saved = json.loads(run.file(guest_session.SESSION_FILE).read_text())
    assert saved["kind"] == "scripted"
    assert saved["state"] == {"console": str(run.file("console-kernel.log"))}
    assert run.file(guest_session.SESSION_FILE).stat().st_mode & 0o077 == 0
    later = guest_session.attach_session(config, run)
    assert isinstance(later.guest, ScriptedGuest)
    assert suite.host_checks(later, Progress())[0].passed
    suite.down(config, run)


def test_the_shipped_configs_pick_their_backends() -> None:
    local = load_config()
    assert registry.backend_for(local).kind == "local-qemu"
    remote = replace(local, hosts=(replace(local.hosts[0], address="10.0.0.9"),))
    assert registry.backend_for(remote).kind == "remote-qemu"
    assert registry.backend_named("giantvm").kind == "giantvm"


def test_a_session_of_an_unknown_kind_says_so(tmp_path) -> None:
    with pytest.raises(HarnessError, match="no backend is called 'vmware'.*known: emulated, giantvm"):
        registry.backend_named("vmware")
