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
sample uid may be left.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

import config as C
from rlhf import codeeval, sandbox

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


# --------------------------------------------------------------------------- escapes
def test_loopback_tcp_and_abstract_unix_sockets(hook, backend):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    name = "\0sandbox-test-" + uuid.uuid4().hex
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(name)
    unix.listen(8)
    accepted = []

    def accept(s):
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(s.accept()[0])
            except OSError:
                pass

    stop = threading.Event()
    threads = [threading.Thread(target=accept, args=(s,)) for s in (tcp, unix)]
    for t in threads:
        t.start()
    attack = (BYPASS + "import socket\ndef secret(x):\n"
              f"    a = socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1)\n"
              f"    b = socket.socket(socket.AF_UNIX)\n    b.connect({name!r})\n    return 0\n")
    try:
        verdicts = run_side_by_side(attack)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in [tcp, unix] + accepted:
            s.close()
    assert accepted == [] and not any(v.passed for v in verdicts), (accepted, verdicts)


def test_setsid_grandchild_does_not_outlive_the_run(hook, backend):
    marker = f"{time.time() % 1000:.6f}"[:10]  # a `sleep` argument no other process uses
    attack = (BYPASS + "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n" + WRONG)
    verdicts = run_side_by_side(attack)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    left.append(int(pid))
        except OSError:
            pass
    for pid in left:  # started by this test: do not leave them behind even when it fails
        os.kill(pid, signal.SIGKILL)
    assert left == [] and not any(v.passed for v in verdicts)


def test_cannot_kill_sibling_samples(hook, backend):
    killer = (BYPASS + "import os, time\nend = time.time() + 1.5\nwhile time.time() < end:\n"
              "    for pid in os.listdir('/proc') if os.path.isdir('/proc') else []:\n"
              "        if pid.isdigit() and int(pid) != os.getpid():\n            try:\n"
              "                os.kill(int(pid), 9)\n            except OSError:\n                pass\n"
              "    try:\n        os.kill(-1, 9)\n    except OSError:\n        pass\n" + WRONG)
    victim = dict(program="import time\ntime.sleep(1.0)\ndef add(a, b):\n    return a + b\n",
                  calls=["add(2, 3)"], expected=[5])
    verdicts = sandbox.run_many([dict(program=killer, calls=CALLS, expected=EXPECTED), victim, victim], workers=3,
                                limits=LIMITS)
    assert [v.passed for v in verdicts] == [False, True, True], verdicts


def test_programs_side_by_side_cannot_signal_each_other(hook, backend):
    # the files every program sees are the same files (the interpreter's, /dev/null): a lock, a
    # lease, a file notification or page-cache residency on one of them is visible to the program
    # beside it. The sender marks three files in each way; the receiver passes if it notices any
    shared = "import os\nLIB = os.path.dirname(os.__file__)\nA, B, C = (os.path.join(LIB, n) for n in ('this.py', 'antigravity.py', '__hello__.py'))\n"
    sender = (shared + "import fcntl, struct, time\nheld = []\n"
              "def lock(path, how):\n    try:\n        fd = os.open(path, os.O_RDONLY)\n        how(fd)\n        held.append(fd)\n"
              "    except OSError:\n        pass\n"
              "lock(A, lambda fd: fcntl.flock(fd, fcntl.LOCK_SH))\n"
              "lock(B, lambda fd: fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack('hhqqi', fcntl.F_RDLCK, 0, 0, 0, 0)))\n"
              "lock(C, lambda fd: fcntl.fcntl(fd, 37, struct.pack('hhqqi', fcntl.F_RDLCK, 0, 0, 0, 0)))\n"  # F_OFD_SETLK
              "end = time.time() + 1.5\nwhile time.time() < end:\n    for p in (A, C):\n"  # closing B would drop its POSIX lock
              "        with open(p, 'rb') as f:\n            f.read(1)\n    time.sleep(0.01)\n" + WRONG)
    receiver = (shared + "import fcntl, struct, time\nfound = []\n"
                "try:\n    import ctypes\n    libc = ctypes.CDLL(None, use_errno=True)\n"
                "    ino = libc.inotify_init1(os.O_NONBLOCK)\n"
                "    watched = [libc.inotify_add_watch(ino, p.encode(), 0x20 | 0x1) for p in (A, B, C)]\n"  # IN_OPEN | IN_ACCESS
                "except Exception:\n    ino = -1\n"
                "time.sleep(0.6)\n"
                "fd = os.open(A, os.O_RDONLY)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except BlockingIOError:\n    found.append('flock')\nexcept OSError:\n    pass\n"
                "for name, path, cmd in (('posix lock', B, fcntl.F_GETLK), ('ofd lock', C, 36)):\n"  # F_OFD_GETLK
                "    try:\n        got = fcntl.fcntl(os.open(path, os.O_RDONLY), cmd, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0))\n"
                "        found += [name] if struct.unpack('hhqqi', got)[0] != fcntl.F_UNLCK else []\n"
                "    except OSError:\n        pass\n"
                "if ino >= 0:\n    try:\n        found += ['inotify'] if os.read(ino, 4096) else []\n    except OSError:\n        pass\n"
                "def secret(x):\n    return {1: 7312, 2: 'k9q'}[x] if found else found\n")
    verdicts = sandbox.run_many([dict(program=sender, calls=CALLS, expected=EXPECTED),
                                 dict(program=receiver, calls=CALLS, expected=EXPECTED)], workers=2, limits=LIMITS)
    assert [v.detail for v in verdicts] == ["secret(1): expected 7312, got 0", "secret(1): expected 7312, got []"], verdicts


