"""Run untrusted generated Python programs and return a verdict they cannot fake.

Each program runs in its own fresh interpreter (`python -I -S -B`), in a throw-away temp
directory, as an unprivileged user when we are root, in a new session that is killed as a
whole afterwards, under rlimits (CPU, address space, file size, processes, open files), with
an empty environment, and behind an audit hook (PEP 578) that refuses network, processes,
signals, ctypes, frame/gc digging and file access outside the temp dir and the stdlib.
What this protects against and what it does not: docs/SANDBOX.md.

Two kinds of tests:
  run_calls(program, calls, expected)   the project's format: the child evaluates each call
      and sends back a strict serialisation of the result (exact builtin types only); the
      parent compares with `expected`, which never enters the child.
  run_asserts(program, test_code)       HumanEval/MBPP assert tests, which must run in the
      child: the child prints a per-run nonce (received on stdin) only after every test ran,
      and `candidate(...)` results and compared values must be exact builtin types.
run_many(jobs) runs many of them in parallel threads, each thread driving one subprocess.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

TIMEOUT_S = 5.0           # wall-clock seconds per program; CPU limit is this rounded up + 1
MEMORY_MB = 512           # address-space limit (RLIMIT_AS) per process
FILE_SIZE_MB = 8          # largest file (stdout/stderr included) a program may write
MAX_PROCS = 64            # RLIMIT_NPROC for the unprivileged uid (root only: see _limits)
MAX_OPEN_FILES = 64       # RLIMIT_NOFILE
READ_BACK_BYTES = 4 << 20  # at most this much of the result channel is read back
UNPRIVILEGED_ID = 65534   # nobody/nogroup on Debian; the child runs as this when we are root

STATUSES = ("passed", "failed", "error", "timeout", "memory", "refused")


@dataclasses.dataclass
class Verdict:
    passed: bool          # every test passed
    status: str           # one of STATUSES
    detail: str           # first failure, exception or reason; "" when passed
    seconds: float        # wall time of the child process
    pass_fraction: float  # share of test calls that passed (asserts: 0 or 1)


# --------------------------------------------------------------------------- child side
# The runner is passed with -c, so its frames have co_filename "<string>"; user code is
# compiled as "<program>" and tests as "<tests>". Everything the runner needs after the user
# code started is captured in locals first, so monkey-patching modules cannot change it.
RUNNER = r'''
import sys, os, resource, signal
def main():
    lim = sys.argv[1].split(",")
    cpu, mem, fsize, nproc, nofile = (int(x) for x in lim)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    if nproc > 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a flood gets EFBIG, not a silent kill
    import json, types, ast
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    nonce = job.pop("nonce")
    mode = job["mode"]
    esc = json.encoder.encode_basestring_ascii
    write, type_, str_, repr_, len_, isinstance_ = os.write, type, str, repr, len, isinstance
    compile_, exec_, eval_ = compile, exec, eval
    BaseException_, MemoryError_, PermissionError_ = BaseException, MemoryError, PermissionError
    AssertionError_, RecursionError_ = AssertionError, RecursionError
    builtins_copy = dict(__builtins__.__dict__ if type(__builtins__) is types.ModuleType else __builtins__)
    out = os.open(".result", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    root = os.getcwd()
    readable = tuple(p for p in sys.path if p) + (root, "/dev/null", "/dev/urandom")

    def emit(text):
        write(out, (nonce + " " + text + "\n").encode("utf-8", "replace"))

    def describe(e):
        name = type_(e).__name__
        try:
            msg = str_(e)[:300] if type_(e).__module__ == "builtins" else ""
        except BaseException_:
            msg = ""
        return name + (": " + msg if msg else "")

    def status_of(e):
        if type_(e) is MemoryError_:
            return "memory"
        if type_(e) is PermissionError_ and str_(e).startswith("sandbox refused"):
            return "refused"
        return "failed" if type_(e) is AssertionError_ else "error"

    # ---- audit hook: refuse what a solution to a programming task never needs
    refused_prefixes = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn",
                        "os.posix_spawn", "os.fork", "os.system", "os.kill", "os.killpg",
                        "signal.", "pty.", "resource.", "os.symlink", "os.link",
                        "os.setxattr", "os.removexattr", "gc.get_", "sys._current_",
                        "sys.settrace", "sys.setprofile", "sys.addaudithook", "webbrowser.",
                        "os.startfile", "winreg.", "shutil.chown")
    refused_imports = {"ctypes", "_ctypes", "_posixsubprocess", "_testcapi",
                       "_testinternalcapi", "_xxsubinterpreters", "_socket", "socket"}
    write_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1,
                    "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.chdir": 1,
                    "os.rename": 2, "shutil.rmtree": 1, "shutil.copyfile": 2,
                    "shutil.copymode": 2, "shutil.copystat": 2, "shutil.move": 2}
    read_events = {"os.listdir", "os.scandir", "glob.glob"}
    user_module = "__sandbox__"
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def norm(p):
        # textual normalisation only ("..": refused, symlinks: cannot be created)
        if type_(p) is bytes:
            p = p.decode("utf-8", "surrogateescape")
        if type_(p) is not str_:
            return None
        if not p.startswith("/"):
            p = root + "/" + p
        parts = []
        for c in p.split("/"):
            if c == "..":
                return None
            if c and c != ".":
                parts.append(c)
        return "/" + "/".join(parts)

    def inside(p, bases):
        for b in bases:
            if p == b or p.startswith(b.rstrip("/") + "/"):
                return True
        return False

    def refuse(event):
        raise PermissionError_("sandbox refused: " + event)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if type_(path) is int:
                return
            p = norm(path)
            writing = (type_(mode) is str_ and any(c in mode for c in "wax+")) or (
                type_(flags) is int and flags & wflags)
            if p is None or not inside(p, (root,) if writing else readable):
                refuse("open " + repr_(path))
        elif event in write_events:
            for path in args[:write_events[event]]:
                if type_(path) is int:
                    continue
                p = norm(path)
                if p is None or not inside(p, (root,)):
                    refuse(event + " " + repr_(path))
            if len_(args) > 2 and event != "os.rename" and args[-1] is not None and type_(args[-1]) is int:
                refuse(event + " with dir_fd")
        elif event in read_events:
            path = args[0] if args else "."
            if path is None:
                path = "."
            if type_(path) is not int:
                p = norm(path)
                if p is None or not inside(p, readable):
                    refuse(event + " " + repr_(path))
        elif event == "import":
            if args[0] in refused_imports:
                refuse("import " + args[0])
        elif event == "sys._getframe":
            if args[0].f_code.co_filename in ("<string>", "<tests>"):
                refuse(event)
        elif event.startswith(refused_prefixes):
            refuse(event)

    # ---- strict values: exact builtin types, recursively; anything else is a failure
    def check(v, depth=0):
        t = type_(v)
        if depth > 100:
            raise AssertionError_("result nested too deeply")
        if t is list or t is tuple or t is set or t is frozenset:
            for x in v:
                check(x, depth + 1)
        elif t is dict:
            for k, x in v.items():
                check(k, depth + 1)
                check(x, depth + 1)
        elif not (v is None or t is bool or t is int or t is float or t is str_ or t is complex):
            raise AssertionError_("non-builtin value of type " + t.__name__)
        return v

    def encode(v):
        t = type_(v)
        if v is None:
            return '["n"]'
        if t is bool:
            return '["b",' + ("true" if v else "false") + "]"
        if t is int or t is float or t is complex:
            return '["' + ("i" if t is int else "f" if t is float else "c") + '",' + esc(repr_(v)) + "]"
        if t is str_:
            return '["s",' + esc(v) + "]"
        if t is dict:
            return '["d",[' + ",".join("[" + encode(k) + "," + encode(x) + "]" for k, x in v.items()) + "]]"
        tag = "l" if t is list else "t" if t is tuple else "S" if t is set else "F"
        return '["' + tag + '",[' + ",".join(encode(x) for x in v) + "]]"

    # asserts: the (trusted) test code is rewritten so compared values must be strict builtins
    targets = {"candidate", job.get("entry_point") or "candidate"}

    def wrap(node, fn="__sx_val"):
        return ast.copy_location(ast.Call(ast.Name(fn, ast.Load()), [node], []), node)

    class Strict(ast.NodeTransformer):
        def visit_Assert(self, node):
            self.generic_visit(node)
            node.test = wrap(node.test, "__sx_truth")
            return node

        def visit_Compare(self, node):
            self.generic_visit(node)
            node.left = wrap(node.left)
            node.comparators = [wrap(c) for c in node.comparators]
            return node

        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            if isinstance_(node.op, ast.Not):
                node.operand = wrap(node.operand)
            return node

        def visit_Call(self, node):
            self.generic_visit(node)
            if isinstance_(node.func, ast.Name) and node.func.id in targets:
                return wrap(node)
            return node

    def strict_value(v):
        if type_(v) is range:
            return v
        return check(v)

    def strict_truth(v):
        return bool(check(v))

    tests_code = None
    if mode == "asserts":
        test = job["test_code"]
        if job.get("entry_point") and job.get("check"):
            test += "\ncheck(" + job["entry_point"] + ")\n"
        body = ast.parse(test, "<tests>").body or [ast.Pass()]
        fn = ast.FunctionDef("__sandbox_tests__", ast.arguments(
            [], [ast.arg("__sx_val"), ast.arg("__sx_truth")], None, [], [], None, []),
            body, [], None)
        tests_code = compile_(ast.fix_missing_locations(Strict().visit(ast.Module([fn], []))),
                              "<tests>", "exec")

    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the job (and nonce) stays out of reach
    sys.stdin = open(os.devnull)
    module = types.ModuleType(user_module)
    sys.modules[user_module] = module
    ns = module.__dict__
    sys.addaudithook(hook)
    try:
        if job.get("setup"):
            exec_(compile_(job["setup"], "<setup>", "exec"), ns)
        exec_(compile_(job["program"], "<program>", "exec"), ns)
    except BaseException_ as e:
        emit('{"k":"load","status":' + esc(status_of(e) if status_of(e) != "failed" else "error") +
             ',"detail":' + esc(describe(e)) + "}")
        return
    if mode == "calls":
        for i, call in enumerate(job["calls"]):
            try:
                v = check(eval_(compile_(call, "<tests>", "eval"), ns))
                text = encode(v)
            except BaseException_ as e:
                emit('{"k":"call","i":' + str_(i) + ',"ok":false,"status":' + esc(status_of(e)) +
                     ',"detail":' + esc(describe(e)) + "}")
                continue
            emit('{"k":"call","i":' + str_(i) + ',"ok":true,"v":' + text + "}")
        emit('{"k":"done"}')
        return
    try:
        ns["__builtins__"] = builtins_copy  # a patched builtins module does not reach the tests
        exec_(tests_code, ns)
        tests = ns.pop("__sandbox_tests__")
        tests(strict_value, strict_truth)
    except BaseException_ as e:
        emit('{"k":"end","status":' + esc(status_of(e)) + ',"detail":' + esc(describe(e)) + "}")
        return
    emit('{"k":"end","status":"passed"}')
import builtins
# main's globals get a private copy of builtins: patching the builtins module cannot reach it
main = type(main)(main.__code__, dict(globals(), __builtins__=dict(builtins.__dict__)))
try:
    main()
finally:
    os._exit(0)
'''


# --------------------------------------------------------------------------- parent side
def _running_as_root() -> bool:
    return os.geteuid() == 0


@functools.lru_cache(maxsize=None)
def _interpreter_and_user() -> tuple[str, int | None]:
    """Interpreter for the child, and the uid to drop to (None: stay as we are).

    As root we drop to UNPRIVILEGED_ID; that user must be able to execute the interpreter
    (a pyenv Python under /root is not reachable), so fall back to a system python3.
    """
    if not _running_as_root():
        return sys.executable, None
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for exe in dict.fromkeys(candidates):
        if not os.path.exists(exe):
            continue
        try:
            probe = subprocess.run([exe, "-I", "-S", "-B", "-c", "import resource, json, types, ast"],
                                   user=UNPRIVILEGED_ID, group=UNPRIVILEGED_ID, extra_groups=[],
                                   cwd="/", env={}, capture_output=True, timeout=30)
        except PermissionError:  # cannot even be executed by that user
            continue
        if probe.returncode == 0:
            return exe, UNPRIVILEGED_ID
    warnings.warn("sandbox: no Python interpreter is executable by uid "
                  f"{UNPRIVILEGED_ID}; running generated code as root (other limits still apply). "
                  "Fix: install python3 under /usr or make the interpreter world-executable.")
    return sys.executable, None


def _read_capped(path: str, limit: int, tail: bool = False) -> str:
    """Read at most `limit` bytes of a regular file the child may have tampered with."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):  # a FIFO or device would block or lie
            return ""
        if tail and st.st_size > limit:
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        return os.read(fd, limit).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _run(job: dict, timeout: float, memory_mb: int) -> tuple[list[dict], str, int | None, bool, float]:
    """Run one job in a fresh child. Returns (runner records, stderr tail, returncode, timed_out, s)."""
    exe, uid = _interpreter_and_user()
    nonce = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="sandbox-")
    try:
        os.chmod(tmp, 0o700)
        if uid is not None:
            os.chown(tmp, uid, uid)
        limits = ",".join(str(x) for x in (math.ceil(timeout) + 1, memory_mb << 20,
                                           FILE_SIZE_MB << 20, MAX_PROCS if uid is not None else 0,
                                           MAX_OPEN_FILES))
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        drop = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
        data = json.dumps({**job, "nonce": nonce}).encode()
        with open(os.path.join(tmp, ".stdout"), "wb") as out, open(os.path.join(tmp, ".stderr"), "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen([exe, "-I", "-S", "-B", "-c", RUNNER, limits], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=tmp, env=env, close_fds=True,
                                    start_new_session=True, umask=0o077, **drop)
            timed_out = False
            try:
                proc.communicate(data, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole session: forked children die too
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            seconds = time.monotonic() - t0
        records = []
        for line in _read_capped(os.path.join(tmp, ".result"), READ_BACK_BYTES).splitlines():
            head, _, rest = line.partition(" ")
            if head == nonce:  # lines the program printed itself carry no nonce
                try:
                    records.append(json.loads(rest))
                except json.JSONDecodeError:
                    pass
        stderr = _read_capped(os.path.join(tmp, ".stderr"), 2000, tail=True)
        return records, stderr, proc.returncode, timed_out, seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _abnormal(returncode: int | None, timed_out: bool, stderr: str) -> tuple[str, str]:
    """Status and detail for a child that did not report a result."""
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout", "time limit exceeded"
    if returncode == -signal.SIGKILL:
        return "memory", "killed (memory or process limit)"
    if "MemoryError" in stderr:
        return "memory", "MemoryError"
    last = stderr.strip().splitlines()[-1:] or [f"exit code {returncode}"]
    return "error", f"exited before the tests finished: {last[0][:300]}"


def decode_value(enc):
    """Rebuild a value from the runner's tagged encoding (see RUNNER.encode)."""
    tag = enc[0]
    if tag == "n":
        return None
    if tag == "b":
        return enc[1]
    if tag in "ifc":
        return {"i": int, "f": float, "c": complex}[tag](enc[1])
    if tag == "s":
        return enc[1]
    if tag == "d":
        return {decode_value(k): decode_value(v) for k, v in enc[1]}
    items = [decode_value(x) for x in enc[1]]
    return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)


