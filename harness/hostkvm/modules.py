"""Swap the patched kvm modules into a host's running kernel so that a failure leaves nothing half
done.

Installing the host's kvm modules (the Linux-DSM kvm.ko and kvm-intel.ko with the ATOMIC_INC
series) swaps the modules of the running kernel: it records what is loaded, refuses when that
cannot be put back (kvm built in, VMs running, other users of kvm, a module from an unknown file),
unloads, loads ours, and checks that the patched kvm is the one running. On any failure it unloads
ours and loads the previous modules again.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Mapping, Sequence


from harness.errors import HarnessError
from harness.transport.artifacts import CommandHost
from harness.transport.remote_host import RemoteHostError

KVM_MODULES = ("kvm", "kvm_intel")  # load order; unloaded in reverse
ATOMIC_INC_PARAM = "atomic_inc_mode"  # only the patched kvm.ko has it (host_patches/README.md)
STATE_FILE = "kvm-modules.state"


class DeployError(HarnessError):
    """A module install (or the uploads before it) failed; the message says what state the host
    is in."""


@dataclass(frozen=True)
class LoadedModule:
    name: str
    refcnt: int
    srcversion: str  # "-" when the kernel does not record one (no CONFIG_MODULE_SRCVERSION_ALL)
    holders: tuple[str, ...]
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ModuleSnapshot:
    """Which of the asked-for modules are loaded, built in, or absent."""

    loaded: tuple[LoadedModule, ...]
    builtin: tuple[str, ...]

    def get(self, name: str) -> LoadedModule | None:
        return next((module for module in self.loaded if module.name == name), None)

    def present(self, name: str) -> bool:
        return name in self.builtin or self.get(name) is not None


@dataclass(frozen=True)
class ModuleFile:
    name: str
    path: str
    vermagic: str
    srcversion: str
    depends: tuple[str, ...]


@dataclass(frozen=True)
class ModuleInstall:
    host: str
    previous: ModuleSnapshot
    previous_sources: Mapping[str, str | None]  # module -> file it was loaded from, None: modprobe
    installed: tuple[ModuleFile, ...]
    loaded_dependencies: tuple[str, ...]


def snapshot_command(names: Sequence[str]) -> str:
    return "\n".join([
        f"for m in {' '.join(names)}; do",
        "  d=/sys/module/$m",
        '  [ -d "$d" ] || continue',
        '  if [ ! -e "$d/initstate" ]; then echo "builtin $m"; continue; fi',
        '  echo "module $m $(cat "$d/refcnt") $(cat "$d/srcversion" 2>/dev/null || echo -)"',
        '  for h in "$d"/holders/*; do [ -e "$h" ] && echo "holder $m ${h##*/}"; done',
        '  for p in "$d"/parameters/*; do',
        '    [ -r "$p" ] && echo "param $m ${p##*/}=$(cat "$p" 2>/dev/null)"',
        "  done",
        "done",
        "true",
    ])


def parse_snapshot(output: str) -> ModuleSnapshot:
    modules: dict[str, dict] = {}
    builtin = []
    for line in output.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "builtin":
            builtin.append(rest.strip())
        elif kind == "module":
            name, refcnt, srcversion = rest.split()
            modules[name] = {"refcnt": int(refcnt), "srcversion": srcversion, "holders": [],
                             "params": []}
        elif kind in ("holder", "param") and rest.split(" ", 1)[0] in modules:
            name, value = rest.split(" ", 1)
            if kind == "holder":
                modules[name]["holders"].append(value)
            else:
                modules[name]["params"].append(tuple(value.split("=", 1)))
    return ModuleSnapshot(
        loaded=tuple(LoadedModule(name, data["refcnt"], data["srcversion"],
                                  tuple(data["holders"]), tuple(data["params"]))
                     for name, data in modules.items()),
        builtin=tuple(builtin))


def snapshot(host: CommandHost, names: Sequence[str]) -> ModuleSnapshot:
    return parse_snapshot(host.run(snapshot_command(names), check=True).stdout)


def module_file(host: CommandHost, name: str, path: str) -> ModuleFile:
    result = host.run(["modinfo", path])
    if result.exit_status != 0:
        raise DeployError(f"host '{host.name}': {path} is not a kernel module it can read: "
                          f"{result.stderr.strip() or result.stdout.strip()}; upload it first")
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return ModuleFile(name=name, path=path, vermagic=fields.get("vermagic", ""),
                      srcversion=fields.get("srcversion", "-"),
                      depends=tuple(dep for dep in fields.get("depends", "").split(",") if dep))


def install_kvm_modules(host: CommandHost, kvm_ko: str, kvm_intel_ko: str, state_dir: str,
                        kvm_params: Mapping[str, str] | None = None) -> ModuleInstall:
    """Replace the running kvm and kvm_intel with ours; on failure put the old ones back."""
    kvm_params = dict(kvm_params or {})
    files = (module_file(host, "kvm", kvm_ko), module_file(host, "kvm_intel", kvm_intel_ko))
    release = host.run("uname -r", check=True).stdout.strip()
    for file in files:
        if file.vermagic.split(" ")[0] != release:
            raise DeployError(f"host '{host.name}' runs kernel {release}, but {file.path} was "
                              f"built for '{file.vermagic}'; build the modules against the "
                              "running kernel's tree and config, or boot the kernel they are for")
    dependencies = tuple(sorted({dep for file in files for dep in file.depends}
                                - set(KVM_MODULES)))
    before = snapshot(host, KVM_MODULES + dependencies)
    _refuse_unsafe(host.name, before)
    sources = _previous_sources(host, before, state_dir)
    missing = tuple(dep for dep in dependencies if not before.present(dep))
    try:
        if missing:
            host.run(["modprobe", "-a", *missing], check=True, as_root=True)
        for name in reversed(KVM_MODULES):
            if before.get(name):
                host.run(["rmmod", name], check=True, as_root=True)
        host.run(["insmod", kvm_ko, *(f"{key}={value}" for key, value in kvm_params.items())],
                 check=True, as_root=True)
        host.run(["insmod", kvm_intel_ko], check=True, as_root=True)
        _verify_installed(host.name, snapshot(host, KVM_MODULES), files, kvm_params)
    except (RemoteHostError, DeployError) as failure:
        problems = _roll_back(host, before, sources, missing)
        if problems:
            raise DeployError(
                f"installing kvm modules on host '{host.name}' failed ({failure}), and putting "
                f"the previous ones back failed too: {'; '.join(problems)}. The host's kvm is "
                "NOT as before: as root there, run `rmmod kvm_intel kvm; modprobe kvm_intel` "
                "(or reboot it)") from None
        raise DeployError(f"installing kvm modules on host '{host.name}' failed: {failure}; "
                          "the previous modules were loaded again") from None
    _write_state(host, state_dir, files)
    return ModuleInstall(host=host.name, previous=before, previous_sources=sources,
                         installed=files, loaded_dependencies=missing)


def _refuse_unsafe(host: str, before: ModuleSnapshot) -> None:
    for name in KVM_MODULES:
        if name in before.builtin:
            raise DeployError(f"host '{host}': {name} is built into the running kernel, so it "
                              "cannot be swapped; build that kernel with CONFIG_KVM=m and "
                              "CONFIG_KVM_INTEL=m, or install the whole Linux-DSM kernel")
    kvm_intel = before.get("kvm_intel")
    if kvm_intel is not None and kvm_intel.refcnt > 0:
        raise DeployError(f"host '{host}': kvm_intel is in use ({kvm_intel.refcnt} users, i.e. "
                          "virtual machines are running); stop them first")
    kvm = before.get("kvm")
    if kvm is not None:
        others = sorted(set(kvm.holders) - set(KVM_MODULES))
        if others:
            raise DeployError(f"host '{host}': kvm is also used by {', '.join(others)}; unload "
                              "those modules first (e.g. `modprobe -r kvm_amd`)")


def _previous_sources(host: CommandHost, before: ModuleSnapshot,
                      state_dir: str) -> dict[str, str | None]:
    """Where each loaded module came from: a file an earlier install loaded, else the system's."""
    state = _read_state(host, state_dir)
    sources: dict[str, str | None] = {}
    for name in KVM_MODULES:
        if before.get(name) is None:
            continue
        path = state.get(name)
        sources[name] = path
        if path is not None and host.run(["test", "-f", path]).exit_status != 0:
            raise DeployError(f"host '{host.name}': the loaded {name} came from {path} (an "
                              "earlier install), which is gone, so it could not be put back "
                              f"after a failure; load the system's first: `rmmod kvm_intel kvm; "
                              "modprobe kvm_intel`")
    return sources


