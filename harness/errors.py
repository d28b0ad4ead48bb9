"""Exceptions with messages a user can act on.

Every failure the harness expects is a HarnessError; the CLI prints its message and exits non-zero
without a traceback. Anything else is a bug in the harness and keeps its traceback.
"""


class HarnessError(Exception):
    """A failure with a message that says what went wrong and what to do."""


class ConfigError(HarnessError):
    """The YAML cluster description is invalid."""


class PatchError(HarnessError):
    """A patch series does not apply, or the tree is in a state the harness cannot reason about."""


class CommandError(HarnessError):
    """A command the harness ran exited non-zero."""


class BuildError(HarnessError):
    """A kernel or rootfs build failed or produced something other than what was asked for."""


class BootError(HarnessError):
    """The guest did not come up: QEMU exited, the kernel panicked, or a boot step timed out."""


class ConsoleError(HarnessError):
    """The serial console did not answer as expected."""


class GuestSSHError(HarnessError):
    """SSH to the guest failed."""


class ProbeError(HarnessError):
    """A probe returned output the harness cannot parse."""


class SetupError(HarnessError):
    """A tool the harness needs is missing from this machine."""
