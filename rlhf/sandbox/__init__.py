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
Each takes `limits` (Limits: the isolation mode, time, memory, disk, file size and process limits of
every program), which the caller passes from its settings (the defaults are config.py's).

The package: this file is the API; verdict.py the limits and the Verdict; values.py the value
encoding and comparison; isolation.py the program side's text, seccomp and file system view;
cgroups.py a cgroup per program; zygote.py and child.py the set-up process and one running
program; asserts.py the trusted side of assert-style tests; program_serve.py and program_setup.py
the program side itself (run as text, never imported).
"""
from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import functools
import os
import platform
import shutil
import signal
import time

from rlhf.sandbox.asserts import _free_names, _Proxy, _test_globals, _trusted_helpers
from rlhf.sandbox.cgroups import _cgroup_bases, _cgroups, _find_cgroups  # noqa: F401  (tests reach them here)
from rlhf.sandbox.child import _Child
from rlhf.sandbox.isolation import _fs_view, _weak_interpreter, syscall_number
from rlhf.sandbox.values import _decode_strict, _short, decode_value, encode_value, values_match  # noqa: F401
from rlhf.sandbox.verdict import (  # noqa: F401  (the constants are part of the API)
    GRACE_S, MAX_DEPTH, MAX_DIGITS, MAX_OPEN_FILES, MAX_VALUES, READ_BACK_BYTES, SAME_HASH, STATUSES, STDOUT_MAX_BYTES,
    UID_BASE, Limits, SandboxUnavailable, Verdict, _ChildGone,
)
from rlhf.sandbox.zygote import _zygote, shutdown  # noqa: F401

_AUDIT_HOOK = True  # tests switch it off to check that the kernel boundary holds on its own


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
    elif syscall_number(platform.machine(), "pivot_root") is None:
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


def active_mode(mode: str = "namespaces") -> str:
    """What isolation runs programs in SANDBOX_MODE `mode`, for reports: 'namespaces (...)' or 'weak (...)'."""
    return {"root": "namespaces (root: a uid per sample)", "userns": "namespaces (user namespace)",
            "weak": "weak (audit hook and limits only)"}[_backend(mode)]


def _start(job: dict, limits: Limits, timeout: float | None, memory_mb: int | None) -> tuple[_Child, dict]:
    """A program loaded under `limits`, with a job's own time and memory limits where it has them."""
    child = _Child(_backend(limits.mode), dataclasses.replace(
        limits, timeout_s=limits.timeout_s if timeout is None else timeout,
        memory_mb=limits.memory_mb if memory_mb is None else memory_mb))
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
    """run_calls on a given backend (the probe in _backend), under the default limits but `timeout`."""
    try:
        child = _Child(backend, Limits(timeout_s=timeout))
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
              timeout: float | None = None, memory_mb: int | None = None, limits: Limits = Limits()) -> Verdict:
    """Run `setup` + `program`, evaluate each call expression in it, compare with `expected`.

    `expected` holds Python values (never sent to the program). A call passes when its result
    is an exact builtin value equal to the expected one (values_match).
    """
    if len(calls) != len(expected):
        raise ValueError(f"{len(calls)} calls but {len(expected)} expected values")
    child, load = _start({"program": program, "setup": setup}, limits, timeout, memory_mb)
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
              memory_mb: int | None = None, limits: Limits = Limits()) -> Verdict:
    """Run `program` as a script (APPS/CodeContests/TACO style), once per test in a fresh process
    with the test's "input" on its stdin; a test passes when the program exits 0 and its stdout is
    the test's "output" token for token (whitespace-separated: spaces, line breaks, trailing
    whitespace do not matter; no float tolerance). The outputs never reach the program; the
    time limit is for the load and all tests together, as in run_calls.
    """
    if type(stdin_tests) is not list or not all(
            type(t) is dict and type(t.get("input")) is str and type(t.get("output")) is str for t in stdin_tests):
        raise ValueError('stdin_tests must be a list of {"input": str, "output": str}')
    child, load = _start({"program": program, "stdio": True}, limits, timeout, memory_mb)
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


def run_asserts(program: str, test_code: str, entry_point: str = "", setup: str = "",
                check: bool = True, helpers: str = "", timeout: float | None = None,
                memory_mb: int | None = None, limits: Limits = Limits()) -> Verdict:
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
    child, load = _start({"program": program, "setup": setup}, limits, timeout, memory_mb)
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


def run_unique(jobs: list[dict], workers: int | None = None, progress: bool = False,
               limits: Limits = Limits()) -> list[Verdict]:
    """run_many where jobs repeat (sampled answers often do): each distinct job runs once and every
    copy gets its verdict; order kept."""
    keys = [repr(sorted(job.items())) for job in jobs]
    index, distinct = {}, []  # key -> its place among the distinct jobs
    for key, job in zip(keys, jobs):
        if key not in index:
            index[key] = len(distinct)
            distinct.append(job)
    verdicts = run_many(distinct, workers, progress, limits)
    return [verdicts[index[key]] for key in keys]


def run_job(job: dict, limits: Limits = Limits()) -> Verdict:
    """One job dict: run_calls kwargs (has "calls"), run_stdio kwargs (has "stdin_tests") or
    run_asserts kwargs (has "test_code"). A malformed job is that sample's "error" verdict."""
    try:
        if "calls" in job:
            return run_calls(**job, limits=limits)
        return run_stdio(**job, limits=limits) if "stdin_tests" in job else run_asserts(**job, limits=limits)
    except (TypeError, ValueError) as e:
        return Verdict(False, "error", f"malformed job: {e}"[:500], 0.0, 0.0)
    except OSError as e:  # no process or pipe to be had (EAGAIN, EMFILE): this sample only
        return Verdict(False, "error", f"the sandbox could not start: {e}"[:500], 0.0, 0.0)


def run_many(jobs: list[dict], workers: int | None = None, progress: bool = False,
             limits: Limits = Limits()) -> list[Verdict]:
    """Run jobs (see run_job) in parallel, `workers` at a time (default os.cpu_count()); order kept."""
    _backend(limits.mode)  # fail once, with the fix, before starting anything
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(functools.partial(run_job, limits=limits), jobs)
        if progress:
            from tqdm.auto import tqdm
            results = tqdm(results, total=len(jobs), desc="sandbox", leave=False)
        return list(results)
