"""Sandbox verdicts: correct, wrong, crashing, hanging, hostile and reward-hacking programs.
Attacks on the sandbox itself: tests/test_sandbox_attacks.py (the verdict) and
tests/test_sandbox_isolation.py (the host and the programs beside)."""
import itertools
import os
import subprocess
import sys
import time

import pytest

import config as C
from rlhf import sandbox

ADD = "def add(a, b):\n    return a + b\n"


def calls(program, timeout=3.0, **kw):
    # one shared test: add(2, 3) == 5, add(-1, 1) == 0
    return sandbox.run_calls(program, ["add(2, 3)", "add(-1, 1)"], [5, 0], timeout=timeout, **kw)


def asserts(program, timeout=3.0):
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    return sandbox.run_asserts(program, test, entry_point="add", timeout=timeout)


def test_correct_and_wrong():
    assert calls(ADD).status == "passed" and asserts(ADD).passed
    wrong = calls("def add(a, b):\n    return a + b if a > 0 else 1\n")  # right on 1 of 2
    assert (wrong.passed, wrong.status, wrong.pass_fraction) == (False, "failed", 0.5)
    assert asserts("def add(a, b):\n    return a - b\n").status == "failed"


def test_crash_and_syntax_error():
    assert calls("def add(a, b):\n    return 1 / 0\n").status == "failed"
    assert calls("def add(a, b) return").status == "error"
    assert asserts("raise ValueError('x')").status == "error"


def test_exact_types_and_setup():
    # 5.0 == 5 and True == 1 in Python; a verdict that accepted them would hide type bugs
    assert not calls("def add(a, b):\n    return float(a + b)\n").passed
    v = sandbox.run_calls("def f(n):\n    return Box(n).v\n", ["f(2)"], [2], setup="class Box:\n    def __init__(self, v):\n        self.v = v\n")
    assert v.passed
    # a bool is an int to isinstance: True for 1 (or 0 for False) is a wrong answer all the same
    for got, want in [(True, 1), (False, 0), (1, True), (1.0, 1), (1, 1.0), (1 + 0j, 1)]:
        assert not sandbox.values_match(got, want), (got, want)
    v = sandbox.run_calls("def f(x):\n    return x == 1\n", ["f(1)", "f(2)"], [1, 0])
    assert (v.passed, v.pass_fraction) == (False, 0.0) and "expected 1, got True" in v.detail, v


def test_exact_types_at_every_depth():
    # dict keys and set members compared through hashing would take True, 1, 1.0 and 1+0j for one
    for got, want in [({True: "a"}, {1: "a"}), ({1.0: "a"}, {1: "a"}), ({True}, {1}), ({1 + 0j}, {1}),
                      (frozenset({False}), frozenset({0})), ({(True,): 0}, {(1,): 0}), ({(1.0, 2)}, {(1, 2)}),
                      ({frozenset({1.0})}, {frozenset({1})}), ([{True: [2]}], [{1: [2]}]), ({1: {True}}, {1: {1}}),
                      ([True], [1]), ({1: 1.0}, {1: 1}), ([(1,)], [[1]])]:
        assert not sandbox.values_match(got, want), (got, want)
    for got, want in [(1.0, 1.00001), (0.0, 1e-6), ({1: 1, 2: 2}, {1: 1}), ({1: 1}, {1: 1, 2: 2})]:
        assert not sandbox.values_match(got, want), (got, want)  # floats within 1e-6 relative, 1e-9 absolute
    assert sandbox.values_match(1.0, 1.0000001) and sandbox.values_match(0.0, 1e-10)
    for same in [{1: "a", 2: 0.1 + 0.2}, {(1, "x"), frozenset({2.5})}, [{1: [0.30000000000000004]}]]:
        assert sandbox.values_match(same, eval(repr(same)))
    assert sandbox.values_match({1: 0.1 + 0.2}, {1: 0.3}) and sandbox.values_match([float("nan")], [float("nan")])
    # a dict or set with two equal keys was never a value of the program's: malformed
    for enc in (["d", [[["i", "1"], ["s", "a"]], [["b", True], ["s", "b"]]]], ["S", [["i", "1"], ["f", "1.0"]]]):
        with pytest.raises(ValueError):
            sandbox.decode_value(enc)


