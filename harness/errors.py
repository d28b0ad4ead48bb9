"""Exceptions with messages a user can act on, sorted by whose fault they are.

KernelUnderTestError: the kernel being tested failed (a panic, an Oops, a BUG, no ready marker
after it started). That is a result, not a breakdown: the suite turns it into a FAIL row and the
CLI exits 1, as for any failed check.

Every other HarnessError is the harness's or its infrastructure's (QEMU missing, a host
unreachable, a bad config, a build that failed): the CLI prints its message and exits 2, without a
traceback. Anything else is a bug in the harness and keeps its traceback.
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


GUEST_KERNEL = "guest kernel"  # KernelUnderTestError's culprit unless a host's kernel failed


class KernelUnderTestError(BootError):
    """The kernel under test failed; the message quotes its console and names the log.
    `culprit` names which kernel: the guest's, or a host's (its kvm is under test too)."""

    def __init__(self, message: str, culprit: str = GUEST_KERNEL):
        super().__init__(message)
        self.culprit = culprit


class ConsoleError(HarnessError):
    """The serial console did not answer as expected."""


class GuestSSHError(HarnessError):
    """SSH to the guest failed."""


class ProbeError(HarnessError):
    """A probe returned output the harness cannot parse."""


class SetupError(HarnessError):
    """A tool the harness needs is missing from this machine."""
