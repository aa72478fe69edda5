"""Values between the trusted side and a program: the strict tagged encoding a reply is decoded
from (only exact builtin values, bounded in depth, size and hash collisions), its inverse for
the arguments sent to a program, and the comparison of a result with the expected value."""
from __future__ import annotations

import math
import reprlib
import time

from rlhf.sandbox.verdict import MAX_DEPTH, MAX_DIGITS, SAME_HASH, _ChildGone


def _decode_strict(enc, deadline: float | None = None):
    """A value from the program's encoding; _ChildGone("error") for anything not exactly valid,
    _ChildGone("timeout") once decoding it runs past `deadline`."""
    try:
        return _Decoder(deadline).value(enc, 0)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        raise _ChildGone("error", "malformed value") from None


_HASH_MODULUS = (1 << 61) - 1  # ints below it in size have distinct hashes (but -1 and -2)


class _Decoder:
    """Rebuilds one reply from the runner's tagged encoding. The work counts against the program's
    deadline, checked every 256 values, and a reply cannot be built to make hash tables quadratic:
    more than SAME_HASH distinct numbers, tuples or frozensets sharing one hash (k * (2**61 - 1)
    for many k, crafted tuples) is refused, since every set or dict built from them, here or by a
    test's `set(candidate(x))`, would cost time in the square of their number. Strings are safe:
    their hashes are salted per process."""

    def __init__(self, deadline: float | None):
        self.deadline, self.count, self.by_hash = deadline, 0, {}

    def value(self, enc, depth):
        self.count += 1
        if not self.count & 255 and self.deadline is not None and time.monotonic() > self.deadline:
            raise _ChildGone("timeout", "time limit exceeded (reading the reply)")
        if depth > MAX_DEPTH + 1 or type(enc) is not list or not enc or type(enc[0]) is not str:
            raise ValueError("bad value")
        tag, rest = enc[0], enc[1:]
        if tag == "n" and not rest:
            return None
        if len(rest) != 1:
            raise ValueError("bad value")
        x = rest[0]
        if tag == "b" and type(x) is bool or tag == "s" and type(x) is str:
            return x
        if tag in ("i", "f", "c") and type(x) is str and len(x) <= MAX_DIGITS + 1:
            v = {"i": int, "f": float, "c": complex}[tag](x)
            if not (tag == "i" and -_HASH_MODULUS < v < _HASH_MODULUS or v != v):  # v != v: nan
                self.distinct_hash(v)
            return v
        if type(x) is not list:
            raise ValueError("bad value")
        if tag == "d":
            out = {}
            for pair in x:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("bad value")
                out[self.value(pair[0], depth + 1)] = self.value(pair[1], depth + 1)
            if len(out) != len(x):  # two equal keys: no dict the program held
                raise ValueError("bad value")
            return out
        kind = {"l": list, "t": tuple, "S": set, "F": frozenset}[tag]
        out = kind(self.value(item, depth + 1) for item in x)
        if len(out) != len(x):  # two equal members: no set the program held
            raise ValueError("bad value")
        if kind is tuple or kind is frozenset:
            self.distinct_hash(out)
        return out

    def distinct_hash(self, v) -> None:
        try:
            seen = self.by_hash.setdefault(hash(v), [])
        except TypeError:  # a tuple holding a list: no set or dict can hold it either
            return
        if not any(s == v for s in seen):
            seen.append(v)
            if len(seen) > SAME_HASH:
                raise _ChildGone("error", f"reply with over {SAME_HASH} distinct values of one hash "
                                          "(built to make hash tables slow)")


def decode_value(enc):
    """Rebuild a value from the runner's tagged encoding (ValueError when malformed)."""
    try:
        return _Decoder(None).value(enc, 0)
    except (TypeError, KeyError, IndexError, RecursionError) as e:
        raise ValueError(f"malformed value: {e}") from None
    except _ChildGone as e:
        raise ValueError(e.detail) from None


def encode_value(v, depth: int = 0):
    """The tagged encoding of an exact builtin value (the inverse of decode_value)."""
    t = type(v)
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    if v is None:
        return ["n"]
    if t is bool:
        return ["b", v]
    if t in (int, float, complex):
        return ["i" if t is int else "f" if t is float else "c", repr(v)]
    if t is str:
        return ["s", v]
    if t is dict:
        return ["d", [[encode_value(k, depth + 1), encode_value(x, depth + 1)] for k, x in v.items()]]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [encode_value(x, depth + 1) for x in v]]
    raise TypeError(f"a value of type {t.__name__} cannot be sent to the program")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 6, 200, 200, 200
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 20


def _short(v) -> str:
    """repr(v) in at most a few hundred characters, in time that does not grow with v's size."""
    return _SHORT.repr(v)


def _exact(v):
    """A stand-in for `v` that equals another one only where the types are the same at every depth
    (1, 1.0, True and 1+0j are four keys; (1,) and (True,) two), to compare dict keys and set members."""
    t = type(v)
    if t is tuple:
        return t, tuple(_exact(x) for x in v)
    if t is frozenset:
        return t, frozenset(_exact(x) for x in v)
    return t, v


def values_match(got, want) -> bool:
    """Exact types at every depth, dict keys and set members included (1 != 1.0 != True); floats
    within 1e-6 relative/absolute where they are items or dict values (keys and members: exactly)."""
    t = type(got)
    if t is not type(want):
        return False
    if t is float:
        return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if t is list or t is tuple:
        return len(got) == len(want) and all(values_match(g, w) for g, w in zip(got, want))
    if t is dict:  # `==` would match keys through hashing, where True, 1 and 1.0 are one key
        if len(got) != len(want):
            return False
        keys = {_exact(k): k for k in got}
        return all(_exact(k) in keys and values_match(got[keys[_exact(k)]], w) for k, w in want.items())
    if t is set or t is frozenset:
        return len(got) == len(want) and {_exact(x) for x in got} == {_exact(x) for x in want}
    return got == want
