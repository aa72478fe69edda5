"""A cgroup per program. rlimits bound each process; a program of SANDBOX_MAX_PROCS processes could
still hold that many times SANDBOX_MEMORY_MB. Where this process may create cgroups below its own
(root, or a delegated subtree), each program gets one per hierarchy: its memory as a whole (all its
processes, its tmpfs, the kernel's memory for it) at most SANDBOX_MEMORY_MB, at most
SANDBOX_MAX_PROCS tasks, removed after the run. They live under rlhf-sandbox-<pid>, one folder per
evaluating process."""
from __future__ import annotations

import atexit
import errno
import functools
import itertools
import os
import signal
import subprocess
import sys
import threading
import time

from rlhf import sandbox

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
        with open("/proc/self/mountinfo", encoding="utf-8") as f, open("/proc/self/cgroup", encoding="utf-8") as g:
            bases = sandbox._cgroup_bases(f.read(), g.read())  # through the package: tests replace it there
    except OSError as e:
        bases, why = {}, {"memory": str(e), "pids": str(e)}
    else:
        why = {c: "no cgroup hierarchy with it is mounted" for c in ("memory", "pids") if c not in bases}
    parents = {}  # directory -> files
    for ctrl, (base, version) in bases.items():
        parent = f"{base}/rlhf-sandbox-{os.getpid()}"
        try:
            if version == 2:  # a v2 child has a controller only where its parent passes it down
                with open(base + "/cgroup.subtree_control", encoding="utf-8") as f:
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
            # cgroup.procs write takes (an RCU grace period each); pid 1 is single-threaded when it
            # writes. v2 has no such file: cgroup.procs
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
                        with open(path + "/cgroup.procs", encoding="utf-8") as f:
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
