"""Hostile programs against rlhf/sandbox/, in both test formats, two workers side by side.

Every attack targets a "secret" task whose answers cannot be computed (secret(1) == 7312,
secret(2) == 'k9q'), so a pass can only be a forged verdict; the attacks on the host are
checked on the host. Against the previous in-process sandbox (commit 9edaf5b) these
succeeded: forged passes through f_back, a traceback's frame and a racing thread (with only
that sandbox's own record format); `len` shadowing; HumanEval/32's `poly`; the hook's closure
rebound, then a loopback TCP connect, a setsid grandchild that outlived the run, and the
sibling samples killed; mkfifo/mknod in /tmp and /dev/shm; 280 MiB of posix_fallocate; and
malformed records raised KeyError/RecursionError in the parent. The finaliser, signal-frame,
abstract-socket and /proc/<parent>/cmdline cases were not re-run against it; the nested
namespace attack succeeds in this sandbox with its seccomp filter off. Against 33dce2c these
succeeded (the tests after "wrong answers"): wrong answers through dict keys and set members of
another type; replies that held the evaluating process for minutes (hash collisions) or for good
(a splice holding the reply pipe); signals between programs through locks and inotify on shared
files; the host's name, boot id, kernel command line, cgroup path and root device; six 64 MiB
processes under a 256 MiB bound, 200 processes in a user namespace run as root.
Kernel-level attacks also run with the audit hook off (`_AUDIT_HOOK`), as if a program had
found a way around it (the namespaces must hold on their own), and in both set-ups: a uid per
sample (root) and a user namespace. Each case is bounded by the sandbox's own limits
(LIMITS below: 3 s, memory, processes, a 64 MiB disk), and after each one no process of a
sample uid may be left. This file: forged and wrong verdicts, an evaluating process held, malformed
results; tests/test_sandbox_isolation.py: escapes to the host and to the programs beside.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf import codeeval, sandbox
from sandbox_attack_kit import (  # noqa: F401  (bounded, hook, backend, needs_namespaces: fixtures)
    ADD_OK, CALLS, EXPECTED, FORGE, LIMITS, ROOT, TESTS, WRONG, BYPASS, backend, bounded, hook, needs_namespaces,
    run_side_by_side,
)


# --------------------------------------------------------------------------- forged verdicts
@pytest.mark.parametrize("attack", [
    # the runner's emit/send reached through f_back, then exit before any test runs
    FORGE + "forge()\nos._exit(0)\n",
    # the same from a traceback's frame and from a signal handler's frame
    FORGE + "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    WRITERS += _targets()[0]\n    forge()\n" + WRONG,
    FORGE + "import signal\nsignal.signal(signal.SIGALRM, lambda s, fr: forge())\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\n"
    "import time\ntime.sleep(0.1)\n" + WRONG,
    # a finaliser that rewrites the verdict after the runner wrote it (module dropped at the end)
    FORGE + "class Late:\n    def __del__(self):\n        forge()\nkeep = Late()\ndel sys.modules['__sandbox__']\n" + WRONG,
    # a thread racing the runner's writes
    FORGE + "import threading, time\ndef race():\n    for _ in range(2000):\n        forge()\n        time.sleep(0.0005)\n"
    "threading.Thread(target=race, daemon=True).start()\ndef secret(x):\n    time.sleep(0.2)\n    return 0\n",
    # garbage and deep nesting on the channel (a record the old parent could not parse)
    FORGE + "RECORDS[:] = ['[' * 200000, '{\"k\":\"end\"}', '{\"k\":\"load\"}', '{\"ok\":false}', '{\"ok\":true,\"v\":' + '[' * 100000 + ']}']\n"
    "forge()\n" + WRONG,
], ids=["frame-walk", "traceback-frame", "signal-frame", "finaliser", "racing-thread", "malformed-records"])
def test_forged_verdicts_fail(attack):
    for v in run_side_by_side(attack):
        assert not v.passed and v.status in sandbox.STATUSES, v


def test_stdin_programs_get_no_verdict_channel(hook, backend):
    # a stdin/stdout program looks for the expected output everywhere it can reach (the frames above
    # it, its input), and forges the runner's record for it through any writer and descriptor
    forged = '{"ok":true,"out":"%s","exit":0,"detail":""}' % "7312 k9q\n".encode().hex()
    attack = ("import os, sys\ndef strings(v, depth=0):\n    if type(v) is str:\n        yield v\n"
              "    elif depth < 4 and type(v) in (list, tuple, dict):\n"
              "        for x in (v.values() if type(v) is dict else v):\n            yield from strings(x, depth + 1)\n"
              "found, f = [], sys._getframe(0)\nwhile f is not None:\n    for k, v in list(f.f_locals.items()):\n"
              "        found += [s for s in strings(v) if str(7000 + 312) in s]\n"  # its own source does not hold it
              f"        if k == 'send' and callable(v):\n            try:\n                v({forged!r})\n"
              "            except Exception:\n                pass\n    f = f.f_back\n"
              f"for fd in range(3, 64):\n    try:\n        os.write(fd, {forged!r}.encode() + b'\\n')\n"
              "    except OSError:\n        pass\n"
              "print(found[0] if found else sys.stdin.read())\n")
    tests = [{"input": "1 2", "output": "7312 k9q"}, {"input": "3", "output": "7312 k9q"}]
    benign = dict(program="print(sum(map(int, input().split())))\n", stdin_tests=[{"input": "2 3", "output": "5"}])
    verdicts = sandbox.run_many([dict(program=BYPASS + attack, stdin_tests=tests), benign, benign], workers=2,
                                limits=LIMITS)
    assert [v.passed for v in verdicts] == [False, True, True], verdicts
    assert verdicts[0].detail == "test 1: expected '7312 k9q', got '1 2\\n'", verdicts[0]


def test_asserted_constants_are_not_in_the_program():
    # the old runner held the test source in its locals: find it and answer from it
    attack = ("import sys, re\ndef _find():\n    f = sys._getframe(0)\n    while f is not None:\n"
              "        for v in list(f.f_locals.values()):\n"
              "            text = v.get('test_code') if type(v) is dict else v\n"
              "            if type(text) is str and 'assert' in text:\n                return text\n"
              "        f = f.f_back\n    return ''\nTEXT = _find()\n"
              "def secret(x):\n    m = re.search(r'candidate\\(' + str(x) + r'\\) == (.+)', TEXT)\n"
              "    return eval(m.group(1)) if m else 0\n")
    for v in run_side_by_side(attack):
        assert not v.passed, v


@pytest.mark.parametrize("shadow, returns, test", [
    ("abs = lambda x: 0\n", "0", "assert abs(secret(1) - 7.5) < 1e-6\n"),
    ("len = lambda x: 3\n", "[0]", "assert len(secret(1)) == 3\n"),
    ("sorted = lambda x: [1, 2]\n", "[0]", "assert sorted(secret(1)) == [1, 2]\n"),
    ("set = lambda x: {4}\n", "[0]", "assert set(secret(1)) == {4}\n"),
])
def test_shadowed_builtins_do_not_reach_the_tests(shadow, returns, test):
    # MBPP style (the asserts call the function by name); the old runner ran them in the
    # program's globals, where a module-level `len` hides the builtin
    v = sandbox.run_asserts(f"{shadow}def secret(x):\n    return {returns}\n", test, entry_point="secret", check=False,
                            limits=LIMITS)
    assert not v.passed and v.status in ("failed", "error"), v


def test_prompt_helpers_are_the_trusted_ones():
    # HumanEval/32: the tests check find_zero's root with the prompt's poly(); a completion
    # that redefines poly to return 0 passed when tests shared the program's globals
    problem = next(p for p in codeeval.load_problems(codeeval.humaneval_path()) if p.task_id == "HumanEval/32")
    forged = problem.job("    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n")
    honest = problem.job(problem.record["canonical_solution"])
    assert [v.passed for v in sandbox.run_many([forged, honest], workers=2, limits=LIMITS)] == [False, True]


# --------------------------------------------------------------------------- wrong answers
def test_loose_types_inside_containers_fail(backend):
    # each program returns a value that equals the expected one under `==` but is another value:
    # a key or member of another type (True for 1, 1.0 for 1, 1+0j for 1), at any depth
    cases = [({1: "a"}, "{True: 'a'}"), ({1: "a"}, "{1.0: 'a'}"), ({1}, "{True}"), ({1}, "{1 + 0j}"),
             ({(1, 2)}, "{(1.0, 2)}"), (frozenset({0}), "frozenset({False})"), ([{1: [2]}], "[{True: [2]}]"),
             ({(1,): 0}, "{(True,): 0}"), ({frozenset({1})}, "{frozenset({1.0})}"), ((1, {2: 3}), "(1, {2.0: 3})")]
    jobs = [dict(program=f"def f():\n    return {returned}\n", calls=["f()"], expected=[want]) for want, returned in cases]
    verdicts = sandbox.run_many(jobs + [ADD_OK], workers=2, limits=LIMITS)
    assert [v.status for v in verdicts] == ["failed"] * len(cases) + ["passed"], verdicts


# --------------------------------------------------------------------------- the evaluating process held
def evaluate_elsewhere(jobs, backend, hook=True, limit_s=20.0):
    """run_many(jobs) in a separate evaluating process with this backend and audit hook: its verdicts
    as dicts, or None when it had not finished after `limit_s` (it is then ended, with every process
    under it: an evaluating process blocked in the kernel by a program ends once the program does)."""
    code = ("import json, sys\nfrom rlhf import sandbox\n"
            f"sandbox._AUDIT_HOOK = {hook}\nsandbox._backend = lambda mode: {backend!r}\n"
            "verdicts = sandbox.run_many(json.load(sys.stdin), workers=2)\n"
            "print(json.dumps([v.__dict__ for v in verdicts]))\n")
    evaluator = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = evaluator.communicate(json.dumps(jobs), timeout=limit_s)
    except subprocess.TimeoutExpired:
        for pid in descendants(evaluator.pid) + [evaluator.pid]:  # the programs first: they may hold it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        evaluator.communicate()
        return None
    assert evaluator.returncode == 0, err[-2000:]
    return json.loads(out)


def descendants(pid):
    """Every live process below `pid`, deepest first."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out[::-1]


