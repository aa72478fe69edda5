"""Hostile programs against rlhf/sandbox/ that try to reach the host or the programs beside them:
sockets, signals, locks and file notifications, surviving processes, the host's identity, memory,
processes and disk beyond their bounds, files outside the work dir, nested namespaces, and what one
program of a set-up process leaves for the next. The verdict's attacks, and the history of what
succeeded against earlier sandboxes: tests/test_sandbox_attacks.py.
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
from rlhf import sandbox
from sandbox_attack_kit import (  # noqa: F401  (bounded, hook, backend, any_backend, needs_namespaces: fixtures)
    ADD_OK, ADD_TESTS_OK, BYPASS, CALLS, EXPECTED, LIMITS, ROOT, WRONG, any_backend, backend, bounded, hook,
    needs_namespaces, run_side_by_side, sandbox_processes,
)


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
    killer = (BYPASS + "import os, time\nend = time.time() + 1.0\nwhile time.time() < end:\n"
              "    for pid in os.listdir('/proc') if os.path.isdir('/proc') else []:\n"
              "        if pid.isdigit() and int(pid) != os.getpid():\n            try:\n"
              "                os.kill(int(pid), 9)\n            except OSError:\n                pass\n"
              "    try:\n        os.kill(-1, 9)\n    except OSError:\n        pass\n" + WRONG)
    victim = dict(program="import time\ntime.sleep(0.7)\ndef add(a, b):\n    return a + b\n",
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
              "end = time.time() + 1.0\nwhile time.time() < end:\n    for p in (A, C):\n"  # closing B would drop its POSIX lock
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
    jobs = [dict(program=attack, calls=CALLS, expected=EXPECTED, timeout=2.5, memory_mb=256),
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


# --------------------------------------------------------------------------- one set-up process, many programs
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
