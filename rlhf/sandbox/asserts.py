"""The trusted side of assert-style tests (HumanEval, MBPP: run_asserts): the tests run here, in a
namespace of their own, and every name they take from the program is a proxy that sends the call
to it as encoded values."""
from __future__ import annotations

import ast
import builtins
import importlib.util

from rlhf.sandbox.child import _Child
from rlhf.sandbox.values import encode_value
from rlhf.sandbox.verdict import _ChildGone

_EXCEPTIONS = {k: v for k, v in vars(builtins).items()
               if isinstance(v, type) and issubclass(v, Exception)}


class _Proxy:
    """Stands for the program's function `name` in the trusted tests: arguments go out encoded,
    the value (or the exception's builtin class) comes back decoded."""

    def __init__(self, child: _Child, name: str, state: dict):
        self.child, self.name, self.state = child, name, state

    def __call__(self, *args, **kwargs):
        try:
            encode_value([args, kwargs])  # only exact builtin values cross to the program
            request = {"fn": self.name, "args": list(args), "kwargs": dict(kwargs)}
        except TypeError as e:
            raise _ChildGone("error", f"test of {self.name}: {e}") from None
        value, err = self.child.call_value(request)
        if err is None:
            return value
        status, detail, exc = err
        if status in ("memory", "refused", "timeout"):
            self.state.setdefault("status", (status, detail))
        self.state.setdefault("detail", f"{self.name}(...) raised {detail}")
        raise _EXCEPTIONS.get(exc, RuntimeError)(f"{self.name}(...) raised {detail}")

    def __repr__(self):
        return f"<sandboxed {self.name}>"


def _test_globals() -> dict:
    """Globals for trusted test code: builtins whose `import random` gives a private copy,
    so tests neither reseed nor advance this process's random numbers."""
    own = {}

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "random" and level == 0:
            if "random" not in own:
                spec = importlib.util.find_spec("random")
                own["random"] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(own["random"])
            return own["random"]
        return builtins.__import__(name, globals, locals, fromlist, level)

    return {"__builtins__": {**vars(builtins), "__import__": guarded_import}, "__name__": "__tests__"}


def _free_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _trusted_helpers(helpers: str, entry_point: str):
    """The prompt's helper code (imports, other functions), without the entry point's stub."""
    try:
        tree = ast.parse(helpers)
    except (SyntaxError, ValueError):
        return None
    tree.body = [s for s in tree.body if not (isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                                              and s.name == entry_point)]
    return compile(tree, "<helpers>", "exec")
