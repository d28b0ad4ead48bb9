"""The one place that names every backend. A new backend is a package under backends/ plus one
line in BACKENDS; the suite asks `backend_for(config)` when it starts a guest and
`backend_named(kind)` when it finds one again from session.json."""

from __future__ import annotations

from harness.backends.base import Backend
from harness.backends.bochs.backend import BochsBackend
from harness.backends.emulated.backend import EmulatedBackend
from harness.backends.giantvm.backend import GiantVMBackend
from harness.backends.local_qemu import LocalQemuBackend
from harness.backends.remote_qemu import RemoteQemuBackend
from harness.config import ClusterConfig
from harness.errors import HarnessError

# Asked in this order; the first that wants a config runs it.
BACKENDS: tuple[Backend, ...] = (EmulatedBackend(), GiantVMBackend(), RemoteQemuBackend(),
                                 LocalQemuBackend(), BochsBackend())


def backend_for(config: ClusterConfig) -> Backend:
    for backend in BACKENDS:
        if backend.wants(config):
            return backend
    raise HarnessError(f"{config.path}: no backend runs this config (vm.launcher "
                       f"'{config.vm.launcher}' on host '{config.hosts[0].name}')")


def backend_named(kind: str) -> Backend:
    for backend in BACKENDS:
        if backend.kind == kind:
            return backend
    raise HarnessError(f"no backend is called '{kind}' (known: "
                       f"{', '.join(backend.kind for backend in BACKENDS)}); the run was made by "
                       "another version of the harness")
