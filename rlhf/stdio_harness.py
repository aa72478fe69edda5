"""The program side of stdin/stdout tasks and of APPS' call-based ones (`fn_name`).

This file's text runs inside the sandbox, ahead of the answer (rlhf.codeeval.stdin_job and
call_job build the job); the evaluating process never imports it to run an answer. The answer
runs in a namespace of its own, and the trusted side compares what comes back with the expected
output, which never reaches the program. Only builtin and standard modules: the sandbox's
interpreter runs with -I -S (no site, so no exit() or quit() unless given here).
"""
import io
import sys


def load(source):
    """The answer's code object; a syntax error fails the whole program at load, as it would on a judge."""
    return compile(source, "<program>", "exec")


def run_stdin(code, text):
    """Run `code` as a script (__name__ == "__main__") with `text` as its standard input; returns
    what it wrote to standard output as its whitespace-separated tokens joined by single spaces
    (the rule of testlib's wcmp, the default checker of most judges). sys.stdin has a .buffer, as
    a real one does; a program that reads file descriptor 0 itself (open(0)) reads nothing."""
    out = io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8")
    saved = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8"), stdout
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "exit": sys.exit, "quit": sys.exit})
    except SystemExit as e:  # exit(0) ends a program normally; any other status is a runtime error
        if e.code not in (None, 0):
            raise RuntimeError(f"exit status {e.code!r}") from None
    finally:
        sys.stdin, sys.stdout = saved
    stdout.flush()
    return " ".join(out.getvalue().decode("utf-8", "replace").split())


ANSWER = {}  # the call-based answer's namespace (define)
# What APPS' harness (testing_util.py) imports ahead of every answer, less numpy: LeetCode-style
# starter code uses List in its annotations without importing it
PRELUDE = """
import collections, heapq, itertools, math, random, sys
from collections import Counter, OrderedDict, defaultdict, deque
from functools import lru_cache
from heapq import heappop, heappush
from typing import Dict, List, Optional, Set, Tuple
"""


def define(source):
    """Run the answer once as a module (its `if __name__ == "__main__":` block does not run)."""
    ANSWER.clear()
    ANSWER.update({"__name__": "answer", "__builtins__": __builtins__})
    exec(compile(PRELUDE, "<prelude>", "exec"), ANSWER)
    exec(load(source), ANSWER)


def call(name, args):
    """The answer's `name` called with `args`: a top-level function, or a method of its class
    Solution (LeetCode-style starter code, as APPS and TACO give it)."""
    fn = ANSWER.get(name)
    if fn is None and isinstance(ANSWER.get("Solution"), type):
        fn = getattr(ANSWER["Solution"](), name, None)
    if fn is None:
        raise NameError(f"name {name!r} is not defined")
    return fn(*args)