def test_the_isolation_probe_passes_only_a_program_that_loads_and_answers_exactly():
    """_backend's probe of a backend: a program that does not load, raises, or answers True for 1 is
    a failed probe (the backend is then said not to work), never a working one."""
    backend = sandbox._backend(C.SANDBOX_MODE)
    probe = lambda program: sandbox._run_calls_with(backend, program, ["f()"], [1], "", 30.0)  # noqa: E731
    ok = probe("def f():\n    return 1\n")
    assert (ok.passed, ok.status, ok.seconds, ok.pass_fraction) == (True, "passed", 0.0, 1.0)  # no time kept
    for program in ("def f(:\n", "def f():\n    return True\n", "def f():\n    return 1 / 0\n", "raise SystemExit(3)\n",
                    "import os\ndef f():\n    os._exit(0)\n"):
        v = probe(program)
        assert not v.passed and v.seconds == 0.0 and v.pass_fraction == (v.status == "passed"), (program, v)


def test_a_program_that_cannot_start_is_an_error_verdict_of_no_time_and_no_passes(monkeypatch):
    def no_child(*args, **kwargs):
        raise OSError("fork: Resource temporarily unavailable")

    monkeypatch.setattr(sandbox, "_Child", no_child)
    v = sandbox._run_calls_with("weak", "def f():\n    return 1\n", ["f()"], [1], "", 30.0)
    assert (v.passed, v.status, v.detail, v.seconds, v.pass_fraction) == (
        False, "error", "fork: Resource temporarily unavailable", 0.0, 0.0)


def test_a_reply_decodes_to_the_exact_value_and_anything_else_is_malformed():
    """decode_value inverts encode_value on every kind of value a program may return, up to one
    level past MAX_DEPTH (the reply's own wrapping); every other shape is malformed, never a value."""
    from rlhf.sandbox.verdict import MAX_DEPTH, MAX_DIGITS, SAME_HASH

    for v in [None, True, False, 0, -7, 2**70, 1.5, float("inf"), 1 + 2j, "", "é", [], (), set(), frozenset(), {},
              [None, (2, "x")], {"k": [None, {1: 2.5}]}, {(1, 2): frozenset({3.0})}, int("9" * MAX_DIGITS)]:
        assert sandbox.values_match(sandbox.decode_value(sandbox.encode_value(v)), v), v

    def nested(depth):  # None inside `depth` lists
        return ["n"] if depth == 0 else ["l", [nested(depth - 1)]]

    assert sandbox.decode_value(nested(MAX_DEPTH + 1)) is not None
    hash_of_zero = [["i", str(k * ((1 << 61) - 1))] for k in range(1, SAME_HASH + 2)]  # distinct ints, one hash
    assert len(sandbox.decode_value(["l", hash_of_zero[:SAME_HASH]])) == SAME_HASH
    # hash(-1) == hash(-2): the tuples of -1s and -2s of one length are distinct and share one hash
    same_hash_tuples = [["t", [["i", str(x)] for x in t]] for t in itertools.product((-1, -2), repeat=4)][:SAME_HASH + 1]
    assert len(sandbox.decode_value(["l", same_hash_tuples[:SAME_HASH]])) == SAME_HASH
    for enc in [nested(MAX_DEPTH + 2), "n", ("n",), [], [1], ["n", 1], ["i"], ["i", 5], ["i", "1", "2"], ["b", 1],
                ["s", 1], ["f", "x"], ["f", "9" * (MAX_DIGITS + 2)], ["l", "ab"], ["q", []], ["d", [1]], ["d", [[["n"]]]],
                ["S", [["l", []]]], ["l", hash_of_zero], ["l", same_hash_tuples], ["d", [[["n"], ["n"], ["n"]]]]]:
        with pytest.raises(ValueError):
            sandbox.decode_value(enc)


