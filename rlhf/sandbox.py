"""Run untrusted generated Python programs; verdicts are decided outside them.

Isolation (docs/SANDBOX.md has the threat model): each program runs in new network, PID, IPC,
UTS and mount namespaces of its own, and in cgroups of its own where this process may make them
(memory and tasks of the program as a whole). A set-up process per evaluating process (the zygote, started
once with util-linux `unshare`) builds a read-only view of the file system (only /usr, the
interpreter and four /dev nodes exist; no /proc, no host name) and pivots its root there; for
each program it forks a process that takes the new namespaces, mounts a private size-limited tmpfs
as the program's work dir, drops to a uid of its own (root) or all capabilities (user namespace)
and forks the program's process, which sets a seccomp deny list and rlimits before any of the
program's code runs (no_new_privs is set for all of them). The program's PID namespace has a
supervisor as init, holding a lifeline pipe from us: when the run ends (or we die, or a watchdog
thread finds the run past its deadline) it leaves and the kernel kills everything else in the
namespace. No program code runs in the zygote. An
audit hook (PEP 578) inside refuses sockets, processes, ctypes, ... as an extra layer only.
SANDBOX_MODE="weak" (an explicit opt-in) keeps the hook, the limits and a separate uid but no
namespaces, and starts an interpreter per program.

Verdicts: the program never sees a test. The trusted side (this process) sends it call
requests over a pipe and gets back strictly encoded builtin values (or the exception's name):
  run_calls(program, calls, expected)   the project's format: the program evaluates each call
      expression; the values are compared here with `expected`.
  run_asserts(program, test_code, ...)  HumanEval/MBPP asserts run here, in a namespace built
      from the trusted prompt helpers; every call of `candidate`/the entry point (or any other
      name the tests take from the program) is proxied to the program as encoded values.
  run_stdio(program, stdin_tests)       APPS/CodeContests style: the program runs as a script per
      test, the input on its stdin; its stdout comes back and is compared here with the output.
Anything malformed, oversized, late or missing from the program is that sample's verdict
("error"/"timeout"), never an exception here; reading a reply counts against the deadline, whatever
its shape. run_many(jobs) runs many in parallel threads; run_unique(jobs) runs each distinct job once.
"""
from __future__ import annotations

import ast
import atexit
import builtins
import concurrent.futures
import dataclasses
import errno
import functools
import heapq
import importlib.util
import itertools
import json
import marshal
import math
import os
import platform
import reprlib
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import config as C
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
_AUDIT_HOOK = True         # tests switch it off to check that the kernel boundary holds on its own

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


