"""Deploy: the kvm module swap and its rollback, against a fake host that keeps module state.

The real swap cannot run on this machine (no VT-x, so kvm_intel cannot load; the network-namespace
hosts share this kernel), so `ModuleTableHost` interprets the commands deploy sends (modinfo, rmmod,
insmod, modprobe, the /sys/module snapshot) against an in-memory kernel and can fail any of them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import pytest

from harness.hostkvm.modules import DeployError, install_kvm_modules
from harness.transport.remote_host import RemoteResult

BOOT_ID = "6c1f0d9e-0000-4000-8000-000000000001"
STATE = "/var/lib/gvm/kvm-modules.state"


@dataclass
class Module:
    srcversion: str
    params: dict[str, str]
    refcnt: int = 0
    holders: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModuleFileOnHost:
    name: str
    srcversion: str
    params: tuple[tuple[str, str], ...]
    vermagic: str = "4.9.76+ SMP mod_unload modversions"
    depends: str = "irqbypass"


SYSTEM = {"kvm": ModuleFileOnHost("kvm", "SYSKVM", (("halt_poll_ns", "200000"),)),
          "kvm_intel": ModuleFileOnHost("kvm_intel", "SYSINTEL", (("nested", "N"),), depends="kvm")}
OURS = {"/w/kvm.ko": ModuleFileOnHost("kvm", "OURKVM", (("halt_poll_ns", "200000"),
                                                          ("atomic_inc_mode", "send_all"))),
        "/w/kvm-intel.ko": ModuleFileOnHost("kvm_intel", "OURINTEL", (("nested", "N"),),
                                            depends="kvm")}


class ModuleTableHost:
    """A host kernel's modules, changed only by the commands deploy runs."""

    name = "fake"

    def __init__(self, files: dict[str, ModuleFileOnHost] | None = None,
                 fail: dict[str, str] | None = None, builtin: tuple[str, ...] = (),
                 state: str = "", release: str = "4.9.76+"):
        self.files = dict(OURS if files is None else files)
        self.fail = fail or {}
        self.builtin = builtin
        self.state = state
        self.release = release
        self.modules: dict[str, Module] = {"irqbypass": Module("-", {})}
        self.sources: dict[str, str] = {}
        self.commands: list[tuple[str, bool]] = []
        self.load("kvm", SYSTEM["kvm"], "system")
        self.load("kvm_intel", SYSTEM["kvm_intel"], "system")

    def load(self, name: str, file: ModuleFileOnHost, source: str,
             args: dict[str, str] | None = None) -> None:
        params = dict(file.params)
        params.update((key, value) for key, value in (args or {}).items() if key in params)
        self.modules[name] = Module(file.srcversion, params)
        self.sources[name] = source
        if file.depends == "kvm":
            self.modules["kvm"].refcnt += 1
            self.modules["kvm"].holders.append(name)

    def mutations(self) -> list[str]:
        return [command for command, _ in self.commands
                if command.split()[0] in ("rmmod", "insmod", "modprobe", "sh", "mkdir")]

    def run(self, command, timeout_s: float = 60, check: bool = False,
            as_root: bool = False) -> RemoteResult:
        text = command if isinstance(command, str) else shlex.join(command)
        self.commands.append((text, as_root))
        status, stdout, stderr = self.execute(text, as_root)
        result = RemoteResult(self.name, text, status, stdout, stderr)
        if check:
            result.check()
        return result

    def execute(self, text: str, as_root: bool) -> tuple[int, str, str]:
        for prefix, message in self.fail.items():
            if text.startswith(prefix):
                return 1, "", message
        if text == "uname -r":
            return 0, self.release + "\n", ""
        if text == "cat /proc/sys/kernel/random/boot_id":
            return 0, BOOT_ID + "\n", ""
        if text.startswith("for m in "):
            return 0, self.render(text.splitlines()[0][len("for m in "):-len("; do")].split()), ""
        if text == f"cat {STATE} 2>/dev/null":
            return (0, self.state, "") if self.state else (1, "", "")
        if match := re.fullmatch(r"mkdir -p \S+ && printf %s (.+) > (\S+)", text, re.S):
            assert as_root
            self.state = shlex.split(match.group(1))[0]
            return 0, "", ""
        argv = shlex.split(text)
        if argv[0] in ("rmmod", "insmod", "modprobe", "sh"):
            assert as_root, f"`{text}` must run as root"
        if argv[0] == "modinfo":
            file = self.files.get(argv[1])
            if file is None:
                return 1, "", f"modinfo: ERROR: Module {argv[1]} not found."
            return 0, (f"filename:       {argv[1]}\nsrcversion:     {file.srcversion}\n"
                       f"depends:        {file.depends}\nvermagic:       {file.vermagic}\n"), ""
        if argv[:2] == ["test", "-f"]:
            return (0 if argv[2] in self.files else 1), "", ""
        if argv[0] == "rmmod":
            module = self.modules.get(argv[1])
            if module is None:
                return 1, "", f"rmmod: ERROR: Module {argv[1]} is not currently loaded"
            if module.refcnt:
                return 1, "", f"rmmod: ERROR: Module {argv[1]} is in use by: {module.holders}"
            del self.modules[argv[1]]
            if argv[1] in self.modules.get("kvm", Module("", {})).holders:
                self.modules["kvm"].holders.remove(argv[1])
                self.modules["kvm"].refcnt -= 1
            return 0, "", ""
        if argv[0] == "insmod":
            file = self.files[argv[1]]
            if file.name in self.modules:
                return 1, "", "insmod: ERROR: could not insert module: File exists"
            if file.depends == "kvm" and "kvm" not in self.modules:
                return 1, "", "insmod: ERROR: could not insert module: Unknown symbol in module"
            self.load(file.name, file, argv[1], dict(arg.split("=", 1) for arg in argv[2:]))
            return 0, "", ""
        if argv[:2] == ["modprobe", "-a"]:
            for name in argv[2:]:
                self.modules.setdefault(name, Module("-", {}))
            return 0, "", ""
        if argv[:2] == ["modprobe", "-r"]:
            self.modules.pop(argv[2], None)
            return 0, "", ""
        if argv[0] == "modprobe":
            if argv[1] == "kvm_intel" and "kvm" not in self.modules:
                self.load("kvm", SYSTEM["kvm"], "system")
            if argv[1] not in self.modules:
                self.load(argv[1], SYSTEM[argv[1]], "system")
            return 0, "", ""
        if match := re.fullmatch(r"printf %s (\S+) > /sys/module/(\w+)/parameters/(\w+)",
                                 argv[2] if argv[0] == "sh" else ""):
            self.modules[match.group(2)].params[match.group(3)] = shlex.split(match.group(1))[0]
            return 0, "", ""
        raise AssertionError(f"the fake host does not know `{text}`")

    def render(self, names: list[str]) -> str:
        lines = []
        for name in names:
            if name in self.builtin:
                lines.append(f"builtin {name}")
                continue
            module = self.modules.get(name)
            if module is None:
                continue
            lines.append(f"module {name} {module.refcnt} {module.srcversion}")
            lines += [f"holder {name} {holder}" for holder in module.holders]
            lines += [f"param {name} {key}={value}" for key, value in module.params.items()]
        return "\n".join(lines) + "\n"

    def loaded(self) -> dict[str, tuple[str, dict[str, str]]]:
        return {name: (self.sources.get(name, "?"), module.params)
                for name, module in self.modules.items() if name in ("kvm", "kvm_intel")}