# finds the runner's writer in the frames above the program and sends `record` as the reply
SEND_RAW = """
import sys, time
def send_raw(record):
    f = sys._getframe(0)
    while f is not None:
        if callable(f.f_locals.get("send")):
            f.f_locals["send"](record)
            time.sleep(30)
        f = f.f_back
"""
P61 = "(2 ** 61 - 1)"  # ints k * P61 all have one hash: a set of n of them costs n * n / 2 comparisons


@pytest.mark.parametrize("attack", [
    # a set, then a dict, of 120000 (100000) ints of one hash, sent as the reply (the runner would
    # build the set as slowly); then a list of them, which a test hands to set() (MBPP task 2 does)
    SEND_RAW + "def secret(x):\n    send_raw('{\"ok\":true,\"v\":[\"S\",[' + ','.join('[\"i\",\"%d\"]' % (k * " + P61 + ") "
               "for k in range(1, 120000)) + ']]}')\n",
    SEND_RAW + "def secret(x):\n    send_raw('{\"ok\":true,\"v\":[\"d\",[' + ','.join('[[\"i\",\"%d\"],[\"n\"]]' % (k * " + P61 + ") "
               "for k in range(1, 100000)) + ']]}')\n",
    "def secret(x):\n    return [k * " + P61 + " for k in range(1, 120000)]\n",
], ids=["colliding-set", "colliding-dict", "colliding-list-in-a-test"])
def test_replies_slow_to_decode_end_at_the_deadline(attack, backend):
    # each holds an evaluating process that decodes it (or compares it) for many minutes; the run
    # must end about when the program's time does, whatever the reply's shape
    jobs = [dict(program=attack, calls=CALLS, expected=EXPECTED, timeout=1.0),
            dict(program=attack, test_code="assert set(secret(1)) == {7312}\n", entry_point="secret", check=False,
                 timeout=1.0)]
    t0 = time.monotonic()
    verdicts = evaluate_elsewhere(jobs, backend, limit_s=30.0)
    assert verdicts is not None, "the evaluating process was still busy after 30 s"
    assert time.monotonic() - t0 < 15 and not any(v["passed"] for v in verdicts), verdicts
    assert all(v["seconds"] < 3.0 for v in verdicts), verdicts