# --------------------------------------------------------------------------- child side
# Passed with -c. Namespaces: zygote() runs once per evaluating process and backend, as root
# (or userns root) inside new namespaces made by util-linux `unshare`. It builds the read-only
# file system view, then waits on its control socket; each message there is one program's limits
# and four pipe ends. For each it forks keeper(), which takes new namespaces of the
# program's own and forks the program's pid 1; that one mounts the program's /work,
# drops privileges and forks the worker: pid 1 stays as supervise(), the worker installs seccomp
# and limits, then serve() reads requests from its request pipe and answers on its reply pipe.
# The keeper waits for pid 1 (which the kernel lets go only when every process of the program's
# PID namespace is gone) and writes its exit status on the status pipe. No program code ever runs
# in the zygote or the keeper. Weak mode: main() applies the limits and serves, nothing else.
RUNNER = r'''
import os, sys
NEWNS, NEWUTS, NEWIPC, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

def kernel():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def check(ret, what):
        if ret != 0:
            e = ctypes.get_errno()
            raise OSError(e, what + ": " + os.strerror(e))
    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(),
                         ctypes.c_ulong(flags), data and data.encode()), "mount " + dst)
    return ctypes, libc, check, mount

def build_root(cfg, libc, check, mount):
    # the file system every program sees, built once: a small read-only tmpfs holding read-only
    # binds of /usr, the interpreter and four /dev nodes; the host tree is detached. No /proc:
    # even a program's own would show the host (mountinfo: devices and paths; cgroup paths;
    # cmdline, boot id, locks, load of everything else). No host name either: every program's UTS
    # namespace is a copy of this one
    check(libc.sethostname(b"sandbox", 7), "sethostname")
    check(libc.setdomainname(b"(none)", 6), "setdomainname")
    R = cfg["mountpoint"]
    os.umask(0o022)  # the skeleton must be traversable by the program's uid
    mount(None, "/", None, REC | PRIVATE)  # nothing we mount propagates back to the host
    mount("tmpfs", R, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=2048,mode=755")
    for kind, path, arg in cfg["entries"]:
        dst = R + path
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if kind == "link":
            os.symlink(arg, dst)
            continue
        if kind == "dev":
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o666))
        else:
            os.mkdir(dst)
        mount(path, dst, None, BIND)
        # read-only; keep the source's flags (a user namespace may not clear locked ones)
        mount(None, dst, None, REMOUNT | BIND | RDONLY | NOSUID | arg | (0 if kind == "dev" else NODEV))
    os.mkdir(R + "/work")
    os.symlink("work", R + "/tmp")
    os.symlink("/work", R + "/dev/shm")  # POSIX semaphores and shared memory, privately
    os.chdir(R)
    check(libc.syscall(cfg["sys_pivot_root"], b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "umount old root")  # MNT_DETACH: the host tree is gone
    os.chdir("/")
    mount(None, "/", None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: no setuid gains

def zygote(cfg):
    import _socket, marshal
    ctypes, libc, check, mount = kernel()
    build_root(cfg, libc, check, mount)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    ctl = _socket.socket(fileno=cfg["control"])
    while True:
        try:  # reap finished keepers (their CPU time then counts as the evaluating process's children's)
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        data, anc, _, _ = ctl.recvmsg(1 << 16, _socket.CMSG_SPACE(32))  # 4 pipe ends, up to 4 cgroups
        if not data:  # the evaluating process closed the socket, or died
            os._exit(0)
        fds = []
        for level, kind, raw in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw) - 3, 4)]
        try:
            pid = os.fork() if len(fds) >= 4 else -1
        except OSError:  # the evaluating side sees the status pipe close: "could not start"
            pid = -1
        if pid == 0:
            try:
                ctl.close()
                keeper(marshal.loads(data), fds, cfg["userns"], ctypes, libc, check, mount)
            except BaseException as e:
                report(fds[3], e)
            os._exit(0)
        for fd in fds:
            os.close(fd)

def report(status, e):
    # a set-up failure, for the evaluating side (the status pipe is trusted: no program holds it)
    try:
        os.write(status, ("E sandbox set-up failed: %s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
    except BaseException:
        pass

def keeper(job, fds, userns, ctypes, libc, check, mount):
    # new namespaces for one program, its pid 1, then report how that pid 1 ended
    request, reply, lifeline, status = fds[:4]
    check(libc.unshare(NEWNS | NEWUTS | NEWIPC | NEWPID | NEWNET), "unshare")
    init = os.fork()
    if init == 0:
        try:
            program_init(job, fds, userns, ctypes, libc, check, mount)
        except BaseException as e:
            report(status, e)
        os._exit(1)
    for fd in [request, reply, lifeline] + fds[4:]:
        os.close(fd)
    _, st = os.waitpid(init, 0)
    os.write(status, b"X %d\n" % st)

def program_init(job, fds, userns, ctypes, libc, check, mount):
    # pid 1 of the program's PID namespace, in a mount namespace of its own
    request, reply, lifeline, status = fds[:4]
    for fd in fds[4:]:  # the program's own cgroups (`tasks` or cgroup.procs, opened by the evaluating side): join them
        os.write(fd, b"0")
        os.close(fd)
    own = "" if userns else ",uid=%d,gid=%d" % (job["uid"], job["uid"])
    mount("tmpfs", "/work", "tmpfs", NOSUID | NODEV,
          "size=%dk,nr_inodes=%d,mode=700%s" % (job["disk_kb"], job["inodes"], own))
    if userns:  # root of a user namespace: drop every capability, bounding set first
        cap = 0
        while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP until EINVAL
            cap += 1
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        check(libc.capset(hdr, (ctypes.c_uint32 * 6)()), "capset")
    else:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])  # leaving uid 0 clears every capability
    os.chdir("/work")
    # PR_SET_DUMPABLE 0 before the worker exists (it inherits it): neither this process nor the
    # worker can be read, written or opened through by the program's uid (process_vm_writev is
    # not in the seccomp list; it needs what ptrace needs)
    libc.prctl(4, 0, 0, 0, 0)
    worker = os.fork()
    if worker:
        for fd in (request, reply, status):
            os.close(fd)
        supervise(worker, lifeline, libc)
    os.close(lifeline)
    if job["seccomp"]:
        seccomp(libc, ctypes, job["seccomp"], job["sys_seccomp"])
    limits(job)
    unmarshal = __import__("marshal").loads
    for name in ("ctypes", "ctypes._endian", "_ctypes", "_socket"):  # the audit hook refuses their import
        sys.modules.pop(name, None)
    os.dup2(request, 0)
    os.dup2(reply, 1)
    os.closerange(3, 1 << 12)  # the status pipe and anything else of the zygote's
    try:
        serve(job, unmarshal)
    finally:
        os._exit(0)

def seccomp(libc, ctypes, code, sys_seccomp):
    # the BPF program built by _seccomp_filter() on the trusted side; no_new_privs is set
    import struct
    filt = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(filt)), 16)
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW): without the flag, kernels
    # whose Spectre mitigations are in "seccomp" mode add barriers (IBPB/STIBP, SSBD) on every
    # switch to this task. They protect the task from others, not others from it, and the
    # program is the attacker here; Docker passes the flag too (moby pull request 41889)
    if libc.syscall(sys_seccomp, 1, 4, fprog) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")

def supervise(worker, lifeline, libc):
    # pid 1 of the namespace: the program runs in `worker`. This process leaves when the
    # evaluating process closes the lifeline (or dies), or when the worker exits (its status
    # becomes our exit code, 128 + signal); either way the kernel then kills everything else
    # in the namespace. Signals from inside the namespace cannot kill a namespace's init.
    import select
    fds = [lifeline]
    try:
        fds.append(os.pidfd_open(worker))
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: the lifeline only
        pass
    while lifeline not in select.select(fds, [], [])[0]:
        pid, status = os.waitpid(worker, os.WNOHANG)
        if pid:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    os._exit(0)

def limits(cfg):
    import resource, _signal
    for res, value in ((resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_AS, cfg["memory"]),
                       (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_NPROC, cfg["nproc"])):
        if value >= 0:
            resource.setrlimit(res, (value, value + (res == resource.RLIMIT_CPU)))
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # a flood gets EFBIG, not a silent kill

def main():
    # only builtin and C modules from here on: json, signal or types would pull in re, enum
    # and collections, ~10 ms of start-up per program (weak mode starts one per program)
    import marshal
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    if cfg.get("zygote"):
        zygote(cfg)
    limits(cfg)
    serve(cfg, marshal.loads)

def serve(cfg, unmarshal):
    import _json
    cin, cout = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    esc_json = _json.encode_basestring_ascii
    esc = lambda s: esc_json(s).replace("[", "\\u005b")  # each "[" of a record is then a value's (MAX_VALUES)
    write, read, type_, str_, repr_, len_ = os.write, os.read, type, str, repr, len
    compile_, exec_, eval_, int_, float_, complex_ = compile, exec, eval, int, float, complex
    BaseException_, MemoryError_, PermissionError_, AssertionError_ = BaseException, MemoryError, PermissionError, AssertionError
    buf = [b""]

    def send(text):
        data = (text + "\n").encode("utf-8", "replace")
        while data:
            data = data[write(cout, data):]

    def recv():
        parts, tail = [], buf[0]
        while b"\n" not in tail:  # a stdin test's input can be megabytes: linear, not quadratic
            chunk = read(cin, 1 << 16)
            if not chunk:
                return None
            parts.append(tail)
            tail = chunk
        head, _, buf[0] = tail.partition(b"\n")
        return unmarshal(bytes.fromhex((b"".join(parts) + head).decode()))  # trusted: from the evaluating process

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

    # ---- strict values: exact builtin types, recursively (the trusted side decodes them)
    def encode(v, depth=0):
        t = type_(v)
        if depth > %(depth)d:
            raise ValueError("value nested too deeply")
        if v is None:
            return '["n"]'
        if t is bool:
            return '["b",' + ("true" if v else "false") + "]"
        if t is int or t is float or t is complex:
            return '["' + ("i" if t is int else "f" if t is float else "c") + '",' + esc(repr_(v)) + "]"
        if t is str_:
            return '["s",' + esc(v) + "]"
        if t is dict:
            return '["d",[' + ",".join("[" + encode(k, depth + 1) + "," + encode(x, depth + 1) + "]"
                                       for k, x in v.items()) + "]]"
        if t is list or t is tuple or t is set or t is frozenset:
            tag = "l" if t is list else "t" if t is tuple else "S" if t is set else "F"
            return '["' + tag + '",[' + ",".join(encode(x, depth + 1) for x in v) + "]]"
        raise TypeError("non-builtin value of type " + t.__name__)

    job = recv()
    if job.get("stdio"):
        return serve_stdio(cfg, job, recv, send, esc, describe)
    module = type(sys)("__sandbox__")
    sys.modules["__sandbox__"] = module
    ns = module.__dict__
    if cfg["audit_hook"]:
        sys.addaudithook(make_hook(os.getcwd()))
    try:
        if job.get("setup"):
            exec_(compile_(job["setup"], "<setup>", "exec"), ns)
        exec_(compile_(job["program"], "<program>", "exec"), ns)
    except BaseException_ as e:
        st = status_of(e)
        send('{"ok":false,"status":' + esc("error" if st == "failed" else st) + ',"detail":' + esc(describe(e)) + "}")
        return
    send('{"ok":true}')
    while True:
        req = recv()
        if req is None:
            return
        for call in req.get("calls") or [None]:  # the project's calls come in one request
            try:
                if call is not None:
                    v = eval_(compile_(call, "<tests>", "eval"), ns)
                else:
                    fn = ns.get(req["fn"])
                    if fn is None:
                        raise NameError("name " + repr_(req["fn"]) + " is not defined")
                    v = fn(*req["args"], **req["kwargs"])
                text = encode(v)
            except BaseException_ as e:
                send('{"ok":false,"status":' + esc(status_of(e)) + ',"exc":' + esc(type_(e).__name__) +
                     ',"detail":' + esc(describe(e)) + "}")
                continue
            send('{"ok":true,"v":' + text + "}")

def serve_stdio(cfg, job, recv, send, esc, describe):
    # a stdin/stdout program: compiled once here, then run as a script in a fresh process per test,
    # the test's input on its stdin; its stdout (at most cfg["stdout_max"] + 1 bytes), exit code
    # and uncaught exception go back, to be compared on the trusted side. No code of the program
    # runs in this process, so the audit hook goes into each test's process only.
    try:
        code = compile(job["program"], "<program>", "exec")
    except BaseException as e:
        send('{"ok":false,"status":"error","detail":' + esc(describe(e)) + "}")
        return
    send('{"ok":true}')
    while True:
        req = recv()
        if req is None:
            return
        stdin_r, stdin_w = os.pipe()
        out, why = os.memfd_create("stdout"), os.memfd_create("exception")
        pid = os.fork()
        if pid == 0:
            os._exit(run_script(cfg, code, stdin_r, out, why, describe))
        os.close(stdin_r)
        try:
            data = req["stdin"].encode("utf-8", "surrogateescape")
            while data:  # it may stop reading, or exit, before the end: its choice
                data = data[os.write(stdin_w, data[:1 << 16]):]
        except OSError:
            pass
        os.close(stdin_w)
        _, st = os.waitpid(pid, 0)
        if "disk_kb" in cfg:  # namespaces: what it left running in its group (a setsid one lives until the run ends)
            try:
                os.killpg(pid, 9)
            except OSError:
                pass
        text, exc = os.pread(out, cfg["stdout_max"] + 1, 0), os.pread(why, 1000, 0)
        os.close(out)
        os.close(why)
        rc = 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        send('{"ok":true,"out":"' + text.hex() + '","exit":%d,"detail":' % rc
             + esc(exc.decode("utf-8", "replace")) + "}")

def run_script(cfg, code, stdin_r, out, why, describe):
    # the process of one stdin test: the program as __main__ reading fd 0, writing fd 1; exit code
    try:
        if "disk_kb" in cfg:  # namespaces: a group of its own, killed after the test (weak mode: the
            os.setpgid(0, 0)  # runner's group, killed as a whole at the end of the run)
        os.dup2(stdin_r, 0)
        os.dup2(out, 1)
        os.dup2(why, 3)
        os.closerange(4, 1 << 12)  # the runner's request and reply pipes among them
        sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", errors="surrogateescape", closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)
        sys.argv = ["main.py"]
        if cfg["audit_hook"]:
            sys.addaudithook(make_hook(os.getcwd()))
    except BaseException as e:
        os.write(3, ("sandbox set-up failed: " + describe(e)).encode("utf-8", "replace"))
        return 1
    rc = 0
    try:
        # exit() and quit() as `site` defines them (the interpreter runs with -S): judges' scripts use them
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "exit": sys.exit, "quit": sys.exit})
        if "threading" in sys.modules:  # as the interpreter does at exit: wait for non-daemon threads
            sys.modules["threading"]._shutdown()
    except SystemExit as e:
        rc = e.code if type(e.code) is int else 0 if e.code is None else 1
    except BaseException as e:
        rc = 1
        try:
            os.write(3, describe(e).encode("utf-8", "replace"))
        except BaseException:
            pass
    try:
        sys.stdout.flush()
    except BaseException as e:
        rc = rc or 1
        try:
            os.write(3, describe(e).encode("utf-8", "replace"))
        except BaseException:
            pass
    return rc & 255

def make_hook(root):
    # An extra layer only (the program can reach it): refuse what a solution never needs.
    type_, str_, repr_, len_, any_ = type, str, repr, len, any
    PermissionError_ = PermissionError
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
    readable = tuple(p for p in sys.path if p) + (root, "/dev/null", "/dev/urandom")
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def norm(p):
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
            writing = (type_(mode) is str_ and any_(c in mode for c in "wax+")) or (
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
            # the last argument is dir_fd; -1 (Python 3.11) and None mean "none given"
            if len_(args) > 2 and event != "os.rename" and type_(args[-1]) is int and args[-1] != -1:
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
        elif event.startswith(refused_prefixes):
            refuse(event)
    return hook

try:
    main()
except BaseException as e:  # set-up failures reach the trusted side's stderr pipe
    os.write(2, ("sandbox set-up failed: %s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
    os._exit(1)
finally:
    os._exit(0)
'''.replace("%(depth)d", str(MAX_DEPTH))