def install(host: ModuleTableHost, **params: str):
    return install_kvm_modules(host, "/w/kvm.ko", "/w/kvm-intel.ko", "/var/lib/gvm",
                               kvm_params=params or None)


def test_swap_sequence_on_a_host_with_the_stock_modules() -> None:
    host = ModuleTableHost()
    result = install(host, atomic_inc_mode="send_all")
    assert host.mutations() == [
        "rmmod kvm_intel", "rmmod kvm", "insmod /w/kvm.ko atomic_inc_mode=send_all",
        "insmod /w/kvm-intel.ko",
        f"mkdir -p /var/lib/gvm && printf %s 'boot_id {BOOT_ID}\nkvm /w/kvm.ko\n"
        f"kvm_intel /w/kvm-intel.ko\n' > {STATE}"]
    assert host.loaded()["kvm"][0] == "/w/kvm.ko"
    assert host.loaded()["kvm_intel"][0] == "/w/kvm-intel.ko"
    assert result.previous_sources == {"kvm": None, "kvm_intel": None}
    assert [m.srcversion for m in result.previous.loaded if m.name != "irqbypass"] == [
        "SYSKVM", "SYSINTEL"]
    assert result.loaded_dependencies == ()


def test_missing_dependencies_are_loaded_first_and_unloaded_on_rollback() -> None:
    files = {path: ModuleFileOnHost(f.name, f.srcversion, f.params, depends=f.depends)
             for path, f in OURS.items()}
    files["/w/kvm.ko"] = ModuleFileOnHost("kvm", "OURKVM", OURS["/w/kvm.ko"].params,
                                          depends="irqbypass,ib_core,rdma_cm")
    host = ModuleTableHost(files=files, fail={"insmod /w/kvm-intel.ko": "Unknown symbol in module"})
    with pytest.raises(DeployError, match="previous modules were loaded again"):
        install(host)
    mutations = host.mutations()
    assert mutations[0] == "modprobe -a ib_core rdma_cm"
    assert mutations[-2:] == ["modprobe -r rdma_cm", "modprobe -r ib_core"]
    assert "ib_core" not in host.modules and "irqbypass" in host.modules


def test_failed_insmod_puts_the_stock_modules_back() -> None:
    host = ModuleTableHost(fail={"insmod /w/kvm-intel.ko": "insmod: ERROR: Unknown symbol in module"})
    before = host.loaded()
    with pytest.raises(DeployError, match=r"insmod /w/kvm-intel.ko.*Unknown symbol.*previous "
                                          r"modules were loaded again"):
        install(host)
    assert host.mutations() == [
        "rmmod kvm_intel", "rmmod kvm", "insmod /w/kvm.ko", "insmod /w/kvm-intel.ko",
        "rmmod kvm", "modprobe kvm", "modprobe kvm_intel"]
    assert host.loaded() == before
    assert host.state == ""