def test_arguments_are_encoded_up_to_max_depth_in_lists_and_dicts():
    from rlhf.sandbox.verdict import MAX_DEPTH

    def in_lists(depth):
        return None if depth == 0 else [in_lists(depth - 1)]

    def in_dicts(depth):  # as keys' values
        return None if depth == 0 else {"k": in_dicts(depth - 1)}

    for nest in (in_lists, in_dicts):
        assert sandbox.decode_value(sandbox.encode_value(nest(MAX_DEPTH))) == nest(MAX_DEPTH)
        with pytest.raises(TypeError, match="nested too deeply"):
            sandbox.encode_value(nest(MAX_DEPTH + 1))


def test_reading_a_reply_counts_against_the_deadline():
    # decoding stops at the program's deadline, whatever the reply's shape; a reply of more values
    # than MAX_VALUES is refused before it is parsed
    many = ["l", [["l", [["i", "1"]] * 1000]] * 1000]
    assert len(sandbox._decode_strict(many, time.monotonic() + 60)) == 1000
    with pytest.raises(sandbox._ChildGone) as gone:
        sandbox._decode_strict(many, time.monotonic() - 0.001)
    assert gone.value.status == "timeout"
    v = calls(f"def add(a, b):\n    return [0] * {sandbox.MAX_VALUES}\n")
    assert v.status == "error" and v.detail == f"reply with over {sandbox.MAX_VALUES} values", v
    # strings are not counted as values, whatever they hold
    assert sandbox.run_calls("def f():\n    return '[' * 300000\n", ["f()"], ["[" * 300000], timeout=3.0).passed


def test_ordinary_stdlib_still_works():
    program = ("import collections, itertools, math, functools, re, heapq, dataclasses, typing, enum\n"
               "P = collections.namedtuple('P', 'a b')\n"
               "@dataclasses.dataclass\nclass D:\n    x: int\n    y: typing.List[int]\n"
               "class E(enum.Enum):\n    A = 1\n"
               "@functools.lru_cache(None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
               "def add(a, b):\n    return D(P(a, b).a, [1]).x + b + E.A.value - 1 + fib(0) + "
               "len(re.findall('x', '')) + heapq.nsmallest(1, [0])[0] + math.floor(0.5) + "
               "len(list(itertools.chain()))\n")
    v = calls(program)
    assert v.passed, v.detail


def test_timeout_infinite_loop():
    v = calls("def add(a, b):\n    while True:\n        pass\n", timeout=1.0)
    assert v.status == "timeout" and v.seconds < 5


def test_memory_hog():
    v = calls("def add(a, b):\n    x = bytearray(2 << 30)\n    return a + b\n")
    assert (v.passed, v.status) == (False, "memory")


def test_output_flood_is_capped():
    v = calls("import sys\ndef add(a, b):\n    while True:\n        sys.stdout.write('x' * 65536)\n")
    assert not v.passed and v.status in ("failed", "timeout")


def test_fork_bomb_and_subprocess_refused():
    assert calls("import os\nwhile True:\n    os.fork()\n").status == "refused"
    assert calls("import subprocess\nsubprocess.run(['true'])\n").status == "refused"
    assert calls("import os\nos.system('true')\n").status == "refused"
    assert calls("import ctypes\n").status == "refused"


def test_network_refused():
    v = calls("import socket\ns = socket.create_connection(('127.0.0.1', 80))\n")
    assert v.status == "refused"


def test_kill_parent_fails_and_we_survive():
    v = calls("import os\nos.kill(os.getppid(), 9)\ndef add(a, b):\n    return a + b\n")
    assert not v.passed  # and this test process is still alive to assert it