# --------------------------------------------------------------------------- isolation set-up
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}
# seccomp: (AUDIT_ARCH_*, syscalls refused with EPERM, clone, clone3, fcntl), from the kernel's
# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h. The last row of
# each list: state a program could attach to a file that other programs see too (the read-only
# /usr, the interpreter, /dev/null...), i.e. a channel between programs running side by side:
# flock, inotify_init(1), inotify_add_watch, fanotify_init/mark, and page-cache residency
# (mincore, cachestat); fcntl's locks, leases and dnotify are refused by command (_FCNTL_DENY)
_X86_64_DENY = [272, 308, 165, 166, 155, 161, 101, 250, 248, 249, 321, 298, 323, 425, 426, 427, 246, 320,
                175, 313, 176, 304, 303, 428, 429, 430, 431, 432, 433, 442, 103, 179, 163, 167, 168, 169,
                73, 253, 294, 254, 300, 301, 27, 451]
_GENERIC_DENY = [97, 268, 40, 39, 41, 51, 117, 219, 217, 218, 280, 241, 282, 425, 426, 427, 104, 294,
                 105, 273, 106, 265, 264, 428, 429, 430, 431, 432, 433, 442, 116, 60, 89, 224, 225, 142,
                 32, 26, 27, 262, 263, 232, 451]
# F_GETLK F_SETLK F_SETLKW (and their 64-bit twins), F_OFD_GETLK/SETLK/SETLKW, F_SETLEASE F_GETLEASE F_NOTIFY
_FCNTL_DENY = [5, 6, 7, 12, 13, 14, 36, 37, 38, 1024, 1025, 1026]
_SECCOMP = {"x86_64": (0xC000003E, _X86_64_DENY, 56, 435, 72), "aarch64": (0xC00000B7, _GENERIC_DENY, 220, 435, 25),
            "riscv64": (0xC00000F3, _GENERIC_DENY, 220, 435, 25)}


@functools.lru_cache(maxsize=None)
def _seccomp_filter(machine: str) -> bytes | None:
    """Classic-BPF seccomp program (struct sock_filter array) for this CPU, or None.

    The syscalls that open kernel attack surface no solution needs (new namespaces: a nested
    user namespace would give back capabilities; mounts, ptrace, keys, bpf, perf, io_uring,
    modules, kexec) and those that attach state to shared files (locks, leases, file
    notifications, page-cache residency) fail with EPERM; clone3 gets ENOSYS so libc falls back
    to clone, whose namespace flags are checked; another ABI (x32, i386) kills the process.
    """
    if machine not in _SECCOMP:
        return None
    arch, deny, clone, clone3, fcntl = _SECCOMP[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    prog = [(LD, 0, 0, 4), (JEQ, 0, "kill", arch), (LD, 0, 0, 0), (JGE, "kill", 0, 0x40000000)]
    prog += [(JEQ, "eperm", 0, nr) for nr in deny]
    prog += [(JEQ, "enosys", 0, clone3), (JEQ, 0, "clone", fcntl), (LD, 0, 0, 24)]  # fcntl's command (low word)
    prog += [(JEQ, "eperm", 0, cmd) for cmd in _FCNTL_DENY] + [(JEQ, "allow", "allow", 0)]
    labels = {"clone": len(prog)}
    prog += [(JEQ, 0, "allow", clone), (LD, 0, 0, 16),  # clone's flags
             (JSET, "eperm", "allow", 0x7E020000)]  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
    n = len(prog)
    labels.update(allow=n, eperm=n + 1, enosys=n + 2, kill=n + 3)
    prog += [(RET, 0, 0, 0x7FFF0000), (RET, 0, 0, 0x00050001), (RET, 0, 0, 0x00050026), (RET, 0, 0, 0x80000000)]
    return b"".join(struct.pack("HBBI", op, labels[jt] - i - 1 if jt else 0, labels[jf] - i - 1 if jf else 0, k)
                    for i, (op, jt, jf, k) in enumerate(prog))


def _flags_of(path: str) -> int:
    """Mount flags of `path` that a read-only re-mount must keep (MS_NOSUID.. MS_RELATIME)."""
    f = os.statvfs(path).f_flag
    keep = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # ST_* -> MS_*
    return sum(ms for st, ms in keep.items() if f & st)


@functools.lru_cache(maxsize=None)
def _fs_view() -> tuple[str, str, list]:
    """(interpreter, mount point, entries) for the child's file system: /usr, the interpreter's
    prefix, /bin /lib.. (symlinks or read-only binds) and /dev/null, zero, random, urandom."""
    exe = os.path.realpath(sys.executable)
    entries = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr"):
        if os.path.islink(top):
            entries.append(("link", top, os.readlink(top)))
        elif os.path.isdir(top):
            entries.append(("dir", top, _flags_of(top)))
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        if not any(prefix == e[1] or prefix.startswith(e[1] + "/") for e in entries if e[0] == "dir"):
            entries.append(("dir", prefix, _flags_of(prefix)))
    for dev in ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"):
        entries.append(("dev", dev, _flags_of(dev)))
    used = [e[1] for e in entries]
    mountpoint = next((d for d in ("/mnt", "/media", "/srv", "/opt", "/tmp") if os.path.isdir(d) and
                       not os.path.islink(d) and not any(u == d or u.startswith(d + "/") for u in used)), None)
    return exe, mountpoint, entries


@functools.lru_cache(maxsize=None)
def _backend(mode: str) -> str:
    """"root" (namespaces + own uid), "userns" (namespaces in a user namespace) or "weak";
    SandboxUnavailable when the configured mode cannot run here (checked once per process)."""
    _cgroups()  # found (or said to be missing) once, before the first program
    if mode == "weak":
        if os.geteuid() == 0:
            _weak_interpreter()  # raises when no interpreter can run unprivileged
        return "weak"
    if mode != "namespaces":
        raise SandboxUnavailable(f"SANDBOX_MODE must be 'namespaces' or 'weak', not {mode!r}")
    reasons = []
    if not shutil.which("unshare"):
        reasons.append("util-linux `unshare` is not installed")
    elif _PIVOT_ROOT.get(platform.machine()) is None:
        reasons.append(f"no pivot_root syscall number known for {platform.machine()}")
    elif _fs_view()[1] is None:
        reasons.append("no directory to build the sandbox's root on")
    else:
        for backend in (["root"] if os.geteuid() == 0 else []) + ["userns"]:
            v = _run_calls_with(backend, "def f():\n    return 1\n", ["f()"], [1], "", 30.0)
            if v.passed:
                return backend
            reasons.append(f"{backend}: {v.detail}")
    raise SandboxUnavailable(
        "the sandbox cannot isolate generated programs here (" + "; ".join(reasons)[:400] + "). Fix: run as "
        "root (as CI and containers do), or allow unprivileged user namespaces (sysctl "
        "kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0), or accept "
        "the weaker audit-hook sandbox with --SANDBOX_MODE=weak (not safe against hostile code, docs/SANDBOX.md)")


def active_mode() -> str:
    """What isolation runs programs, for reports: 'namespaces (...)' or 'weak (...)'."""
    return {"root": "namespaces (root: a uid per sample)", "userns": "namespaces (user namespace)",
            "weak": "weak (audit hook and limits only)"}[_backend(C.SANDBOX_MODE)]


@functools.lru_cache(maxsize=None)
def _weak_interpreter() -> str:
    """Weak mode as root: an interpreter the sample uids can execute (a pyenv Python under /root
    cannot be), or SandboxUnavailable; never a fallback to running programs as root."""
    for exe in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", sys.executable),
                              "/usr/bin/python3", "/usr/local/bin/python3"]):
        if not os.path.exists(exe):
            continue
        try:
            probe = subprocess.run([exe, "-I", "-S", "-B", "-c", "import resource, json, types"],
                                   user=UID_BASE, group=UID_BASE, extra_groups=[], cwd="/", env={},
                                   capture_output=True, timeout=30)
        except PermissionError:
            continue
        if probe.returncode == 0:
            return exe
    raise SandboxUnavailable(f"SANDBOX_MODE=weak as root: no Python interpreter is executable by uid {UID_BASE}; "
                             "install python3 under /usr, or use the default SANDBOX_MODE=namespaces")


