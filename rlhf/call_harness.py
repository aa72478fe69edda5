"""The program side of APPS' and TACO's call-based tasks (`fn_name`; stdin/stdout tasks run as
scripts through sandbox.run_stdio).

This file's text runs inside the sandbox, ahead of the answer (rlhf.codeeval.call_job builds the
job); the evaluating process never imports it to run an answer. The answer
runs in a namespace of its own, and the trusted side compares what comes back with the expected
output, which never reaches the program. Only builtin and standard modules: the sandbox's
interpreter runs with -I -S (no site, so no exit() or quit() unless given here).
"""


def load(source):
    """The answer's code object; a syntax error fails the whole program at load, as it would on a judge."""
    return compile(source, "<program>", "exec")


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