def test_files_outside_are_untouched(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep")
    os.chmod(tmp_path, 0o777)  # even with permissive modes the audit hook refuses
    for program in (f"import os\nos.remove({str(sentinel)!r})\n",
                    f"open({str(sentinel)!r}, 'w').write('gone')\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                    f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\n"):
        assert not calls(program + ADD).passed
    assert sentinel.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["sentinel.txt"]
    # inside its own directory a program may write and read back
    assert calls("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n" + ADD).passed


def test_cannot_read_answers():
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    v = calls(f"text = open({data!r}).read()\n" + ADD)
    assert not v.passed and v.status in ("refused", "error")  # the hook refuses, or the file is not there


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n" + ADD,
    "import os\nos._exit(0)\n" + ADD,
    "print('passed')\nprint('{\"k\": \"end\", \"status\": \"passed\"}')\nimport os\nos._exit(0)\n",
    "class Any:\n    def __eq__(self, o):\n        return True\n    def __bool__(self):\n        return True\n"
    "def add(a, b):\n    return Any()\n",
    "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
    "builtins.abs = lambda x: 0\ndef add(a, b):\n    return 0\n",
    "class Sub(int):\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return Sub(7)\n",
])
def test_reward_hacks_fail(program):
    assert not calls(program).passed
    assert not asserts(program).passed


SUM = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
STDIN_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10\n-4\n", "output": "6"}]


def stdio(program, tests=STDIN_TESTS, timeout=3.0):
    return sandbox.run_stdio(program, tests, timeout=timeout)


def test_stdin_stdout_programs():
    # APPS/CodeContests style: the program reads its input on stdin and prints; compared here
    whole = stdio(SUM)
    assert whole.passed and 0 < whole.seconds < 3.0 + sandbox.GRACE_S
    half = stdio("print(5)\n")
    assert (half.passed, half.status, half.pass_fraction) == (False, "failed", 0.5) and half.detail == "test 2: expected '6', got '5\\n'"
    # whitespace as those judges take it: tokens; but the tokens themselves exactly
    for printed, ok in [("'  5 \\r\\n\\n'", True), ("'5\\t'", True), ("'5 0'", False), ("'50'", False), ("'5.0'", False), ("''", False)]:
        assert sandbox.run_stdio(f"print({printed}, end='')\n", STDIN_TESTS[:1]).passed is ok, printed
    # every usual way to read and print; each test in a fresh process (module state starts over)
    for program in ["a = list(map(int, open(0).read().split()))\nprint(sum(a))\n",
                    "import sys\nsys.stdout.write(str(sum(map(int, sys.stdin.buffer.read().split()))) + '\\n')\n",
                    "def main():\n    nums = []\n    while True:\n        try:\n            nums += map(int, input().split())\n"
                    "        except EOFError:\n            break\n    print(sum(nums))\nif __name__ == '__main__':\n    main()\n",
                    "import sys, threading\nsys.setrecursionlimit(10 ** 6)\nthreading.stack_size(1 << 26)\n"
                    "threading.Thread(target=lambda: print(sum(map(int, sys.stdin.read().split())))).start()\n",
                    "import sys, builtins\nbuiltins.runs = getattr(builtins, 'runs', 0) + 1\n"
                    "print(sum(map(int, sys.stdin.read().split())) if builtins.runs == 1 else 0)\nsys.exit(0)\n"]:
        v = stdio(program)
        assert v.passed, (program, v)


def test_a_stdin_record_not_exactly_of_its_shape_is_malformed():
    good = {"ok": True, "out": b"5\n".hex(), "exit": 0, "detail": ""}
    assert sandbox._stdio_result(good)[1:] == (0, "")
    for bad in ({**good, "ok": False}, {**good, "out": 5}, {**good, "exit": "0"}, {**good, "detail": None}):
        with pytest.raises(sandbox._ChildGone):
            sandbox._stdio_result(bad)


