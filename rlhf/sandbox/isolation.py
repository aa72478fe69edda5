"""How programs are isolated, as far as the trusted side sets it up before a run: the program
side's text (RUNNER, from program_serve.py and program_setup.py), its seccomp filter, the read-only
file system view it sees, and weak mode's interpreter."""
from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys

from rlhf.sandbox.verdict import MAX_DEPTH, UID_BASE, SandboxUnavailable


def _program_text(name: str) -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as f:
        return f.read()


# The program side, passed with `python -I -S -B -c`: program_serve.py, then program_setup.py (its
# entry point at the end), with the trusted side's MAX_DEPTH written in.
RUNNER = _program_text("program_serve.py") + "\n" + _program_text("program_setup.py")
assert RUNNER.count("\nMAX_DEPTH = None ") == 1
RUNNER = RUNNER.replace("\nMAX_DEPTH = None ", f"\nMAX_DEPTH = {MAX_DEPTH} ")

# Syscall numbers by name: (x86-64, the generic table of aarch64 and riscv64), from the kernel's
# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h; None: no such syscall.
_SYSCALLS = {
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "ptrace": (101, 117), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442), "syslog": (103, 116),
    "quotactl": (179, 60), "acct": (163, 89), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "flock": (73, 32), "inotify_init": (253, None), "inotify_init1": (294, 26), "inotify_add_watch": (254, 27),
    "fanotify_init": (300, 262), "fanotify_mark": (301, 263), "mincore": (27, 232), "cachestat": (451, 451),
    "clone": (56, 220), "clone3": (435, 435), "fcntl": (72, 25), "seccomp": (317, 277),
}
_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1), "riscv64": (0xC00000F3, 1)}  # AUDIT_ARCH_*, column

# Refused with EPERM: kernel attack surface no solution needs, and (last row) state a program could
# attach to a file that other programs see too (the read-only /usr, the interpreter, /dev/null...),
# i.e. a channel between programs running side by side: locks, file notifications, page-cache
# residency. fcntl's locks, leases and dnotify are refused by command (_FCNTL_DENY).
_DENY = ["unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "ptrace", "keyctl", "add_key", "request_key",
         "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
         "kexec_file_load", "init_module", "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at",
         "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "syslog", "quotactl",
         "acct", "swapon", "swapoff", "reboot",
         "flock", "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark", "mincore",
         "cachestat"]
# F_GETLK F_SETLK F_SETLKW (and their 64-bit twins), F_OFD_GETLK/SETLK/SETLKW, F_SETLEASE F_GETLEASE F_NOTIFY
_FCNTL_DENY = [5, 6, 7, 12, 13, 14, 36, 37, 38, 1024, 1025, 1026]


def syscall_number(machine: str, name: str) -> int | None:
    """The number of syscall `name` on CPU `machine` (platform.machine()), or None where unknown."""
    return _SYSCALLS[name][_ARCH[machine][1]] if machine in _ARCH else None


@functools.lru_cache(maxsize=None)
def _seccomp_filter(machine: str) -> bytes | None:
    """Classic-BPF seccomp program (struct sock_filter array) for this CPU, or None.

    The syscalls that open kernel attack surface no solution needs (new namespaces: a nested
    user namespace would give back capabilities; mounts, ptrace, keys, bpf, perf, io_uring,
    modules, kexec) and those that attach state to shared files (locks, leases, file
    notifications, page-cache residency) fail with EPERM; clone3 gets ENOSYS so libc falls back
    to clone, whose namespace flags are checked; another ABI (x32, i386) kills the process.
    """
    if machine not in _ARCH:
        return None
    arch = _ARCH[machine][0]
    deny = [nr for nr in (syscall_number(machine, name) for name in _DENY) if nr is not None]
    clone, clone3, fcntl = (syscall_number(machine, name) for name in ("clone", "clone3", "fcntl"))
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