# --------------------------------------------------------------------------- a cgroup per program
# rlimits bound each process; a program of SANDBOX_MAX_PROCS processes could still hold that many
# times SANDBOX_MEMORY_MB. Where this process may create cgroups below its own (root, or a delegated
# subtree), each program gets one per hierarchy: its memory as a whole (all its processes, its
# tmpfs, the kernel's memory for it) at most SANDBOX_MEMORY_MB, at most SANDBOX_MAX_PROCS tasks,
# removed after the run. They live under rlhf-sandbox-<pid>, one folder per evaluating process.
_CGROUP_FILES = {  # (controller, version): [(file, value)], each written where the kernel has the file
    ("memory", 1): [("memory.limit_in_bytes", "memory"), ("memory.memsw.limit_in_bytes", "memory")],
    ("memory", 2): [("memory.max", "memory"), ("memory.swap.max", "0"), ("memory.oom.group", "1")],
    ("pids", 1): [("pids.max", "procs")], ("pids", 2): [("pids.max", "procs")]}


def _cgroup_bases(mountinfo: str, cgroups: str) -> dict[str, tuple[str, int]]:
    """Per controller ("memory", "pids"): (the directory of this process's own cgroup, version 1 or
    2), from the text of /proc/self/mountinfo and /proc/self/cgroup. A controller bound to a v1
    hierarchy is not in the v2 one."""
    own_v1, own_v2 = {}, None  # controller -> our path; our v2 path
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and not parts[1]:
            own_v2 = parts[2]
        for ctrl in filter(None, parts[1].split(",")):
            own_v1[ctrl] = parts[2]
    bases = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        root, point, v1 = fields[3], fields[4].replace("\\040", " "), rfields[0] == "cgroup"
        for ctrl in ("memory", "pids"):
            path = own_v1.get(ctrl) if v1 else None if ctrl in own_v1 else own_v2
            if path is None or v1 and ctrl not in rfields[2].split(",") or ctrl in bases:
                continue
            if root != "/" and not (path == root or path.startswith(root + "/")):
                continue  # this mount does not show our cgroup
            rel = path[len(root):] if root != "/" else path
            bases[ctrl] = (point.rstrip("/") + rel.rstrip("/"), 1 if v1 else 2)
    return bases


def _write(path: str, value) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


_cgroups_lock = threading.Lock()


def _cgroups() -> tuple:
    """The cgroup parents every program gets a child of, found once per evaluating process:
    ((parent directory, ((file, value), ...)), ...); () where none is writable, said once on stderr
    with the reason."""
    with _cgroups_lock:  # the first programs may start in several threads at once
        return _find_cgroups()


@functools.lru_cache(maxsize=None)
def _find_cgroups() -> tuple:
    try:
        with open("/proc/self/mountinfo") as f, open("/proc/self/cgroup") as g:
            bases = _cgroup_bases(f.read(), g.read())
    except OSError as e:
        bases, why = {}, {"memory": str(e), "pids": str(e)}
    else:
        why = {c: "no cgroup hierarchy with it is mounted" for c in ("memory", "pids") if c not in bases}
    parents = {}  # directory -> files
    for ctrl, (base, version) in bases.items():
        parent = f"{base}/rlhf-sandbox-{os.getpid()}"
        try:
            if version == 2:  # a v2 child has a controller only where its parent passes it down
                with open(base + "/cgroup.subtree_control") as f:
                    if ctrl not in f.read().split():
                        _write(base + "/cgroup.subtree_control", "+" + ctrl)  # EBUSY where base holds processes
            _remove_stale_cgroups(base)
            os.makedirs(parent, exist_ok=True)
            if version == 2:
                _write(parent + "/cgroup.subtree_control", "+" + ctrl)
            files = [(n, v) for n, v in _CGROUP_FILES[ctrl, version] if os.path.exists(f"{parent}/{n}")]
            if not files or files[0][1] != {"memory": "memory", "pids": "procs"}[ctrl]:
                raise OSError(errno.ENOENT, f"{_CGROUP_FILES[ctrl, version][0][0]} missing in {parent}")
            parents.setdefault(parent, []).extend(files)
        except OSError as e:
            why[ctrl] = f"{base}: {e.strerror or e}"
    found = tuple((parent, tuple(files)) for parent, files in parents.items() if _cgroup_works(parent, files))
    for parent, files in parents.items():
        if (parent, tuple(files)) not in found:
            why.update((ctrl, f"{parent}: a process cannot be moved in") for ctrl in ("memory", "pids")
                       if any(n.startswith(ctrl) for n, _ in files))
    if why:
        bound = {"memory": "memory per process (RLIMIT_AS)", "pids": "processes by RLIMIT_NPROC"}
        print(f"sandbox: no cgroup for {' and '.join(sorted(why))} ({'; '.join(why.values())[:300]}): a program's "
              f"{' and '.join(bound[c] for c in sorted(why))} only, not as a whole; docs/SANDBOX.md", file=sys.stderr)
    if found:
        owner = os.getpid()

        def remove_parents():  # a forked copy of this process leaves them to us
            if os.getpid() == owner:
                _remove_cgroups([])  # children left over first
                _remove_cgroups([parent for parent, _ in found])
        atexit.register(remove_parents)
    return found


def _cgroup_works(parent: str, files) -> bool:
    """Whether a child of `parent` takes its limits and a process of ours (tried once, with `sleep`)."""
    path = f"{parent}/probe"
    try:
        os.makedirs(path, exist_ok=True)
        for name, value in files:
            _write(f"{path}/{name}", {"memory": 64 << 20, "procs": 8}.get(value, value))
        probe = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, close_fds=True)
        try:
            _write(path + "/cgroup.procs", probe.pid)
            return True
        finally:
            probe.kill()
            probe.wait()
    except OSError:
        return False
    finally:
        _remove_cgroups([path])


_cgroup_seq = itertools.count()
_leftover_cgroups: list[str] = []  # could not be removed yet (retried with the next ones and at exit)


