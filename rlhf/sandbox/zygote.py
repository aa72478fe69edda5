"""The zygote: one set-up process per evaluating process and backend that builds the sandbox's
file system view once and forks every program's namespaces (program_setup.py is its side)."""
from __future__ import annotations

import atexit
import marshal
import os
import platform
import socket
import subprocess
import threading

from rlhf.sandbox.isolation import RUNNER, _fs_view, syscall_number

_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/work", "LANG": "C.UTF-8"}


class _Zygote:
    """The namespaces' set-up process of one backend (see program_setup.py): `unshare`
    starts it once per evaluating process, and it forks every program's namespaces, so that a
    program costs a few forks and mounts instead of an `unshare` exec and a Python start-up."""

    def __init__(self, backend: str):
        exe, mountpoint, entries = _fs_view()
        cfg = {"zygote": True, "userns": backend == "userns", "mountpoint": mountpoint, "entries": entries,
               "sys_pivot_root": syscall_number(platform.machine(), "pivot_root")}
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
