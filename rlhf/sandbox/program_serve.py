"""The sandbox's program side, part 1 of 2: serving one program. Never imported: the trusted side
(rlhf/sandbox/isolation.py) joins this file and program_setup.py into one text, the runner, which
runs with `python -I -S -B -c` (only builtin and C modules: see main() in program_setup.py).

serve() runs the program and answers the trusted side's call requests with strictly encoded
builtin values; serve_stdio() runs a stdin/stdout program once per test in a process of its own;
make_hook() is the audit hook (PEP 578) every program gets, as an extra layer only."""
import os, sys

MAX_DEPTH = None  # deepest nesting of a reply: the trusted side writes its MAX_DEPTH here

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
        if depth > MAX_DEPTH:
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
    while (req := recv()) is not None:  # until the trusted side closes the pipe
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
    while (req := recv()) is not None:  # until the trusted side closes the pipe
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
