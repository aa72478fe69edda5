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
