"""Put artifacts and kvm modules on the cluster hosts so that a failure leaves nothing half done.

Uploads are verified and atomic: the sha256 is computed here and checked with `sha256sum` on the
host; an unchanged file is not sent again; a new one goes to a hidden temporary name next to the
target, is checked, and only then renamed over it (rename(2) within one directory), so an upload
that dies half way leaves the old file in place. `upload_artifacts` stores files under their
digest, like labgrid's ManagedFile, so different builds never overwrite each other.

Installing the host's kvm modules (the Linux-DSM kvm.ko and kvm-intel.ko with the ATOMIC_INC
series) swaps the modules of the running kernel: it records what is loaded, refuses when that
cannot be put back (kvm built in, VMs running, other users of kvm, a module from an unknown file),
unloads, loads ours, and checks that the patched kvm is the one running. On any failure it unloads
ours and loads the previous modules again.
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import paramiko

from harness.errors import HarnessError
from harness.transport.remote_host import (
    COMMAND_TIMEOUT_S, ParallelResult, RemoteHost, RemoteHostError, RemoteResult, on_hosts)

PART_SUFFIX = ".gvm-part"
ARTIFACT_DIR = "artifacts"  # under each host's work_dir
KVM_MODULES = ("kvm", "kvm_intel")  # load order; unloaded in reverse
ATOMIC_INC_PARAM = "atomic_inc_mode"  # only the patched kvm.ko has it (host_patches/README.md)
STATE_FILE = "kvm-modules.state"
SLOWEST_HASH_BYTES_PER_S = 256 << 10
QEMU_BUILD_BINARY = "x86_64-softmmu/qemu-system-x86_64"  # in a QEMU 2.8 build tree
# What a -kernel boot with an e1000 loads from pc-bios/ (-nodefaults: no VGA BIOS)
QEMU_BUILD_FIRMWARE = ("bios-256k.bin", "kvmvapic.bin", "linuxboot.bin", "linuxboot_dma.bin",
                       "efi-e1000.rom")


class DeployError(HarnessError):
    """An upload or a module install failed; the message says what state the host is in."""


@dataclass(frozen=True)
class UploadResult:
    host: str
    local: Path
    remote_path: str
    sha256: str
    size: int
    uploaded: bool  # False: the host already had this exact file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_path(store_dir: str, sha256: str, name: str) -> str:
    """Content-addressed: a path names exactly one content, so it is never rewritten."""
    return f"{store_dir}/{sha256}/{name}"


def hash_timeout_s(size: int) -> float:
    """How long `sha256sum` may take for `size` bytes: a Bochs-emulated host hashes at well
    under 1 MB/s, a real one at hundreds."""
    return COMMAND_TIMEOUT_S + size / SLOWEST_HASH_BYTES_PER_S


def remote_sha256(host: CommandHost, path: str, size: int = 0) -> str | None:
    """The file's sha256 on the host, or None if there is no file there; `size` is what the
    file is expected to hold, for the time the hash may take."""
    quoted = shlex.quote(path)
    output = host.run(f"if [ -e {quoted} ]; then sha256sum {quoted}; fi", check=True,
                      timeout_s=hash_timeout_s(size)).stdout
    return output.split()[0] if output.strip() else None


def upload_file(host: RemoteHost, local: Path, remote_path: str, sha256: str | None = None,
                progress: Callable[[int, int], None] | None = None,
                stall_timeout_s: float = 60.0) -> UploadResult:
    """Make `remote_path` hold exactly `local`, sending it only if it differs."""
    if not posixpath.isabs(remote_path):
        raise DeployError(f"upload target '{remote_path}' must be an absolute path")
    if not local.is_file():
        raise DeployError(f"{local} does not exist; build it first")
    sha256 = sha256 or sha256_file(local)
    size = local.stat().st_size
    where = f"host '{host.name}'"
    try:
        if remote_sha256(host, remote_path, size) == sha256:
            return UploadResult(host.name, local, remote_path, sha256, size, uploaded=False)
        directory, name = posixpath.split(remote_path)
        stale_parts = shlex.quote(f"{directory}/.{name}.") + "*" + PART_SUFFIX
        host.run(f"mkdir -p {shlex.quote(directory)} && rm -f {stale_parts}", check=True)
    except RemoteHostError as error:
        raise DeployError(f"cannot upload {local.name} to {where}: {error}") from None
    temporary = f"{directory}/.{name}.{secrets.token_hex(4)}{PART_SUFFIX}"
    try:
        with host.sftp(stall_timeout_s) as sftp:
            sftp.put(str(local), temporary, callback=progress, confirm=True)
            received = remote_sha256(host, temporary, size)
            if received != sha256:
                raise DeployError(f"{local.name} arrived on {where} with sha256 {received}, not "
                                  f"{sha256}; the transfer corrupted it: check the host's disk "
                                  "and memory, then try again")
            sftp.posix_rename(temporary, remote_path)
    except (RemoteHostError, DeployError, paramiko.SSHException, OSError, EOFError) as error:
        _remove_quietly(host, temporary)
        # EOFError: the SFTP channel closed under us, often before the transport notices
        lost = isinstance(error, EOFError) or not host.connected
        reason = f"the SSH connection was lost ({type(error).__name__})" if lost \
            else str(error) or type(error).__name__
        message = error if isinstance(error, DeployError) else \
            f"uploading {local} to {where}:{remote_path} failed: {reason}"
        raise DeployError(f"{message}; {remote_path} on {where} is as it was before") from None
    return UploadResult(host.name, local, remote_path, sha256, size, uploaded=True)


def _remove_quietly(host: RemoteHost, path: str) -> None:
    """Best effort: with the connection gone, the next upload of that file removes the part."""
    try:
        host.run(f"rm -f {shlex.quote(path)}", timeout_s=10)
    except RemoteHostError:
        pass


def upload_qemu_build(host: RemoteHost, tree: Path) -> str:
    """Put a QEMU build's binary and the firmware it loads on `host`; return the binary's path.

    For a GiantVM QEMU built on one machine and run on hosts that have no build of their own. The
    tree's layout is kept, because a QEMU 2.8 binary finds its firmware in ../pc-bios; the
    directory is named after the binary's digest, so builds never overwrite each other.
    """
    binary = tree / QEMU_BUILD_BINARY
    files = [binary] + [tree / "pc-bios" / name for name in QEMU_BUILD_FIRMWARE]
    missing = [str(path.relative_to(tree)) for path in files if not path.is_file()]
    if missing:
        raise DeployError(f"{tree} is not a built QEMU tree: {', '.join(missing)} missing "
                          "(configure --target-list=x86_64-softmmu, then make)")
    digest = sha256_file(binary)
    root = f"{host.spec.work_dir}/{ARTIFACT_DIR}/qemu-{digest}"
    for path in files:
        upload_file(host, path, f"{root}/{path.relative_to(tree)}",
                    digest if path == binary else None)
    remote_binary = f"{root}/{QEMU_BUILD_BINARY}"
    try:
        host.run(f"chmod 755 {shlex.quote(remote_binary)}", check=True)
    except RemoteHostError as error:
        raise DeployError(f"cannot make {remote_binary} executable on host '{host.name}': "
                          f"{error}") from None
    return remote_binary


def upload_artifacts(hosts: Sequence[RemoteHost],
                     files: Sequence[Path]) -> ParallelResult[tuple[UploadResult, ...]]:
    """The same files to every host at once, each as `<work_dir>/artifacts/<sha256>/<name>`."""
    digests = {path: sha256_file(path) for path in files}

    def upload_all(host: RemoteHost) -> tuple[UploadResult, ...]:
        store = f"{host.spec.work_dir}/{ARTIFACT_DIR}"
        return tuple(upload_file(host, path, artifact_path(store, digest, path.name), digest)
                     for path, digest in digests.items())

    return on_hosts(hosts, f"upload {', '.join(path.name for path in files)}", upload_all)


class CommandHost(Protocol):
    """What the module install needs from a host; RemoteHost, or a fake in the unit tests."""

    @property
    def name(self) -> str: ...

    def run(self, command: str | Sequence[str], timeout_s: float = ..., check: bool = ...,
            as_root: bool = ...) -> RemoteResult: ...


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
