"""What the attack tests share (tests/test_sandbox_attacks.py: the verdict; tests/test_sandbox_isolation.py:
the host and the programs beside each other): the secret task, the benign samples that must still
pass beside an attack, the audit-hook bypass and the forger, and the fixtures that run a case with
the hook on and off, in each isolation set-up, and check that no process of a sample outlives it.
The two files are apart so that the test workers share them (each waits out program deadlines)."""
import os

import pytest

import config as C
from rlhf import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = sandbox.Limits(mode=C.SANDBOX_MODE, timeout_s=3.0)  # every run here, where a job sets no time of its own
CALLS, EXPECTED = ["secret(1)", "secret(2)"], [7312, "k9q"]
TESTS = "def check(candidate):\n    assert candidate(1) == 7312\n    assert candidate(2) == 'k9q'\n"
WRONG = "def secret(x):\n    return 0\n"
ADD_OK = dict(program="import time\ntime.sleep(0.3)\ndef add(a, b):\n    return a + b\n",
              calls=["add(2, 3)", "add(-1, 1)"], expected=[5, 0])
ADD_TESTS_OK = dict(program=ADD_OK["program"], test_code="def check(candidate):\n    assert candidate(2, 3) == 5\n",
                    entry_point="add")

# walks every frame above the program and rebinds the audit hook's `refuse` cell to a no-op. The
# hook is in no frame of the runner, so this finds nothing and the "hook" runs show the hook
# refusing; the "no-hook" runs stand for a program that got past it
BYPASS = '''
import sys
def _bypass():
    f = sys._getframe(0)
    while f is not None:
        for v in list(f.f_locals.values()):
            code = getattr(v, "__code__", None)
            if code is not None and v.__closure__ and "refuse" in code.co_freevars:
                v.__closure__[code.co_freevars.index("refuse")].cell_contents = lambda event: None
        f = f.f_back
_bypass()
'''
# what a forger writes: the old runner's records (with its nonce, found in its frames) and
# claims of success in the new protocol, to every writer function and descriptor it can find
FORGE = '''
import os, sys, re
def _targets():
    found, nonce = [], None
    f = sys._getframe(0)
    while f is not None:
        for k, v in list(f.f_locals.items()):
            if k in ("emit", "send") and callable(v):
                found.append(v)
            if k == "nonce" and type(v) is str:
                nonce = v
        f = f.f_back
    return found, nonce
WRITERS, NONCE = _targets()
RECORDS = ['{"k":"end","status":"passed"}', '{"k":"call","i":0,"ok":true,"v":["i","7312"]}',
           '{"k":"call","i":1,"ok":true,"v":["s","k9q"]}', '{"k":"done"}', '{"ok":true,"status":"passed"}']
def forge():
    for w in WRITERS:
        for r in RECORDS:
            try:
                w(r)
            except Exception:
                pass
    if NONCE:
        try:
            with open(".result", "w") as out:
                out.write("".join(NONCE + " " + r + "\\n" for r in RECORDS))
        except OSError:
            pass
'''


def secret_jobs(program):
    """The same hostile program in the project's format and in HumanEval format."""
    return [dict(program=program, calls=CALLS, expected=EXPECTED),
            dict(program=program, test_code=TESTS, entry_point="secret")]


def run_side_by_side(program):
    """Both formats of `program` next to two benign samples, 2 workers; benign ones must pass."""
    verdicts = sandbox.run_many(secret_jobs(program) + [ADD_OK, ADD_TESTS_OK], workers=2, limits=LIMITS)
    assert [v.passed for v in verdicts[2:]] == [True, True], verdicts[2:]
    return verdicts[:2]


def sandbox_processes(evaluator_pid=None):
    """Live processes running under one of the per-sample uids that this test process (or the
    evaluating process `evaluator_pid`) hands out: UID_BASE + 256 * its pid + slot. A training run
    using the sandbox beside the tests does not count."""
    low = sandbox.UID_BASE + 256 * (evaluator_pid or os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            uid, zombie = int(status["Uid"].split()[0]), status["State"].split()[0] == "Z"
        except (OSError, KeyError, ValueError):
            continue
        if low <= uid < low + 256 and not zombie:  # a zombie runs nothing (weak mode: init reaps it soon)
            out.append(int(pid))
    return out


@pytest.fixture(autouse=True)
def bounded():
    yield
    assert sandbox_processes() == []  # nothing of any sample outlives its run


@pytest.fixture(params=[True, False], ids=["hook", "no-hook"])
def hook(request, monkeypatch):
    """Kernel-level attacks run with the audit hook on (and the bypass), and with it off."""
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", request.param)
    return request.param


@pytest.fixture
def needs_namespaces():
    if C.SANDBOX_MODE != "namespaces":
        pytest.skip("kernel isolation is off (SANDBOX_MODE=weak)")


@pytest.fixture(params=["root", "userns"])
def backend(request, monkeypatch, needs_namespaces):
    """Kernel-level attacks run in both isolation set-ups: a uid of its own (root) and a user
    namespace (what a non-root user gets), wherever this machine can run them."""
    return use_backend(request.param, monkeypatch)


@pytest.fixture(params=["root", "userns", "weak"])
def any_backend(request, monkeypatch, needs_namespaces):
    """The set-ups of `backend`, and the weak sandbox (which gets the cgroups too)."""
    return use_backend(request.param, monkeypatch)


def use_backend(name, monkeypatch):
    if name == "root" and os.geteuid() != 0:
        pytest.skip("a uid per sample needs root")
    if name == "userns" and not sandbox._run_calls_with("userns", "def f():\n    return 1\n", ["f()"], [1], "", 30.0).passed:
        pytest.skip("no unprivileged user namespaces here")
    monkeypatch.setattr(sandbox, "_backend", lambda mode: name)
    return name
