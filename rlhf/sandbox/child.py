"""One sandboxed program as the trusted side holds it (_Child): started through the zygote (or
as its own interpreter in weak mode), its pipes read and written within its deadline, ended by a
watchdog thread when it is still going past it."""
from __future__ import annotations

import heapq
import itertools
import json
import marshal
import math
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from rlhf import sandbox
from rlhf.sandbox.cgroups import _cgroups, _make_cgroups, _remove_cgroups
from rlhf.sandbox.isolation import RUNNER, _seccomp_filter, _weak_interpreter, syscall_number
from rlhf.sandbox.values import _decode_strict
from rlhf.sandbox.verdict import (
    GRACE_S, MAX_OPEN_FILES, MAX_VALUES, READ_BACK_BYTES, STATUSES, STDOUT_MAX_BYTES, UID_BASE, Limits, _ChildGone,
)
from rlhf.sandbox.zygote import _ENV, _read_tail, _zygote


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

    def __init__(self, backend: str, limits: Limits):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + limits.timeout_s
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
        # sandbox._AUDIT_HOOK through the package: tests switch it off there
        cfg = {"audit_hook": sandbox._AUDIT_HOOK, "cpu_s": math.ceil(limits.timeout_s) + 1,
               "memory": limits.memory_mb << 20, "fsize": limits.file_size_mb << 20, "nofile": MAX_OPEN_FILES,
               "nproc": limits.max_procs, "uid": UID_BASE + 256 * os.getpid() + self.slot,
               "stdout_max": STDOUT_MAX_BYTES}
        try:
            self.cgroups, cgroup_fds = _make_cgroups(limits.memory_mb << 20, limits.max_procs)
            if backend == "weak":
                self._start_weak(cfg, cgroup_fds)
            else:
                machine = platform.machine()
                cfg.update(disk_kb=limits.disk_mb << 10, inodes=4096, seccomp=_seccomp_filter(machine),
                           sys_seccomp=syscall_number(machine, "seccomp"))
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