def _make_cgroups(memory_bytes: int, procs: int) -> tuple[list[str], list[int]]:
    """One program's own cgroups, limits written: (their directories, the file that moves a task
    into each, opened for writing, for the program's pid 1 to join them with a write of "0")."""
    paths, fds = [], []
    try:
        for parent, files in _cgroups():
            path = f"{parent}/{os.getpid()}-{next(_cgroup_seq)}"
            os.mkdir(path)
            paths.append(path)
            for name, value in files:
                _write(f"{path}/{name}", {"memory": memory_bytes, "procs": procs}.get(value, value))
            # v1: "0" written to `tasks` moves the writing thread only, without the global lock a
            # cgroup.procs write takes (an RCU grace period each: ~7 ms per program measured here);
            # pid 1 is single-threaded when it writes. v2 has no such file: cgroup.procs
            join = path + "/tasks" if os.path.exists(path + "/tasks") else path + "/cgroup.procs"
            fds.append(os.open(join, os.O_WRONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        _remove_cgroups(paths)
        raise
    return paths, fds


def _remove_cgroups(paths: list[str], kill: bool = False) -> None:
    """rmdir each cgroup (a cgroup goes only once its last process is reaped: a few tries); with
    `kill`, SIGKILL what is left in it first (weak mode: a runner's setsid grandchildren)."""
    retry, _leftover_cgroups[:] = _leftover_cgroups[:], []
    for path in list(paths) + retry:
        for attempt in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 49:
                    _leftover_cgroups.append(path)
                    break
                if kill:
                    try:
                        with open(path + "/cgroup.procs") as f:
                            for pid in f.read().split():
                                os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                time.sleep(0.002)


def _remove_stale_cgroups(base: str) -> None:
    """The folders of evaluating processes that died without removing theirs."""
    try:
        names = [n for n in os.listdir(base) if n.startswith("rlhf-sandbox-") and n[13:].isdigit()]
    except OSError:
        return
    for name in names:
        try:
            os.kill(int(name[13:]), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        folder = f"{base}/{name}"
        try:
            children = [f"{folder}/{c}" for c in os.listdir(folder) if os.path.isdir(f"{folder}/{c}")]
        except OSError:
            continue
        for path in children + [folder]:
            try:
                os.rmdir(path)
            except OSError:
                pass


_slot_lock = threading.Lock()
_slots_used: set[int] = set()


def _take_slot() -> int:
    with _slot_lock:
        slot = next((s for s in range(256) if s not in _slots_used), 255)  # > 256 workers share the last
        _slots_used.add(slot)
        return slot


def _free_slot(slot: int) -> None:
    with _slot_lock:
        _slots_used.discard(slot)


# --------------------------------------------------------------------------- parent side
class _ChildGone(BaseException):
    """The program broke the protocol, ran out of time or died. A BaseException so that the
    trusted test code's own `except Exception` cannot swallow it."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/work", "LANG": "C.UTF-8"}


class _Zygote:
    """The namespaces' set-up process of one backend (see the RUNNER's description): `unshare`
    starts it once per evaluating process, and it forks every program's namespaces, so that a
    program costs a few forks and mounts instead of an `unshare` exec and a Python start-up."""

    def __init__(self, backend: str):
        exe, mountpoint, entries = _fs_view()
        cfg = {"zygote": True, "userns": backend == "userns", "mountpoint": mountpoint, "entries": entries,
               "sys_pivot_root": _PIVOT_ROOT[platform.machine()]}
        self.pid = os.getpid()  # a forked copy of this process starts its own
        self.err = b""
        self.lock = threading.Lock()
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg["control"] = theirs.fileno()
        argv = ["unshare", "--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child",
                *(["--user", "--map-root-user"] if backend == "userns" else []),
                exe, "-I", "-S", "-B", "-c", RUNNER, marshal.dumps(cfg).hex()]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, cwd="/", env=_ENV, close_fds=True,
                                         start_new_session=True, umask=0o077, pass_fds=(theirs.fileno(),))
        except BaseException:
            self.ctl.close()
            raise
        finally:
            theirs.close()
        os.set_blocking(self.proc.stderr.fileno(), False)

    def spawn(self, job: dict, cgroup_fds: list[int]) -> list[int]:
        """Start one program with these limits, in these cgroups (the files that move a task into
        them, open for writing); returns our ends of its request, reply, lifeline and status pipes.
        OSError when the zygote is gone."""
        pipes = [os.pipe() for _ in range(4)]
        theirs = [pipes[0][0], pipes[1][1], pipes[2][0], pipes[3][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][1], pipes[3][0]]
        try:
            with self.lock:
                socket.send_fds(self.ctl, [marshal.dumps(job)], theirs + cgroup_fds)
        except OSError as e:
            for fd in ours:
                os.close(fd)
            raise OSError(e.errno, f"the sandbox's set-up process is gone: {self.stderr_tail() or e}") from None
        finally:
            for fd in theirs:
                os.close(fd)
        return ours

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def stderr_tail(self) -> str:
        self.err = _read_tail(self.proc.stderr, self.err)
        return self.err.decode("utf-8", "replace").strip()

    def close(self) -> None:
        """Close the control socket: the zygote leaves, and with it (pid 1 of its namespace) every
        program it started."""
        self.ctl.close()
        if self.pid != os.getpid():
            return
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # unshare --kill-child takes the zygote with it
            self.proc.wait()
        self.proc.stderr.close()


def _read_tail(pipe, kept: bytes = b"") -> bytes:
    """The last 2000 bytes of `kept` and what the non-blocking `pipe` holds now."""
    try:
        return (kept + (pipe.read(1 << 16) or b""))[-2000:]
    except (OSError, ValueError):  # nothing to read, or already closed
        return kept


_zygotes: dict[str, _Zygote] = {}
_zygote_lock = threading.Lock()


def _zygote(backend: str) -> _Zygote:
    """This process's zygote for `backend`, started (or restarted) when needed."""
    with _zygote_lock:
        z = _zygotes.get(backend)
        if z is None or not z.alive():
            if z is not None:
                z.close()
            z = _zygotes[backend] = _Zygote(backend)
        return z


def shutdown() -> None:
    """End this process's zygotes (they also end when it exits); the next program starts new ones."""
    with _zygote_lock:
        for z in _zygotes.values():
            z.close()
        _zygotes.clear()


atexit.register(shutdown)


class _Watchdog:
    """Ends every run that is still going GRACE_S after its deadline, from a thread of its own.

    Reading and writing a program's pipes are bounded by its deadline, but a program can also hold
    a pipe in the kernel: a splice() from an empty socket into its reply pipe holds the pipe's lock,
    and our read then waits for that lock, unkillable, for as long as the program lives; and the
    program lives until the thread that waits closes its lifeline. So the run's end must not depend
    on that thread: here it is closing the lifeline (pid 1 leaves, the kernel kills the rest, the
    lock is released) or killing the weak runner's process group. One thread per evaluating process,
    one heap of deadlines; a forked copy starts its own."""

    def __init__(self):
        self.cond, self.heap, self.seq, self.pid = threading.Condition(), [], itertools.count(), None

    def watch(self, child: "_Child") -> None:
        with self.cond:
            if self.pid != os.getpid():  # first use, or a forked copy of the evaluating process
                self.heap.clear()
                threading.Thread(target=self._run, name="sandbox-watchdog", daemon=True).start()
                self.pid = os.getpid()
            heapq.heappush(self.heap, (child.deadline + GRACE_S, next(self.seq), child))
            if self.heap[0][2] is child:
                self.cond.notify()

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                while self.heap and (self.heap[0][0] <= now or self.heap[0][2].ended):
                    heapq.heappop(self.heap)[2].end()
                self.cond.wait(self.heap[0][0] - now if self.heap else None)


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=lambda: _watchdog.__init__())  # no lock held by a thread left behind


class _Child:
    """One sandboxed program and its request/response pipes, all reads bounded by a deadline."""

    def __init__(self, backend: str, timeout: float, memory_mb: int):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.backend = backend
        self.slot = _take_slot()
        self.tmp = self.proc = self.zygote = self.wfd = self.rfd = None
        self.buf = bytearray()
        self.idle = False  # True while the program waits for a request (it may then exit cleanly)
        self.lifeline = None  # namespaces: its write end; closing it ends the whole namespace
        self.lock, self.ended = threading.Lock(), False  # end(): this thread or the watchdog
        self.status_fd, self.status = None, b""  # namespaces: the keeper's report (set-up errors, exit status)
        self.cgroups: list[str] = []  # the program's own cgroups (_make_cgroups), removed by close()
        cgroup_fds: list[int] = []
        cfg = {"audit_hook": _AUDIT_HOOK, "cpu_s": math.ceil(timeout) + 1, "memory": memory_mb << 20,
               "fsize": C.SANDBOX_FILE_SIZE_MB << 20, "nofile": MAX_OPEN_FILES, "nproc": C.SANDBOX_MAX_PROCS,
               "uid": UID_BASE + 256 * os.getpid() + self.slot, "stdout_max": STDOUT_MAX_BYTES}
        try:
            self.cgroups, cgroup_fds = _make_cgroups(memory_mb << 20, C.SANDBOX_MAX_PROCS)
            if backend == "weak":
                self._start_weak(cfg, cgroup_fds)
            else:
                machine = platform.machine()
                cfg.update(disk_kb=C.SANDBOX_DISK_MB << 10, inodes=4096, seccomp=_seccomp_filter(machine),
                           sys_seccomp={"x86_64": 317}.get(machine, 277))
                if backend == "userns":
                    cfg["uid"] = 0
                    if any(name == "pids.max" for _, files in _cgroups() for name, _ in files):
                        cfg["nproc"] = -1  # all programs share one uid here: RLIMIT_NPROC would count them together
                self.zygote = _zygote(backend)
                self.wfd, self.rfd, self.lifeline, self.status_fd = self.zygote.spawn(cfg, cgroup_fds)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in cgroup_fds:
                os.close(fd)
        for fd in (self.wfd, self.rfd):  # a program may drain or fill them too: never wait in a read or write
            os.set_blocking(fd, False)
        _watchdog.watch(self)

    def end(self) -> None:
        """End the run now, from any thread, without waiting on anything the program holds:
        namespaces: pid 1 leaves and the kernel kills the rest; weak: the runner's process group
        is killed. Idempotent; close() still collects what is left."""
        with self.lock:
            if self.ended:
                return
            self.ended = True
            if self.lifeline is not None:
                os.close(self.lifeline)
                self.lifeline = None
            elif self.proc is not None and self.proc.returncode is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _start_weak(self, cfg: dict, cgroup_fds: list[int]) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sandbox-")
        os.chmod(self.tmp, 0o700)
        exe, kw = sys.executable, {}
        if os.geteuid() == 0:  # a uid of its own here too: siblings cannot signal each other
            exe = _weak_interpreter()
            os.chown(self.tmp, cfg["uid"], cfg["uid"])
            kw = dict(user=cfg["uid"], group=cfg["uid"], extra_groups=[])
        else:
            cfg["nproc"] = -1  # RLIMIT_NPROC counts all of the user's processes: leave it
        self.proc = subprocess.Popen([exe, "-I", "-S", "-B", "-c", RUNNER, marshal.dumps(cfg).hex()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=self.tmp, env={**_ENV, "HOME": self.tmp, "TMPDIR": self.tmp},
                                     close_fds=True, start_new_session=True, umask=0o077, **kw)
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        for fd in cgroup_fds:  # before the program arrives: the runner waits for it on its stdin
            os.write(fd, b"%d" % self.proc.pid)

    def _read_status(self, timeout: float) -> bool:
        """Read the keeper's report for up to `timeout` s; True once it is complete (pipe closed)."""
        end = time.monotonic() + timeout
        while self.status_fd is not None:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.status_fd], [], [], left)[0]:
                return False
            chunk = os.read(self.status_fd, 1 << 12)
            if not chunk:
                os.close(self.status_fd)
                self.status_fd = None
                break
            self.status = (self.status + chunk)[-4000:]
        return True

    def _exit_code(self, timeout: float) -> int | None:
        """The program's exit code (128 + signal when killed), or None if not known within `timeout` s."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        self._read_status(timeout)
        for line in self.status.decode("utf-8", "replace").splitlines():
            if line.startswith("X ") and line[2:].isdigit():
                st = int(line[2:])
                return 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        return None

    def _gone(self, default: str) -> _ChildGone:
        """Why the child stopped answering: timeout, memory, or an error with its exit."""
        if time.monotonic() >= self.deadline:
            return _ChildGone("timeout", "time limit exceeded")
        rc = self._exit_code(max(0.0, min(0.5, self.deadline - time.monotonic())))
        if self.proc is None and self._setup_errors():  # its namespaces could not be set up
            return _ChildGone("error", self.stderr_tail()[-300:])
        if rc is None:
            return _ChildGone("error", default)
        if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return _ChildGone("timeout", "CPU time limit exceeded")
        if rc in (-signal.SIGKILL, 128 + signal.SIGKILL):
            return _ChildGone("memory", "killed (memory or process limit)")
        return _ChildGone("error", f"{default} (exit code {rc})")

    def send(self, obj) -> None:
        # marshal: cheap to load for the runner; only this side's values go this way (the
        # program's replies are JSON, parsed strictly here)
        data = (marshal.dumps(obj).hex() + "\n").encode()
        while data:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.wfd], [], left)[1]:
                raise self._gone("time limit exceeded")
            try:
                data = data[os.write(self.wfd, data):]
            except BlockingIOError:  # filled between select and write (the program holds the pipe too)
                continue
            except BrokenPipeError:
                raise self._gone("the program closed its input") from None

    def recv(self) -> dict:
        """The next message: a JSON object of at most READ_BACK_BYTES and MAX_VALUES values; reading
        and parsing it count against the deadline."""
        end = self.buf.find(b"\n")
        while end < 0:
            if len(self.buf) > READ_BACK_BYTES:
                raise _ChildGone("error", f"oversized record (over {READ_BACK_BYTES} bytes)")
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise _ChildGone("timeout", "time limit exceeded")
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except BlockingIOError:  # drained between select and read (the program holds the pipe too)
                continue
            if not chunk:
                raise self._gone("exited before the tests finished")
            end = chunk.find(b"\n")
            if end >= 0:
                end += len(self.buf)
            self.buf += chunk  # a bytearray: appending is amortised O(len(chunk))
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        if len(line) > READ_BACK_BYTES:
            raise _ChildGone("error", f"oversized record (over {READ_BACK_BYTES} bytes)")
        # parsing is one uninterruptible call: bounded first by the number of values (the runner
        # escapes "[" in strings, so each "[" opens a value) and the deadline
        if line.count(b"[") > MAX_VALUES:
            raise _ChildGone("error", f"reply with over {MAX_VALUES} values")
        if time.monotonic() > self.deadline:
            raise _ChildGone("timeout", "time limit exceeded")
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):  # garbage, or nesting deep enough to exhaust the stack
            raise _ChildGone("error", "malformed record") from None
        if type(msg) is not dict or type(msg.get("ok")) is not bool or (
                not msg["ok"] and (msg.get("status") not in STATUSES or msg["status"] == "passed"
                                   or type(msg.get("detail")) is not str)):
            raise _ChildGone("error", "malformed record")
        return msg

    def call_value(self, request: dict | None):
        """Send one call request (None: read the next reply of a batch); its decoded value, or
        (status, detail, exception name) on failure."""
        self.idle = False
        if request is not None:
            self.send(request)
        msg = self.recv()
        self.idle = True
        if not msg["ok"]:
            return None, (msg["status"], msg["detail"][:300], str(msg.get("exc", "")))
        if "v" not in msg:
            raise _ChildGone("error", "malformed record")
        return _decode_strict(msg["v"], self.deadline), None

    def _setup_errors(self) -> list[str]:
        """The keeper's reports of what failed while setting up the program's namespaces."""
        return [line[2:] for line in self.status.decode("utf-8", "replace").splitlines() if line.startswith("E ")]

    def stderr_tail(self) -> str:
        """What went wrong outside the program: set-up errors (namespaces: the keeper's report
        and the zygote's stderr; weak: the runner's stderr)."""
        if self.proc is None:
            self._read_status(0.5)
            parts = self._setup_errors() + [self.zygote.stderr_tail() if self.zygote else ""]
            return "\n".join(x for x in parts if x)[-2000:]
        os.set_blocking(self.proc.stderr.fileno(), False)
        return _read_tail(self.proc.stderr).decode("utf-8", "replace")

    def close(self) -> None:
        """End the run: every process of it is gone when this returns."""
        if self.lifeline is not None:  # namespaces: pid 1 leaves, the kernel kills the rest
            self.end()
        with self.lock:  # weak: from here on the watchdog leaves the process group alone
            self.ended = True
        if self.zygote is not None:
            for fd in (self.wfd, self.rfd):
                if fd is not None:
                    os.close(fd)
            self.wfd = self.rfd = None
            # the keeper closes the status pipe once the program's pid 1 is reaped, which the
            # kernel allows only after every other process of its PID namespace is gone
            if not self._read_status(10.0):
                self.zygote.close()  # only if pid 1 could not leave: end the zygote, all of it
            if self.status_fd is not None:
                os.close(self.status_fd)
                self.status_fd = None
        proc = self.proc
        if proc is not None:  # weak
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            try:  # on EOF an idle runner exits by itself
                if self.idle:
                    proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            try:  # the session's process group: forked children too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            proc.stderr.close()
        if self.cgroups:  # empty by now (weak: but for a setsid grandchild, killed here)
            _remove_cgroups(self.cgroups, kill=proc is not None)
            self.cgroups = []
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        _free_slot(self.slot)


def _decode_strict(enc, deadline: float | None = None):
    """A value from the program's encoding; _ChildGone("error") for anything not exactly valid,
    _ChildGone("timeout") once decoding it runs past `deadline`."""
    try:
        return _Decoder(deadline).value(enc, 0)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        raise _ChildGone("error", "malformed value") from None


_HASH_MODULUS = (1 << 61) - 1  # ints below it in size have distinct hashes (but -1 and -2)


class _Decoder:
    """Rebuilds one reply from the runner's tagged encoding. The work counts against the program's
    deadline, checked every 256 values, and a reply cannot be built to make hash tables quadratic:
    more than SAME_HASH distinct numbers, tuples or frozensets sharing one hash (k * (2**61 - 1)
    for many k, crafted tuples) is refused, since every set or dict built from them, here or by a
    test's `set(candidate(x))`, would cost time in the square of their number. Strings are safe:
    their hashes are salted per process."""

    def __init__(self, deadline: float | None):
        self.deadline, self.count, self.by_hash = deadline, 0, {}

    def value(self, enc, depth):
        self.count += 1
        if not self.count & 255 and self.deadline is not None and time.monotonic() > self.deadline:
            raise _ChildGone("timeout", "time limit exceeded (reading the reply)")
        if depth > MAX_DEPTH + 1 or type(enc) is not list or not enc or type(enc[0]) is not str:
            raise ValueError("bad value")
        tag, rest = enc[0], enc[1:]
        if tag == "n" and not rest:
            return None
        if len(rest) != 1:
            raise ValueError("bad value")
        x = rest[0]
        if tag == "b" and type(x) is bool or tag == "s" and type(x) is str:
            return x
        if tag in ("i", "f", "c") and type(x) is str and len(x) <= MAX_DIGITS + 1:
            v = {"i": int, "f": float, "c": complex}[tag](x)
            if not (tag == "i" and -_HASH_MODULUS < v < _HASH_MODULUS or v != v):  # v != v: nan
                self.distinct_hash(v)
            return v
        if type(x) is not list:
            raise ValueError("bad value")
        if tag == "d":
            out = {}
            for pair in x:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("bad value")
                out[self.value(pair[0], depth + 1)] = self.value(pair[1], depth + 1)
            if len(out) != len(x):  # two equal keys: no dict the program held
                raise ValueError("bad value")
            return out
        kind = {"l": list, "t": tuple, "S": set, "F": frozenset}[tag]
        out = kind(self.value(item, depth + 1) for item in x)
        if len(out) != len(x):  # two equal members: no set the program held
            raise ValueError("bad value")
        if kind is tuple or kind is frozenset:
            self.distinct_hash(out)
        return out

    def distinct_hash(self, v) -> None:
        try:
            seen = self.by_hash.setdefault(hash(v), [])
        except TypeError:  # a tuple holding a list: no set or dict can hold it either
            return
        if not any(s == v for s in seen):
            seen.append(v)
            if len(seen) > SAME_HASH:
                raise _ChildGone("error", f"reply with over {SAME_HASH} distinct values of one hash "
                                          "(built to make hash tables slow)")


def decode_value(enc):
    """Rebuild a value from the runner's tagged encoding (ValueError when malformed)."""
    try:
        return _Decoder(None).value(enc, 0)
    except (TypeError, KeyError, IndexError, RecursionError) as e:
        raise ValueError(f"malformed value: {e}") from None
    except _ChildGone as e:
        raise ValueError(e.detail) from None


def encode_value(v, depth: int = 0):
    """The tagged encoding of an exact builtin value (the inverse of decode_value)."""
    t = type(v)
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    if v is None:
        return ["n"]
    if t is bool:
        return ["b", v]
    if t in (int, float, complex):
        return ["i" if t is int else "f" if t is float else "c", repr(v)]
    if t is str:
        return ["s", v]
    if t is dict:
        return ["d", [[encode_value(k, depth + 1), encode_value(x, depth + 1)] for k, x in v.items()]]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [encode_value(x, depth + 1) for x in v]]
    raise TypeError(f"a value of type {t.__name__} cannot be sent to the program")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 6, 200, 200, 200
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 20


def _short(v) -> str:
    """repr(v) in at most a few hundred characters, in time that does not grow with v's size."""
    return _SHORT.repr(v)


def _exact(v):
    """A stand-in for `v` that equals another one only where the types are the same at every depth
    (1, 1.0, True and 1+0j are four keys; (1,) and (True,) two), to compare dict keys and set members."""
    t = type(v)
    if t is tuple:
        return t, tuple(_exact(x) for x in v)
    if t is frozenset:
        return t, frozenset(_exact(x) for x in v)
    return t, v


def values_match(got, want) -> bool:
    """Exact types at every depth, dict keys and set members included (1 != 1.0 != True); floats
    within 1e-6 relative/absolute where they are items or dict values (keys and members: exactly)."""
    t = type(got)
    if t is not type(want):
        return False
    if t is float:
        return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if t is list or t is tuple:
        return len(got) == len(want) and all(values_match(g, w) for g, w in zip(got, want))
    if t is dict:  # `==` would match keys through hashing, where True, 1 and 1.0 are one key
        if len(got) != len(want):
            return False
        keys = {_exact(k): k for k in got}
        return all(_exact(k) in keys and values_match(got[keys[_exact(k)]], w) for k, w in want.items())
    if t is set or t is frozenset:
        return len(got) == len(want) and {_exact(x) for x in got} == {_exact(x) for x in want}
    return got == want


def _start(job: dict, timeout: float | None, memory_mb: int | None) -> tuple[_Child, dict]:
    backend = _backend(C.SANDBOX_MODE)
    child = _Child(backend, C.SANDBOX_TIMEOUT_S if timeout is None else timeout,
                   C.SANDBOX_MEMORY_MB if memory_mb is None else memory_mb)
    try:
        child.send(job)
        load = child.recv()
        child.idle = True
    except _ChildGone as g:
        load = {"ok": False, "status": g.status, "detail": g.detail}
    except BaseException:
        child.close()
        raise
    return child, load


def _run_calls_with(backend, program, calls, expected, setup, timeout) -> Verdict:
    """run_calls on a given backend (the probe in _backend)."""
    try:
        child = _Child(backend, timeout, C.SANDBOX_MEMORY_MB)
    except OSError as e:
        return Verdict(False, "error", str(e)[-500:], 0.0, 0.0)
    try:
        child.send({"program": program, "setup": setup})
        load = child.recv()
        child.idle = True
        if not load["ok"]:
            return Verdict(False, load["status"], load["detail"], 0.0, 0.0)
        got, err = child.call_value({"calls": calls[:1]})
        return Verdict(err is None and values_match(got, expected[0]), "passed", "", 0.0, 1.0)
    except _ChildGone as g:
        tail = child.stderr_tail().strip()[-300:]
        return Verdict(False, g.status, g.detail if tail in g.detail else f"{g.detail}: {tail}", 0.0, 0.0)
    finally:
        child.close()


def run_calls(program: str, calls: list[str], expected: list, setup: str = "",
              timeout: float | None = None, memory_mb: int | None = None) -> Verdict:
    """Run `setup` + `program`, evaluate each call expression in it, compare with `expected`.

    `expected` holds Python values (never sent to the program). A call passes when its result
    is an exact builtin value equal to the expected one (values_match).
    """
    if len(calls) != len(expected):
        raise ValueError(f"{len(calls)} calls but {len(expected)} expected values")
    child, load = _start({"program": program, "setup": setup}, timeout, memory_mb)
    n_ok, first = 0, None
    try:
        if not load["ok"]:
            return Verdict(False, load["status"], load["detail"][:500], time.monotonic() - child.t0, 0.0)
        if calls:
            child.send({"calls": list(calls)})  # one request; one reply per call, in order
        for i, (call, want) in enumerate(zip(calls, expected)):
            got, err = child.call_value(None)
            child.idle = i == len(calls) - 1  # it waits for a request only after the last reply
            if err is None and values_match(got, want):
                n_ok += 1
            elif first is None:
                first = ("failed" if err is None or err[0] == "error" else err[0],
                         f"{call}: " + (f"expected {_short(want)}, got {_short(got)}" if err is None else err[1]))
    except _ChildGone as g:
        return Verdict(False, g.status, g.detail, time.monotonic() - child.t0, n_ok / len(calls))
    finally:
        child.close()
    seconds = time.monotonic() - child.t0
    fraction = n_ok / len(calls) if calls else 1.0
    if first is None:
        return Verdict(True, "passed", "", seconds, fraction)
    return Verdict(False, first[0], first[1][:500], seconds, fraction)