def test_unpatched_kvm_is_refused_after_loading_and_rolled_back() -> None:
    files = dict(OURS)
    files["/w/kvm.ko"] = ModuleFileOnHost("kvm", "PLAINKVM", (("halt_poll_ns", "200000"),))
    host = ModuleTableHost(files=files)
    before = host.loaded()
    with pytest.raises(DeployError, match="no atomic_inc_mode parameter.*loaded again"):
        install(host)
    assert host.loaded() == before


def test_a_parameter_that_does_not_stick_is_a_failure() -> None:
    host = ModuleTableHost()
    with pytest.raises(DeployError, match="kvm parameter x reads 'None', not '1'"):
        install(host, atomic_inc_mode="local_first", x="1")  # insmod ignores unknown parameters


def test_failed_rollback_says_the_host_is_not_as_before() -> None:
    host = ModuleTableHost(fail={"insmod /w/kvm-intel.ko": "Unknown symbol",
                          "modprobe kvm_intel": "modprobe: FATAL: Module not found"})
    with pytest.raises(DeployError, match=r"putting the previous ones back failed too: "
                                          r"`modprobe kvm_intel`: modprobe: FATAL.*kvm_intel was "
                                          r"loaded before and is not loaded now.*NOT as before"):
        install(host)


def test_modules_of_an_earlier_install_come_back_from_their_files_with_their_params() -> None:
    old = {"/old/kvm.ko": ModuleFileOnHost("kvm", "OLDKVM", (("atomic_inc_mode", "send_all"),)),
           "/old/kvm-intel.ko": ModuleFileOnHost("kvm_intel", "OLDINTEL", (), depends="kvm")}
    host = ModuleTableHost(files={**OURS, **old}, fail={"insmod /w/kvm-intel.ko": "Unknown symbol"},
                    state=f"boot_id {BOOT_ID}\nkvm /old/kvm.ko\nkvm_intel /old/kvm-intel.ko\n")
    host.modules.clear()
    host.modules["irqbypass"] = Module("-", {})
    host.load("kvm", old["/old/kvm.ko"], "/old/kvm.ko", {"atomic_inc_mode": "local_first"})
    host.load("kvm_intel", old["/old/kvm-intel.ko"], "/old/kvm-intel.ko")
    before = host.loaded()
    with pytest.raises(DeployError, match="loaded again"):
        install(host)
    assert host.mutations()[-3:] == [
        "insmod /old/kvm.ko", "insmod /old/kvm-intel.ko",
        "sh -c 'printf %s local_first > /sys/module/kvm/parameters/atomic_inc_mode'"]
    assert host.loaded() == before


def test_a_state_file_from_an_earlier_boot_is_ignored() -> None:
    host = ModuleTableHost(state="boot_id another-boot\nkvm /old/kvm.ko\nkvm_intel /old/kvm-intel.ko\n")
    assert install(host).previous_sources == {"kvm": None, "kvm_intel": None}


def test_nothing_loaded_before_means_nothing_to_unload_or_restore() -> None:
    host = ModuleTableHost(fail={"insmod /w/kvm-intel.ko": "Unknown symbol"})
    host.modules = {"irqbypass": Module("-", {})}
    with pytest.raises(DeployError, match="loaded again"):
        install(host)
    assert host.mutations() == ["insmod /w/kvm.ko", "insmod /w/kvm-intel.ko", "rmmod kvm"]
    assert host.loaded() == {}


def refused(host: ModuleTableHost, message: str) -> None:
    with pytest.raises(DeployError, match=message):
        install(host)
    assert host.mutations() == [], "a refused install must not touch the modules"


def test_refuses_kvm_built_in() -> None:
    refused(ModuleTableHost(builtin=("kvm",)), r"kvm is built into the running kernel.*CONFIG_KVM=m")


def test_refuses_while_vms_run() -> None:
    host = ModuleTableHost()
    host.modules["kvm_intel"].refcnt = 2
    refused(host, r"kvm_intel is in use \(2 users.*stop them first")


def test_refuses_other_users_of_kvm() -> None:
    host = ModuleTableHost()
    host.modules["kvm"].holders.append("kvm_amd")
    refused(host, r"kvm is also used by kvm_amd")


def test_refuses_modules_built_for_another_kernel() -> None:
    refused(ModuleTableHost(release="6.1.0-28-amd64"),
            r"runs kernel 6.1.0-28-amd64, but /w/kvm.ko was built for '4.9.76\+ SMP")


def test_refuses_a_missing_module_file() -> None:
    refused(ModuleTableHost(files={}), r"/w/kvm.ko is not a kernel module it can read: modinfo: ERROR")


def test_refuses_when_the_previous_module_file_is_gone() -> None:
    host = ModuleTableHost(state=f"boot_id {BOOT_ID}\nkvm /gone/kvm.ko\n")
    refused(host, r"the loaded kvm came from /gone/kvm.ko .* which is gone")
