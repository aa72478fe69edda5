"""The limits every sandboxed run is held to, the statuses it can end with, its Verdict, and the
two ways it fails on the trusted side."""
from __future__ import annotations

import dataclasses

from rlhf.settings import UserError

MAX_OPEN_FILES = 64        # RLIMIT_NOFILE
READ_BACK_BYTES = 4 << 20  # largest message read back from a program (one value)
MAX_DEPTH = 100            # deepest nesting of a value exchanged with a program
MAX_VALUES = 1 << 18       # most values (each number, string, container) in one reply
MAX_DIGITS = 4300          # longest number in a reply (Python's own default limit for int())
SAME_HASH = 8              # most distinct numbers, tuples or frozensets with one hash in a reply
STDOUT_MAX_BYTES = (READ_BACK_BYTES >> 1) - 4096  # longest stdout of a stdin/stdout test (sent as hex)
UID_BASE = 1 << 24         # root: sample uid = UID_BASE + 256 * our pid + slot, unique on the host
GRACE_S = 1.0              # a run still going this long past its deadline is ended from another thread

STATUSES = ("passed", "failed", "error", "timeout", "memory", "refused")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What each program may use, and how it is isolated: the SANDBOX_* settings (config.py says each
    one's unit), which a stage reads once (rlhf.codeeval.sandbox_limits) and passes down. The
    defaults are config.py's (tests/test_sandbox.py checks that they agree)."""
    mode: str = "namespaces"  # SANDBOX_MODE: namespaces | weak
    timeout_s: float = 1.0    # SANDBOX_TIMEOUT_S: load + all tests; the CPU limit is 1 s more
    memory_mb: int = 512      # SANDBOX_MEMORY_MB
    disk_mb: int = 64         # SANDBOX_DISK_MB
    file_size_mb: int = 8     # SANDBOX_FILE_SIZE_MB
    max_procs: int = 64       # SANDBOX_MAX_PROCS


class SandboxUnavailable(UserError):
    """The configured isolation cannot be set up on this machine (one-line message with the fix)."""


@dataclasses.dataclass
class Verdict:
    passed: bool          # every test passed
    status: str           # one of STATUSES
    detail: str           # first failure, exception or reason; "" when passed
    seconds: float        # wall time of the run
    pass_fraction: float  # share of test calls that passed (asserts: 0 or 1)


class _ChildGone(BaseException):
    """The program broke the protocol, ran out of time or died. A BaseException so that the
    trusted test code's own `except Exception` cannot swallow it."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail
