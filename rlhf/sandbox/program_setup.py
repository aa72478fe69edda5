"""The sandbox's program side, part 2 of 2: the namespaces, and the runner's entry point. Never
imported: it runs after program_serve.py in one text (rlhf/sandbox/isolation.py), so serve() is
that file's.

Namespaces: zygote() runs once per evaluating process and backend, as root (or userns root)
inside new namespaces made by util-linux `unshare`. It builds the read-only file system view,
then waits on its control socket; each message there is one program's limits and four pipe ends.
For each it forks keeper(), which takes new namespaces of the program's own and forks the
program's pid 1; that one mounts the program's /work, drops privileges and forks the worker:
pid 1 stays as supervise(), the worker installs seccomp and limits, then serve() reads requests
from its request pipe and answers on its reply pipe. The keeper waits for pid 1 (which the
kernel lets go only when every process of the program's PID namespace is gone) and writes its
exit status on the status pipe. No program code ever runs in the zygote or the keeper. Weak
mode: main() applies the limits and serves, nothing else."""
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
        serve(job, unmarshal)  # noqa: F821  (program_serve.py)
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
    # and collections, start-up time for every program (weak mode starts one per program)
    import marshal
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    if cfg.get("zygote"):
        zygote(cfg)
    limits(cfg)
    serve(cfg, marshal.loads)  # noqa: F821  (program_serve.py)

try:
    main()
except BaseException as e:  # set-up failures reach the trusted side's stderr pipe
    os.write(2, ("sandbox set-up failed: %s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
    os._exit(1)
finally:
    os._exit(0)
