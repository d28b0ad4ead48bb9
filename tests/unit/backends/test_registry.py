"""The registry and the backend contract, with a minimal backend of the kind docs/architecture.md
describes: the suite starts it, records it by kind, finds it again, and stops it, the config
loader parses its YAML section and the CLI offers its subcommand, all from one Registration line,
without knowing anything else about it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import yaml

from harness import guest_session, suite
from harness.backends import registry
from harness.backends.base import BackendCommand, GuestEndpoints, HostLog, StartSpec
from harness.backends.registry import Registration, load_config
from harness.cli import main
from harness.config import BackendSection
from harness.yaml_section import Section
from harness.errors import ConfigError, HarnessError
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

    def login_command(self, client_key: str) -> str | None:
        return None

    def record(self) -> ScriptedRecord:
        return ScriptedRecord(str(self.endpoints.kernel_console_log))

    def host_logs(self) -> list[HostLog]:
        return [HostLog("nowhere", "nothing", ())]

    def host_counters(self) -> dict[str, dict[str, int]]:
        return {"nowhere": {"atomic_inc_sent": 0}}

    def host_kernel_failure(self) -> None:
        return None

    def platform_caveat(self) -> None:
        return None

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

    def atomic_inc_mode(self, config) -> str | None:
        return None

    def hosts_to_reach(self, config) -> list:
        return []

    def start(self, spec: StartSpec) -> ScriptedGuest:
        console = spec.run.file("console-kernel.log")
        console.write_text(f"Linux version 6.1\n{rootfs.READY_MARKER}\n")
        return ScriptedGuest(GuestEndpoints(console, spec.run.file("shell.sock"), "127.0.0.1", 1))

    def attach(self, config, run, record: dict, forwards: bool) -> ScriptedGuest:
        saved = ScriptedRecord(**record)
        return ScriptedGuest(GuestEndpoints(Path(saved.console), run.file("shell.sock"),
                                            "127.0.0.1", 1))


@dataclass(frozen=True)
class ScriptedSection:
    greeting: str


def parse_scripted(section: Section, config) -> ScriptedSection:
    scripted = ScriptedSection(section.string("greeting"))
    section.done()
    return scripted


def greet(args, config, progress) -> int:
    print(config.section(ScriptedSection).greeting)
    return 0


SCRIPTED = Registration(ScriptedBackend(),
                        BackendSection("scripted", parse_scripted, gives="a greeting",
                                       launcher="scripted"),
                        (BackendCommand("greet", "print the greeting", greet),))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "REGISTERED", (SCRIPTED, *registry.REGISTERED))


@pytest.fixture
def scripted(registered, tmp_path):
    config = replace(load_config(), name="scripted", run_root=tmp_path / "runs")
    return config, RunFolder.create(config.run_root, config.name)


def scripted_yaml(tmp_path: Path, **scripted) -> Path:
    data = yaml.safe_load(load_config().path.read_text())
    data["guest"]["kernel"].update(patches=None, config={"fragments": []})
    data["vm"]["launcher"] = "scripted"
    data["scripted"] = scripted
    path = tmp_path / "scripted.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_its_section_and_its_command_come_with_the_registration(registered, tmp_path,
                                                                capsys) -> None:
    path = scripted_yaml(tmp_path, greeting="hello from a new backend")
    assert load_config(path).section(ScriptedSection).greeting == "hello from a new backend"
    assert main(["--config", str(path), "greet"]) == 0
    assert capsys.readouterr().out == "hello from a new backend\n"
    with pytest.raises(ConfigError, match=r"scripted.greting: unknown key; allowed here: "
                                          r"greeting"):
        load_config(scripted_yaml(tmp_path, greeting="hi", greting="hi"))


def test_without_its_registration_its_launcher_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"vm.launcher: 'scripted' is not one of: qemu, "
                                          r"giantvm"):
        load_config(scripted_yaml(tmp_path, greeting="hi"))


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