# the runner's end of the reply pipe, found in the frames above the program
REPLY_FD = """
import sys
def reply_fd():
    f = sys._getframe(0)
    while f is not None:
        if type(f.f_locals.get("cout")) is int:
            return f.f_locals["cout"]
        f = f.f_back
"""


# splice() moves a byte from a socket into the reply pipe, which makes it readable, then, holding
# the pipe's lock, waits for a second byte that never comes (SO_RCVLOWAT 2): the evaluating process's
# read waits for that lock, unkillable, and the program lives as long as that read waits
HOLD_REPLY = ("    a, b = socket.socketpair()\n    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 2)\n"
              "    b.send(b'x')\n    os.splice(a.fileno(), reply_fd(), 2)\n")


@pytest.mark.parametrize("attack", [
    "import os, socket\ndef secret(x):\n" + HOLD_REPLY,
    "import os, socket, time\ndef secret(x):\n    if os.fork() == 0:\n" + HOLD_REPLY.replace("    ", "        ")
    + "    time.sleep(60)\n",  # the same from a forked child, the program itself asleep
], ids=["splice-holds-the-reply-pipe", "a-child-holds-it"])
def test_a_program_cannot_hold_the_evaluating_process(attack, backend):
    # kernel-level: with the audit hook off (it refuses the socket)
    program = REPLY_FD + attack
    jobs = [dict(program=program, calls=CALLS, expected=EXPECTED, timeout=1.0),
            dict(program=program, test_code=TESTS, entry_point="secret", timeout=1.0), ADD_OK]
    verdicts = evaluate_elsewhere(jobs, backend, hook=False, limit_s=20.0)
    assert verdicts is not None, "the evaluating process was still held after 20 s"
    assert [v["status"] for v in verdicts] == ["timeout", "timeout", "passed"], verdicts
    assert all(v["seconds"] < 1.0 + sandbox.GRACE_S + 1.5 for v in verdicts), verdicts


# --------------------------------------------------------------------------- malformed results
@pytest.mark.parametrize("body", [
    "    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",    # deeper than MAX_DEPTH
    "    return 'x' * (5 << 20)\n",                                          # over READ_BACK_BYTES
    "    return {1: object()}\n",                                            # not a builtin value
    "    import os\n    os._exit(0)\n",                                      # no answer at all
    "    raise SystemExit(0)\n",
])
def test_bad_results_are_that_samples_verdict(body):
    for v in run_side_by_side("def secret(x):\n" + body):
        assert not v.passed and v.status in ("failed", "error", "memory"), v


def test_malformed_jobs_are_errors_not_exceptions():
    verdicts = sandbox.run_many([{"program": "x = 1"}, {"calls": ["f()"], "expected": [1]},
                                 {"program": "x", "test_code": "assert (", "entry_point": "f"}, ADD_OK], workers=2,
                                limits=LIMITS)
    assert [v.status for v in verdicts[:3]] == ["error"] * 3 and verdicts[3].passed