def run_stdio(program: str, stdin_tests: list[dict], timeout: float | None = None,
              memory_mb: int | None = None) -> Verdict:
    """Run `program` as a script (APPS/CodeContests/TACO style), once per test in a fresh process
    with the test's "input" on its stdin; a test passes when the program exits 0 and its stdout is
    the test's "output" token for token (whitespace-separated: spaces, line breaks, trailing
    whitespace do not matter; no float tolerance). The outputs never reach the program; the
    time limit is for the load and all tests together, as in run_calls.
    """
    if type(stdin_tests) is not list or not all(
            type(t) is dict and type(t.get("input")) is str and type(t.get("output")) is str for t in stdin_tests):
        raise ValueError('stdin_tests must be a list of {"input": str, "output": str}')
    child, load = _start({"program": program, "stdio": True}, timeout, memory_mb)
    n_ok, first = 0, None
    try:
        if not load["ok"]:
            return Verdict(False, load["status"], load["detail"][:500], time.monotonic() - child.t0, 0.0)
        for i, test in enumerate(stdin_tests):
            child.idle = False
            child.send({"stdin": test["input"]})
            out, rc, why = _stdio_result(child.recv())
            child.idle = True
            if rc == 0 and out is not None and out.split() == test["output"].split():
                n_ok += 1
            elif first is None:
                first = (_stdio_status(rc, why), f"test {i + 1}: " + (
                    f"exit code {rc}" + (f", {why}" if why else "") if rc else
                    f"output over {STDOUT_MAX_BYTES} bytes" if out is None else
                    f"expected {_short(test['output'])}, got {_short(out)}"))
            if time.monotonic() > child.deadline:  # reading and comparing count against it too
                raise _ChildGone("timeout", "time limit exceeded")
    except _ChildGone as g:
        return Verdict(False, g.status, g.detail, time.monotonic() - child.t0, n_ok / max(len(stdin_tests), 1))
    finally:
        child.close()
    seconds, fraction = time.monotonic() - child.t0, n_ok / len(stdin_tests) if stdin_tests else 1.0
    if first is None:
        return Verdict(True, "passed", "", seconds, fraction)
    return Verdict(False, first[0], first[1][:500], seconds, fraction)


def _stdio_result(msg: dict) -> tuple[str | None, int, str]:
    """(stdout as text, None when over STDOUT_MAX_BYTES; exit code; uncaught exception) of one
    stdin test's record; _ChildGone("error") when it is not exactly that."""
    out, rc, why = msg.get("out"), msg.get("exit"), msg.get("detail")
    if not msg["ok"] or type(out) is not str or len(out) > 2 * STDOUT_MAX_BYTES + 2 or type(rc) is not int \
            or type(why) is not str:
        raise _ChildGone("error", "malformed record")
    try:
        raw = bytes.fromhex(out)
    except ValueError:
        raise _ChildGone("error", "malformed record") from None
    text = raw.decode("utf-8", "replace") if len(raw) <= STDOUT_MAX_BYTES else None
    return text, rc, why[:300]


def _stdio_status(rc: int, why: str) -> str:
    if rc == 128 + signal.SIGKILL or why.startswith("MemoryError"):
        return "memory"
    if rc == 128 + signal.SIGXCPU:
        return "timeout"
    return "refused" if why.startswith("PermissionError: sandbox refused") else "failed"


_EXCEPTIONS = {k: v for k, v in vars(builtins).items()
               if isinstance(v, type) and issubclass(v, Exception)}


class _Proxy:
    """Stands for the program's function `name` in the trusted tests: arguments go out encoded,
    the value (or the exception's builtin class) comes back decoded."""

    def __init__(self, child: _Child, name: str, state: dict):
        self.child, self.name, self.state = child, name, state

    def __call__(self, *args, **kwargs):
        try:
            encode_value([args, kwargs])  # only exact builtin values cross to the program
            request = {"fn": self.name, "args": list(args), "kwargs": dict(kwargs)}
        except TypeError as e:
            raise _ChildGone("error", f"test of {self.name}: {e}") from None
        value, err = self.child.call_value(request)
        if err is None:
            return value
        status, detail, exc = err
        if status in ("memory", "refused", "timeout"):
            self.state.setdefault("status", (status, detail))
        self.state.setdefault("detail", f"{self.name}(...) raised {detail}")
        raise _EXCEPTIONS.get(exc, RuntimeError)(f"{self.name}(...) raised {detail}")

    def __repr__(self):
        return f"<sandboxed {self.name}>"


def _test_globals() -> dict:
    """Globals for trusted test code: builtins whose `import random` gives a private copy,
    so tests neither reseed nor advance this process's random numbers."""
    own = {}

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "random" and level == 0:
            if "random" not in own:
                spec = importlib.util.find_spec("random")
                own["random"] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(own["random"])
            return own["random"]
        return builtins.__import__(name, globals, locals, fromlist, level)

    return {"__builtins__": {**vars(builtins), "__import__": guarded_import}, "__name__": "__tests__"}


def _free_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _trusted_helpers(helpers: str, entry_point: str):
    """The prompt's helper code (imports, other functions), without the entry point's stub."""
    try:
        tree = ast.parse(helpers)
    except (SyntaxError, ValueError):
        return None
    tree.body = [s for s in tree.body if not (isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                                              and s.name == entry_point)]
    return compile(tree, "<helpers>", "exec")


def run_asserts(program: str, test_code: str, entry_point: str = "", setup: str = "",
                check: bool = True, helpers: str = "", timeout: float | None = None,
                memory_mb: int | None = None) -> Verdict:
    """Run `setup` + `program` in the sandbox and the assert-style `test_code` here.

    The tests run in a fresh namespace holding `setup` and `helpers` (the trusted prompt's other
    definitions, e.g. HumanEval/32's `poly`); `entry_point`, `candidate` and every other name
    they take from the program are proxies to it. With `entry_point` and `check`,
    `check(<entry_point>)` runs after the test code (HumanEval); MBPP passes check=False.
    """
    try:
        tests = compile(test_code + ("\n" if test_code and not test_code.endswith("\n") else ""), "<tests>", "exec")
        setup_code = compile(setup, "<setup>", "exec") if setup else None
        names = _free_names(ast.parse(test_code))
    except (SyntaxError, ValueError) as e:
        return Verdict(False, "error", f"the test code does not compile: {e}", 0.0, 0.0)
    helper_code = _trusted_helpers(helpers, entry_point) if helpers else None
    child, load = _start({"program": program, "setup": setup}, timeout, memory_mb)
    state: dict = {}
    try:
        if not load["ok"]:
            return Verdict(False, load["status"], load["detail"][:500], time.monotonic() - child.t0, 0.0)
        g = _test_globals()
        if setup_code:
            exec(setup_code, g)
        if helper_code:
            exec(helper_code, g)
        for name in names:
            if name not in g and name not in g["__builtins__"]:
                g[name] = _Proxy(child, name, state)
        if entry_point:
            g[entry_point] = g["candidate"] = _Proxy(child, entry_point, state)
        exec(tests, g)
        if entry_point and check:
            if not callable(g.get("check")):
                raise _ChildGone("error", "the test code defines no check(candidate)")
            g["check"](g[entry_point])
    except _ChildGone as e:
        return Verdict(False, e.status, e.detail[:500], time.monotonic() - child.t0, 0.0)
    except AssertionError as e:
        return Verdict(False, "failed", (state.get("detail") or f"AssertionError {e}".strip())[:500],
                       time.monotonic() - child.t0, 0.0)
    except Exception as e:  # the tests crashed on a value the program returned, or a call it raised in
        status, detail = state.get("status", ("error", f"{type(e).__name__}: {str(e)[:300]}"))
        return Verdict(False, status, detail[:500], time.monotonic() - child.t0, 0.0)
    finally:
        child.close()
    return Verdict(True, "passed", "", time.monotonic() - child.t0, 1.0)


def run_unique(jobs: list[dict], workers: int | None = None, progress: bool = False) -> list[Verdict]:
    """run_many where jobs repeat (sampled answers often do): each distinct job runs once and every
    copy gets its verdict; order kept."""
    keys = [repr(sorted(job.items())) for job in jobs]
    index, distinct = {}, []  # key -> its place among the distinct jobs
    for key, job in zip(keys, jobs):
        if key not in index:
            index[key] = len(distinct)
            distinct.append(job)
    verdicts = run_many(distinct, workers, progress)
    return [verdicts[index[key]] for key in keys]


def run_job(job: dict) -> Verdict:
    """One job dict: run_calls kwargs (has "calls"), run_stdio kwargs (has "stdin_tests") or
    run_asserts kwargs (has "test_code"). A malformed job is that sample's "error" verdict."""
    try:
        if "calls" in job:
            return run_calls(**job)
        return run_stdio(**job) if "stdin_tests" in job else run_asserts(**job)
    except (TypeError, ValueError) as e:
        return Verdict(False, "error", f"malformed job: {e}"[:500], 0.0, 0.0)
    except OSError as e:  # no process or pipe to be had (EAGAIN, EMFILE): this sample only
        return Verdict(False, "error", f"the sandbox could not start: {e}"[:500], 0.0, 0.0)


def run_many(jobs: list[dict], workers: int | None = None, progress: bool = False) -> list[Verdict]:
    """Run jobs (see run_job) in parallel, `workers` at a time (default os.cpu_count()); order kept."""
    _backend(C.SANDBOX_MODE)  # fail once, with the fix, before starting anything
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(run_job, jobs)
        if progress:
            from tqdm.auto import tqdm
            results = tqdm(results, total=len(jobs), desc="sandbox", leave=False)
        return list(results)
