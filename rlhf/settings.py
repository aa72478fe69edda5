"""`--NAME=value` overrides of the constants in config.py, the one override mechanism of every
stage script. Unknown names fail with the close matches; values are checked against the type of
the constant they replace; each change is printed once."""

import ast
import difflib

import config as C


class UserError(Exception):
    """A mistake the user can fix (missing input, bad data, unknown setting). Stage scripts turn
    it into one `error: ...` line and a non-zero exit, without a traceback."""


def settings():
    """The current settings: every UPPER_CASE constant of config.py, name -> value."""
    return {k: v for k, v in vars(C).items() if k.isupper() and not k.startswith("_")}


def parse_value(name, text, current):
    """Convert `text` to the type of `current` (the constant it overrides)."""
    if isinstance(current, bool):  # before int: bool is a subclass of int
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:  # accept 1e3 style integers, but not 0.5
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise UserError(f"--{name} expects an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    # None, lists, tuples, dicts: a Python literal, else the plain string
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(argv, quiet=False):
    """Apply `--NAME=value` arguments to config.py's constants in place and return the changes.

    Names are matched case-insensitively and `-` may stand for `_` (`--lr=1e-4` sets LR)."""
    known = settings()
    by_key = {k.lower(): k for k in known}
    changes = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: settings are given as --NAME=value, "
                            "for example --LR=1e-4 (names are the constants in config.py)")
        raw_name, text = arg[2:].split("=", 1)
        name = by_key.get(raw_name.replace("-", "_").lower())
        if name is None:
            close = difflib.get_close_matches(raw_name.upper().replace("-", "_"), list(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; the names are the constants in config.py"
            raise UserError(f"unknown setting --{raw_name}{hint}")
        value = parse_value(name, text, known[name])
        setattr(C, name, value)
        changes[name] = value
        if not quiet:
            print(f"setting {name} = {value!r} (config.py has {known[name]!r})")
    return changes