def values_match(got, want) -> bool:
    """Exact types (1 != 1.0 != True), floats within 1e-6 relative/absolute, recursively."""
    if type(got) is not type(want):
        return False
    if type(got) is float:
        return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if type(got) in (list, tuple):
        return len(got) == len(want) and all(values_match(g, w) for g, w in zip(got, want))
    if type(got) is dict:
        return got.keys() == want.keys() and all(values_match(got[k], want[k]) for k in want)
    return got == want


def run_calls(program: str, calls: list[str], expected: list, setup: str = "",
              timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Verdict:
    """Run `setup` + `program`, evaluate each call expression in it, compare with `expected`.

    `expected` holds Python values (never sent to the child). A call passes when its result
    is an exact builtin value equal to the expected one (values_match).
    """
    if len(calls) != len(expected):
        raise ValueError(f"{len(calls)} calls but {len(expected)} expected values")
    records, stderr, rc, timed_out, seconds = _run(
        {"mode": "calls", "program": program, "setup": setup, "calls": list(calls)}, timeout, memory_mb)
    got = {}
    done = False
    for r in records:
        if r["k"] == "load":
            return Verdict(False, r["status"], r["detail"], seconds, 0.0)
        if r["k"] == "call" and r["i"] not in got:
            got[r["i"]] = r
        done |= r["k"] == "done"
    n_ok, first = 0, None
    for i, (call, want) in enumerate(zip(calls, expected)):
        r = got.get(i)
        if r is not None and r["ok"] and values_match(decode_value(r["v"]), want):
            n_ok += 1
        elif first is None and r is not None:
            first = (r.get("status", "failed"),
                     f"{call}: " + (f"expected {want!r}, got {decode_value(r['v'])!r}" if r["ok"] else r["detail"]))
    fraction = n_ok / len(calls) if calls else 1.0
    if not done:
        status, detail = _abnormal(rc, timed_out, stderr)
        return Verdict(False, status, detail, seconds, fraction)
    if first is None:
        return Verdict(True, "passed", "", seconds, fraction)
    status, detail = first
    return Verdict(False, "failed" if status == "error" else status, detail[:500], seconds, fraction)


def run_asserts(program: str, test_code: str, entry_point: str = "", setup: str = "",
                check: bool = True, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Verdict:
    """Run `setup` + `program`, then assert-style `test_code` in the same namespace.

    Results of calls to `candidate` or `entry_point` must be exact builtin values. With
    `entry_point` and `check`, `check(<entry_point>)` runs after the test code (HumanEval);
    MBPP passes check=False (its asserts call the function directly).
    Passed only when the runner reaches the end of the tests and reports it with the nonce.
    """
    records, stderr, rc, timed_out, seconds = _run(
        {"mode": "asserts", "program": program, "setup": setup, "test_code": test_code,
         "entry_point": entry_point, "check": check}, timeout, memory_mb)
    for r in records:
        if r["k"] in ("load", "end"):
            ok = r["status"] == "passed"
            return Verdict(ok, r["status"], r.get("detail", ""), seconds, float(ok))
    status, detail = _abnormal(rc, timed_out, stderr)
    return Verdict(False, status, detail, seconds, 0.0)


def run_job(job: dict) -> Verdict:
    """One job dict: run_calls kwargs (has "calls") or run_asserts kwargs (has "test_code")."""
    return run_calls(**job) if "calls" in job else run_asserts(**job)


def run_many(jobs: list[dict], workers: int | None = None, progress: bool = False) -> list[Verdict]:
    """Run jobs (see run_job) in parallel, `workers` at a time (default os.cpu_count()); order kept."""
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(run_job, jobs)
        if progress:
            from tqdm.auto import tqdm
            results = tqdm(results, total=len(jobs), desc="sandbox", leave=False)
        return list(results)