def _read_state(host: CommandHost, state_dir: str) -> dict[str, str]:
    """The modules an earlier install loaded, if it was in this boot of the host."""
    output = host.run(f"cat {shlex.quote(f'{state_dir}/{STATE_FILE}')} 2>/dev/null").stdout
    boot_id = host.run("cat /proc/sys/kernel/random/boot_id", check=True).stdout.strip()
    entries = dict(line.split(" ", 1) for line in output.splitlines() if " " in line)
    if entries.pop("boot_id", None) != boot_id:
        return {}
    return entries


def _write_state(host: CommandHost, state_dir: str, files: Sequence[ModuleFile]) -> None:
    boot_id = host.run("cat /proc/sys/kernel/random/boot_id", check=True).stdout.strip()
    content = "".join([f"boot_id {boot_id}\n"] + [f"{file.name} {file.path}\n" for file in files])
    path = shlex.quote(f"{state_dir}/{STATE_FILE}")
    host.run(f"mkdir -p {shlex.quote(state_dir)} && printf %s {shlex.quote(content)} > {path}",
             check=True, as_root=True)


def _verify_installed(host: str, after: ModuleSnapshot, files: Sequence[ModuleFile],
                      kvm_params: Mapping[str, str]) -> None:
    for file in files:
        loaded = after.get(file.name)
        if loaded is None:
            raise DeployError(f"{file.name} is not loaded after insmod {file.path}")
        if "-" not in (loaded.srcversion, file.srcversion) and \
                loaded.srcversion != file.srcversion:
            raise DeployError(f"the running {file.name} has srcversion {loaded.srcversion}, "
                              f"not {file.srcversion} of {file.path}; something else loaded it")
    params = dict(after.get("kvm").params)  # type: ignore[union-attr]
    if ATOMIC_INC_PARAM not in params:
        raise DeployError(f"the running kvm has no {ATOMIC_INC_PARAM} parameter, so it is not "
                          "built with the ATOMIC_INC host series; rebuild it from the patched "
                          "tree")
    for key, value in kvm_params.items():
        if params.get(key) != value:
            raise DeployError(f"kvm parameter {key} reads '{params.get(key)}', not '{value}'")