def test_stdin_stdout_failures():
    assert stdio("raise ValueError('bad input')\n").detail == "test 1: exit code 1, ValueError: bad input"
    assert stdio("import sys\nprint(5)\nsys.exit(3)\n").detail == "test 1: exit code 3"
    assert stdio("print(\n").status == "error"
    never = stdio("import sys\nsys.stdin.read()\nwhile True:\n    pass\n", timeout=1.0)
    assert (never.passed, never.status, never.detail) == (False, "timeout", "time limit exceeded") and never.seconds < 3, never
    # a run that ends early keeps the share of the tests it passed (PPO_EXEC_REWARD=fraction): 1 of 2
    for v in (stdio("import sys\nif sys.stdin.read().split() == ['5', '7']:\n    while True:\n        pass\nprint(5)\n",
                    [{"input": "2 3", "output": "5"}, {"input": "5 7", "output": "12"}], timeout=1.0),
              calls("def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n", timeout=1.0)):
        assert (v.passed, v.status, v.pass_fraction) == (False, "timeout", 0.5), v
    assert stdio("x = bytearray(2 << 30)\n").status == "memory"
    assert stdio("print('x' * (3 << 20))\n").detail == f"test 1: output over {sandbox.STDOUT_MAX_BYTES} bytes"
    big = [{"input": " ".join(map(str, range(200000))), "output": str(sum(range(200000)))}]  # 1.3 MB
    assert stdio(SUM, big).passed
    # a job of this kind in run_many and run_unique; a malformed one is that sample's error
    job = dict(program=SUM, stdin_tests=STDIN_TESTS)
    verdicts = sandbox.run_unique([job, dict(job, stdin_tests=[{"input": "1"}]), job, dict(job, program="print(6)")], workers=2)
    assert [v.status for v in verdicts] == ["passed", "error", "passed", "failed"] and verdicts[0] is verdicts[2]
    assert verdicts[1].detail.startswith("malformed job: stdin_tests must be")


def test_run_many_keeps_order():
    jobs = [dict(program=f"def add(a, b):\n    return a + b + {i}\n", calls=["add(0, 0)"], expected=[0])
            for i in range(6)] + [dict(program=ADD, test_code="assert add(1, 1) == 2\n")]
    got = [v.passed for v in sandbox.run_many(jobs, workers=3)]
    assert got == [True, False, False, False, False, False, True]


def test_run_unique_runs_each_distinct_job_once():
    right, wrong = (dict(program=ADD, calls=["add(1, 1)"], expected=[e]) for e in (2, 3))
    verdicts = sandbox.run_unique([right, wrong, dict(right), right, dict(wrong, calls=["add(1, 2)"])], workers=2)
    assert [v.passed for v in verdicts] == [True, False, True, True, True]
    assert verdicts[0] is verdicts[2] is verdicts[3] and verdicts[4] is not verdicts[0]


def test_temp_dirs_and_files_in_own_dir():
    # os.makedirs and TemporaryDirectory were refused on Python 3.11 (dir_fd=-1 read as a dir_fd)
    program = ("import os, tempfile, shutil\nos.makedirs('a/b/c', exist_ok=True)\n"
               "open('a/b/c/f.txt', 'w').write('x')\nwith tempfile.TemporaryDirectory() as d:\n"
               "    open(os.path.join(d, 'g'), 'w').write('y')\nwith tempfile.NamedTemporaryFile() as f:\n"
               "    f.write(b'z')\nshutil.rmtree('a')\n" + ADD)
    v = calls(program)
    assert v.passed, v.detail
    assert asserts(program).passed


def test_each_concurrent_sample_has_its_own_uid():
    if C.SANDBOX_MODE != "namespaces" or sandbox.active_mode() != "namespaces (root: a uid per sample)":
        pytest.skip("a uid per sample needs root")
    job = dict(program="import os, time\ntime.sleep(0.5)\ndef uid():\n    return os.getuid()\n",
               calls=["uid()"], expected=[0])
    uids = {int(v.detail.rsplit(" ", 1)[1]) for v in sandbox.run_many([job] * 3, workers=3)}
    assert len(uids) == 3 and all(u >= sandbox.UID_BASE for u in uids)