def host_identity():
    """What identifies this host and this run of the tests: host name, boot id, kernel command line,
    our cgroup paths, the root file system's device."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    found = {"host name": socket.gethostname(), "boot id": read("/proc/sys/kernel/random/boot_id"),
             "kernel command line": read("/proc/cmdline")[:60], "machine id": read("/etc/machine-id")}
    for line in read("/proc/self/cgroup").splitlines():
        path = line.split(":", 2)[-1]
        if path not in ("", "/"):
            found["cgroup " + line.split(":", 2)[1]] = path
    for line in read("/proc/self/mountinfo").splitlines():
        fields = line.split(" - ")
        if line.split()[4] == "/" and len(fields) == 2 and fields[1].split()[1].startswith("/"):
            found["root device"] = fields[1].split()[1]
    return {k: v for k, v in found.items() if v}


def test_the_host_is_not_identifiable(hook, backend):
    # everything a program could read that names this host or this run: the UTS host name, and in
    # /proc the boot id, kernel command line, cgroup paths (ours, and any cgroup the sandbox makes),
    # mountinfo (devices and paths); the program passes if any of them is there
    identity = dict(host_identity(), sandbox_cgroup="rlhf-sandbox")
    attack = ("import os\nTEXTS = []\n"
              "for p in ('/proc/sys/kernel/hostname', '/proc/sys/kernel/random/boot_id', '/proc/cmdline', "
              "'/proc/self/cgroup', '/proc/1/cgroup', '/proc/self/mountinfo', '/proc/1/mountinfo', '/proc/self/mounts', "
              "'/etc/hostname', '/etc/machine-id', '/sys/class/dmi/id/product_uuid'):\n"
              "    try:\n        TEXTS.append(open(p).read())\n    except Exception:\n        pass\n"
              f"IDENTITY = {identity!r}\n"
              "NAMES = {os.uname().nodename} | {t.strip() for t in TEXTS}\n"
              "FOUND = sorted(k for k, v in IDENTITY.items() if v in NAMES or k != 'host name' and any(v in t for t in TEXTS))\n"
              "def secret(x):\n    return {1: 7312, 2: 'k9q'}[x] if FOUND else FOUND\n")
    verdicts = run_side_by_side(attack)
    assert not any(v.passed for v in verdicts) and verdicts[0].detail == "secret(1): expected 7312, got []", verdicts


@pytest.fixture
def cgroups():
    if not sandbox._cgroups():
        pytest.skip("no writable cgroup here (the one line on stderr says why)")
    return sandbox._cgroups()


def test_memory_is_bounded_for_the_program_as_a_whole(any_backend, cgroups, monkeypatch):
    # six processes of 64 MiB each, at once, under a limit of 256 MiB: each is under RLIMIT_AS (the
    # bound per process), and together they held 384 MiB before programs had a cgroup
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    attack = ("import os, select, time\nR, W = os.pipe()\ndef secret(x):\n    for i in range(6):\n"
              "        if os.fork() == 0:\n            held = b'\\x01' * (64 << 20)\n            os.write(W, b'1')\n"
              "            time.sleep(3)\n            os._exit(0)\n    got, end = b'', time.time() + 2\n"
              "    while len(got) < 6 and time.time() < end:\n        if select.select([R], [], [], 0.1)[0]:\n"
              "            got += os.read(R, 6)\n    return {1: 7312, 2: 'k9q'}[x] if len(got) == 6 else len(got)\n")
    jobs = [dict(program=attack, calls=CALLS, expected=EXPECTED, timeout=4.0, memory_mb=256),
            dict(ADD_OK, memory_mb=256)]
    verdicts = sandbox.run_many(jobs, workers=2, limits=LIMITS)
    assert [v.passed for v in verdicts] == [False, True], verdicts
    # each program's cgroups are gone after its run
    assert [n for parent, _ in cgroups for n in os.listdir(parent) if os.path.isdir(f"{parent}/{n}")] == []


def test_a_programs_processes_are_bounded_as_a_whole(backend, cgroups, monkeypatch):
    # in a user namespace every program has the same uid: RLIMIT_NPROC counts them together (one
    # program's 40 sleeping processes would leave the one beside it too few for its 30), and where
    # that uid is root outside (the evaluating process runs as root) the kernel does not apply
    # RLIMIT_NPROC at all: a program forked 200 processes. With a cgroup each program has its own
    # SANDBOX_MAX_PROCS. (As root each program has a uid, and a count, of its own already.)
    if backend == "root":
        pytest.skip("as root each program has a uid, and so a count, of its own")
    if not any(name == "pids.max" for _, files in cgroups for name, _ in files):
        pytest.skip("no pids cgroup here")
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    hog = ("import os, time\nfor i in range(40):\n    if os.fork() == 0:\n        time.sleep(3)\n        os._exit(0)\n"
           "time.sleep(2)\n" + WRONG)
    needs_30 = ("import os, time\ntime.sleep(0.5)\ndef add(a, b):\n    pids = []\n    for i in range(30):\n"
                "        pid = os.fork()\n        if pid == 0:\n            time.sleep(0.2)\n            os._exit(0)\n"
                "        pids.append(pid)\n    for pid in pids:\n        os.waitpid(pid, 0)\n    return a + b\n")
    verdicts = sandbox.run_many([dict(program=hog, calls=CALLS, expected=EXPECTED, timeout=4.0),
                                 dict(ADD_OK, program=needs_30, timeout=4.0)], workers=2, limits=LIMITS)
    assert [v.passed for v in verdicts] == [False, True], verdicts
    bomb = "import os, time\nn = 0\ntry:\n    while n < 200:\n        if os.fork() == 0:\n            time.sleep(2)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\ndef f():\n    return n\n"
    v = sandbox.run_calls(bomb, ["f()"], [0], timeout=4.0, limits=LIMITS)
    assert v.detail.startswith("f(): expected 0, got ") and int(v.detail.rsplit(" ", 1)[1]) < C.SANDBOX_MAX_PROCS, v


def test_problems_file_is_out_of_reach(tmp_path, needs_namespaces):
    # the old attack: the parent's command line in /proc names --problems; read the answers there
    folder = tempfile.mkdtemp(prefix="sandbox-attack-")
    try:
        os.chmod(folder, 0o755)  # as readable as a checkout's data/ usually is
        problems = os.path.join(folder, "problems.jsonl")
        with open(problems, "w") as f:
            f.write(json.dumps({"task_id": "s1", "prompt": "p", "entry_point": "secret",
                                "tests": [{"call": "secret(1)", "expected": "7312"}]}) + "\n")
        os.chmod(problems, 0o644)
        attack = (BYPASS + "import os, json\ndef secret(x):\n    for pid in os.listdir('/proc'):\n"
                  "        try:\n            args = open('/proc/%s/cmdline' % pid, 'rb').read().split(b'\\0')\n"
                  "        except OSError:\n            continue\n        for a in args:\n"
                  "            if a.endswith(b'.jsonl') and b'problems' in a:\n"
                  "                row = json.loads(open(a.decode()).readline())\n"
                  "                return eval(row['tests'][0]['expected'])\n    return 0\n")
        samples = tmp_path / "samples.jsonl"
        samples.write_text(json.dumps({"task_id": "s1", "completion": attack}) + "\n")
        out = tmp_path / "results.jsonl"
        r = subprocess.run([sys.executable, "scripts/evaluate.py", "--problems", problems, "--samples", str(samples),
                            "--out", str(out), "--workers", "2", "--k", "1", "--SANDBOX_TIMEOUT_S=3"],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads(r.stdout[r.stdout.index("{"):])
        assert summary["passed"] == 0 and summary["sandbox"].startswith("namespaces"), summary
    finally:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


def test_no_files_in_world_writable_dirs(hook, backend):
    tag = uuid.uuid4().hex
    paths = [f"/tmp/sandbox-fifo-{tag}", f"/dev/shm/sandbox-node-{tag}", f"/var/tmp/sandbox-fifo-{tag}"]
    attack = ("import os, stat\ndef secret(x):\n"
              f"    for p in {paths!r}:\n        try:\n"
              "            os.mkfifo(p) if 'fifo' in p else os.mknod(p, 0o666 | stat.S_IFREG)\n"
              "        except OSError:\n            pass\n    return 0\n")
    verdicts = run_side_by_side(attack)
    left = [p for p in paths if os.path.lexists(p)]
    for p in left:
        os.remove(p)
    assert left == [] and not any(v.passed for v in verdicts)


def test_disk_is_bounded(hook, backend):
    # passes only if 280 MiB could be allocated: 40 files, each under RLIMIT_FSIZE
    attack = ("import os\ndef add(a, b):\n    done = 0\n    for i in range(40):\n        try:\n"
              "            fd = os.open('fill%d' % i, os.O_CREAT | os.O_WRONLY, 0o600)\n"
              "            os.posix_fallocate(fd, 0, 7 << 20)\n            done += 1\n"
              "        except OSError:\n            pass\n    return a + b if done == 40 else 0\n")
    verdicts = sandbox.run_many([dict(ADD_OK, program=attack), dict(ADD_TESTS_OK, program=attack), ADD_OK], workers=2,
                                limits=LIMITS)
    assert [v.passed for v in verdicts] == [False, False, True], verdicts


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


def test_host_files_are_invisible(hook, backend):
    # a world-readable file in a world-readable folder: the weak sandbox's uid could read it
    folder = tempfile.mkdtemp(prefix="sandbox-attack-")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "answers.txt")
        with open(path, "w") as f:
            f.write("7312")
        os.chmod(path, 0o644)
        attack = BYPASS + f"def secret(x):\n    return int(open({path!r}).read()) if x == 1 else 'k9q'\n"
        assert not any(v.passed for v in run_side_by_side(attack))
    finally:
        os.remove(path)
        os.rmdir(folder)


def test_nothing_survives_the_evaluating_process(needs_namespaces):
    # the evaluating process is killed while a program sleeps: the namespace must go with it
    code = ("from rlhf import sandbox\nsandbox._AUDIT_HOOK = False\nsandbox.run_calls('import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n"
            "time.sleep(60)\\n', ['f()'], [1], timeout=60)\n")
    evaluator = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                                 stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while len(sandbox_processes(evaluator.pid)) < 3 and time.time() < deadline and evaluator.poll() is None:
            time.sleep(0.05)
        # the namespace's init, the program and its fork are running
        assert len(sandbox_processes(evaluator.pid)) >= 3, evaluator.poll() is not None and evaluator.stderr.read()[-2000:]
    finally:
        evaluator.kill()
        evaluator.wait()
    deadline = time.time() + 5
    while sandbox_processes(evaluator.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(evaluator.pid) == []


def test_no_nested_namespaces(hook, backend):
    # a new user namespace would hand the program every capability again, inside it: then a
    # mount namespace of its own (an unbounded tmpfs), chroot games; seccomp refuses both calls
    attack = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "OK = libc.unshare(0x10000000) == 0 and libc.unshare(0x00020000) == 0\n"
              "def secret(x):\n    return {1: 7312, 2: 'k9q'}[x] if OK else 0\n")
    assert not any(v.passed for v in run_side_by_side(attack))


def test_programs_forked_by_one_zygote_share_nothing(hook, backend):
    # one set-up process forks every program: what one program leaves behind (a file in its work
    # dir or /dev/shm, a setsid process, an abstract Unix socket, SysV shared memory) must be
    # invisible to the next one and to one running beside it; the finder passes only if it finds any
    tag = uuid.uuid4().hex[:12]
    planter = (BYPASS + "import os, socket, time\n"
               f"open('/work/mark-{tag}', 'w').write('x')\nopen('/dev/shm/mark-{tag}', 'w').write('x')\n"
               "s = socket.socket(socket.AF_UNIX)\n"
               f"s.bind('\\0plant-{tag}')\ns.listen(1)\n"
               "if os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
               "time.sleep(1.5)\n" + WRONG)
    finder = (BYPASS + "import os, socket, time\ntime.sleep(0.5)\n"
              "def traces():\n    found = []\n"
              f"    for p in ('/work/mark-{tag}', '/dev/shm/mark-{tag}', '/tmp/mark-{tag}'):\n"
              "        found += [p] if os.path.exists(p) else []\n"
              "    for pid in range(2, 4096):\n"  # any process but its own and pid 1 (no /proc needed)
              "        try:\n            os.kill(pid, 0)\n            found += [pid] if pid != os.getpid() else []\n"
              "        except PermissionError:\n            found.append(pid)\n"  # there, another uid's
              "        except OSError:\n            pass\n"
              "    try:\n        c = socket.socket(socket.AF_UNIX)\n"
              f"        c.connect('\\0plant-{tag}')\n        found.append('socket')\n    except OSError:\n        pass\n"
              "    return found\n"
              "def secret(x):\n    return {1: 7312, 2: 'k9q'}[x] if traces() else traces()\n")
    side_by_side = sandbox.run_many([dict(program=planter, calls=CALLS, expected=EXPECTED),
                                     dict(program=finder, calls=CALLS, expected=EXPECTED)], workers=2, limits=LIMITS)
    one_after_another = sandbox.run_many([dict(program=planter, calls=CALLS, expected=EXPECTED),
                                          dict(program=finder, calls=CALLS, expected=EXPECTED)], workers=1,
                                         limits=LIMITS)
    verdicts = side_by_side + one_after_another
    assert not any(v.passed for v in verdicts), verdicts
    if not hook:  # the finder looked everywhere and found nothing (with the hook, it is refused)
        assert [v.detail for v in verdicts[1::2]] == ["secret(1): expected 7312, got []"] * 2, verdicts


def test_a_lost_zygote_is_replaced(needs_namespaces):
    # the set-up process killed from outside: the program it was running gets a verdict, the next
    # program a new zygote
    slow = dict(ADD_OK, program="import time\ntime.sleep(2)\n" + ADD_OK["program"])
    assert sandbox.run_many([ADD_OK], limits=LIMITS)[0].passed
    zygote = sandbox._zygote(sandbox._backend(C.SANDBOX_MODE))
    killer = threading.Timer(0.5, zygote.proc.kill)
    killer.start()
    verdict = sandbox.run_many([slow], limits=LIMITS)[0]
    killer.join()
    assert not verdict.passed and verdict.status == "error", verdict
    assert sandbox.run_many([ADD_OK, ADD_TESTS_OK], workers=2, limits=LIMITS)[0].passed


def test_a_forked_evaluator_starts_its_own_zygote(needs_namespaces):
    # a copy of the evaluating process made by fork() (a data loader worker, multiprocessing) must
    # not share the parent's set-up process: its programs get their own, and the parent's still works
    assert sandbox.run_many([ADD_OK], limits=LIMITS)[0].passed
    parent_zygote = sandbox._zygote(sandbox._backend(C.SANDBOX_MODE))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports whether its program passed and whether its zygote is new
        ok = False
        try:
            v = sandbox.run_many([ADD_OK], limits=LIMITS)[0]
            ok = v.passed and sandbox._zygote(sandbox._backend(C.SANDBOX_MODE)) is not parent_zygote
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert sandbox._zygote(sandbox._backend(C.SANDBOX_MODE)) is parent_zygote
    assert sandbox.run_many([ADD_OK], limits=LIMITS)[0].passed