def _roll_back(host: CommandHost, before: ModuleSnapshot, sources: Mapping[str, str | None],
               loaded_dependencies: Sequence[str]) -> list[str]:
    """Unload ours, reload the previous modules; every problem is returned, none is raised."""
    problems = []

    def attempt(command: list[str]) -> None:
        try:
            result = host.run(command, as_root=True)
        except RemoteHostError as error:
            problems.append(f"`{shlex.join(command)}`: {error}")
            return
        if result.exit_status != 0:
            problems.append(f"`{shlex.join(command)}`: {result.stderr.strip()}")

    try:
        now = snapshot(host, KVM_MODULES)
    except RemoteHostError as error:
        return [f"cannot see which modules are loaded: {error}"]
    for name in reversed(KVM_MODULES):
        if now.get(name):
            attempt(["rmmod", name])
    for name in KVM_MODULES:
        if before.get(name):
            path = sources.get(name)
            attempt(["insmod", path] if path else ["modprobe", name])
    for dependency in reversed(loaded_dependencies):
        attempt(["modprobe", "-r", dependency])
    try:
        restored = snapshot(host, KVM_MODULES)
        for name, key, value in _param_differences(before, restored):
            parameter = shlex.quote(f"/sys/module/{name}/parameters/{key}")
            attempt(["sh", "-c", f"printf %s {shlex.quote(value)} > {parameter}"])
        restored = snapshot(host, KVM_MODULES)
    except RemoteHostError as error:
        return problems + [f"cannot check the restored modules: {error}"]
    problems += [f"{name} parameter {key} was '{value}' and is "
                 f"'{dict(restored.get(name).params).get(key)}' now"  # type: ignore[union-attr]
                 for name, key, value in _param_differences(before, restored)]
    for name in KVM_MODULES:
        was, is_now = before.get(name), restored.get(name)
        if (was is None) != (is_now is None):
            problems.append(f"{name} was {'loaded' if was else 'not loaded'} before and is "
                            f"{'loaded' if is_now else 'not loaded'} now")
        elif was and is_now and "-" not in (was.srcversion, is_now.srcversion) \
                and was.srcversion != is_now.srcversion:
            problems.append(f"{name} had srcversion {was.srcversion} and now has "
                            f"{is_now.srcversion}")
    return problems


def _param_differences(before: ModuleSnapshot,
                       after: ModuleSnapshot) -> list[tuple[str, str, str]]:
    """(module, parameter, value before) for each parameter of a module loaded in both."""
    differences = []
    for was in before.loaded:
        is_now = after.get(was.name)
        if was.name in KVM_MODULES and is_now is not None:
            now = dict(is_now.params)
            differences += [(was.name, key, value) for key, value in was.params
                            if now.get(key, value) != value]
    return differences