def test_cgroups_found_in_v1_v2_and_hybrid_layouts():
    # where this process's own cgroup is, per controller, from /proc/self/mountinfo and /proc/self/cgroup
    v1 = ("35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
          "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    own = "8:pids:/\n4:memory:/jobs/7\n0::/\n"
    assert sandbox._cgroup_bases(v1, own) == {"memory": ("/sys/fs/cgroup/memory/jobs/7", 1), "pids": ("/sys/fs/cgroup/pids", 1)}
    v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert sandbox._cgroup_bases(v2, "0::/user.slice/run-1.scope\n") == {
        "memory": ("/sys/fs/cgroup/user.slice/run-1.scope", 2), "pids": ("/sys/fs/cgroup/user.slice/run-1.scope", 2)}
    # a container's mount shows only its own subtree; a cgroup outside what is mounted is no use
    container = "600 500 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert sandbox._cgroup_bases(container, "0::/docker/abc/x\n") == {"memory": ("/sys/fs/cgroup/x", 2), "pids": ("/sys/fs/cgroup/x", 2)}
    assert sandbox._cgroup_bases(container, "0::/elsewhere\n") == {}
    # hybrid: memory bound to v1, pids left to v2
    hybrid = v1.splitlines()[0] + "\n" + "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    assert sandbox._cgroup_bases(hybrid, "4:memory:/\n0::/a\n") == {"memory": ("/sys/fs/cgroup/memory", 1),
                                                                     "pids": ("/sys/fs/cgroup/unified/a", 2)}


def test_without_cgroups_one_line_says_so_and_programs_still_run(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "_cgroup_bases", lambda mountinfo, cgroups: {})
    sandbox._find_cgroups.cache_clear()
    try:
        assert sandbox._cgroups() == () and sandbox._cgroups() == ()
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("sandbox: no cgroup for memory and pids (") and "docs/SANDBOX.md" in err[0], err
        assert calls(ADD).passed and not calls("def add(a, b):\n    return 0\n").passed
    finally:
        sandbox._find_cgroups.cache_clear()


def test_weak_mode_is_explicit_and_reported():
    weak = sandbox.Limits(mode="weak")
    assert sandbox.active_mode("weak").startswith("weak")
    assert calls(ADD, limits=weak).passed and not calls("def add(a, b):\n    return 0\n", limits=weak).passed


def test_the_limits_defaults_are_config_defaults():
    # sandbox.Limits() is what a helper called without limits runs under: config.py's SANDBOX_* defaults
    import runpy

    from rlhf.codeeval import sandbox_limits

    defaults = {k: v for k, v in runpy.run_path(C.__file__).items() if k.startswith("SANDBOX_")}
    assert len(defaults) == 6 and all(getattr(C, k) == v for k, v in defaults.items())  # this process: the defaults
    assert sandbox.Limits() == sandbox_limits(C)


def test_no_isolation_stops_with_the_fix(monkeypatch):
    # without `unshare` the default mode refuses to run anything, and names the fixes
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox._backend.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="SANDBOX_MODE=weak"):
            sandbox.run_many([dict(program=ADD, calls=["add(1, 1)"], expected=[2])])
    finally:
        sandbox._backend.cache_clear()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "scripts/evaluate.py", "--benchmark", "humaneval", "--samples", "canonical"],
                       cwd=root, env={**os.environ, "PYTHONPATH": root, "PATH": "/nonexistent"},
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_a_program_whose_set_up_fails_gets_the_reason():
    # the namespaces' set-up fails for this program only (a work dir size the kernel refuses):
    # an error verdict that says why, and the next program runs as usual
    if C.SANDBOX_MODE != "namespaces":
        pytest.skip("kernel isolation is off (SANDBOX_MODE=weak)")
    assert calls(ADD).passed  # the isolation mode is known before the setting changes
    v = calls(ADD, limits=sandbox.Limits(disk_mb=-5))
    assert v.status == "error" and v.detail.startswith("sandbox set-up failed: OSError") and "/work" in v.detail, v
    assert calls(ADD).passed
