"""Mutation score of the test suite: do the tests catch the bugs that matter?

Plants one small bug at a time (a mutant: `<` -> `<=`, `+` -> `-`, `and` -> `or`, `not x` -> `x`,
a number n -> n + 1, True <-> False, max <-> min, ...) in the modules where a quiet bug costs a
training run (the PPO math, the sampler, the reward, pass@k, the sandbox's verdicts, the
hand-off), runs the fast-lane tests that cover that module, and counts the mutants the tests
catch ("killed"). Prints the score per module and every survivor (file:line, original ->
mutant): each one is a bug the suite would let through, or an equivalent mutant (one that
changes nothing a caller can see). The mutants live in a temporary copy of the repository
(tracked and untracked files, not the ignored ones); the working tree is never written. Not
part of CI: a full run takes tens of minutes on 2 cores; the last score is in bench/README.md.

    python scripts/mutation_score.py                                  # every module, 40 mutants each (seed 0)
    python scripts/mutation_score.py --modules=ppo_math,handoff --max-mutants=10 --seed=3
    python scripts/mutation_score.py --modules=pass_at_k --max-mutants=0  # every mutant of pass@k
    python scripts/mutation_score.py --list --modules=reward          # the mutants, without running tests
"""
import argparse
import ast
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module: (its file, the functions to mutate (None: all of it), the test files that cover it, the
# fastest and most direct first: a mutant is killed by the first file that fails). tests/test_ppo.py
# is left out: its whole training runs take minutes a mutant; tests/test_ppo_wiring.py checks one
# short run against a recomputation instead
SANDBOX_TESTS = ["tests/test_sandbox.py", "tests/test_sandbox_attacks.py", "tests/test_sandbox_isolation.py"]
MODULES = {
    "ppo_math": ("rlhf/ppo_math.py", None,
                 ["tests/test_ppo_math.py", "tests/test_ppo_rollout.py", "tests/test_ppo_wiring.py"]),
    "generation": ("rlhf/generation.py", None,
                   ["tests/test_generation.py", "tests/test_ppo_rollout.py", "tests/test_ppo_wiring.py"]),
    "reward": ("rlhf/reward.py", None,
               ["tests/test_reward.py", "tests/test_ppo_math.py", "tests/test_rm.py", "tests/test_ppo_rollout.py",
                "tests/test_ppo_wiring.py"]),
    "pass_at_k": ("rlhf/codeeval.py", ["pass_at_k", "summarize", "pass_at_1_metrics"], ["tests/test_codeeval.py"]),
    "sandbox_values": ("rlhf/sandbox/values.py", None, SANDBOX_TESTS),
    "sandbox_verdict": ("rlhf/sandbox/__init__.py", ["_run_calls_with", "run_calls", "run_stdio", "_stdio_result"],
                        SANDBOX_TESTS),
    "handoff": ("rlhf/handoff.py", None, ["tests/test_handoff.py", "tests/test_reliability.py"]),
}
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-n", "0"]  # fast lane, stop at the first failure

BINARY = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
          ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"), ast.BitAnd: ("&", "|"),
          ast.BitOr: ("|", "&"), ast.LShift: ("<<", ">>"), ast.RShift: (">>", "<<")}
COMPARE = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
           ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
           ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}
BOOLEAN = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
NAMES = {"max": "min", "min": "max", "amax": "amin", "amin": "amax", "any": "all", "all": "any"}


@dataclasses.dataclass
class Mutant:
    module: str
    path: str  # relative to the repository
    line: int
    column: int  # of the replaced text, from 1
    start: int  # byte offsets of the replaced text in the file
    end: int
    original: str
    mutant: str

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.mutant.encode() + source[self.end:]

    def __str__(self):
        short = lambda text: repr(text if len(" ".join(text.split())) <= 60 else " ".join(text.split())[:57] + "...")  # noqa: E731
        return f"{self.where()}  {short(self.original)} -> {short(self.mutant)}"

    def where(self):
        return f"{self.path}:{self.line}:{self.column}"


def skipped_nodes(tree):
    """Nodes whose subtree is not mutated: docstrings, f-strings, annotations, raise statements,
    print calls and the bounds of slices >= 100 (`detail[:500]`): messages, not behaviour."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper):
                value = bound.operand if isinstance(bound, ast.UnaryOp) else bound
                if isinstance(value, ast.Constant) and type(value.value) is int and value.value >= 100:
                    skip.add(bound)
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(body[0])
        if isinstance(node, (ast.JoinedStr, ast.Raise)):
            skip.add(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            skip.add(node)
        if isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation is not None:
            skip.add(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            skip.add(node.returns)
    return skip


def walk(node, skip):
    if node in skip:
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from walk(child, skip)


def mutants_of(module, path, source: bytes, functions=None):
    """Every mutant of `source` (the functions named, or the whole file), in file order."""
    tree = ast.parse(source)
    line_start = [0]
    for line in source.splitlines(keepends=True):
        line_start.append(line_start[-1] + len(line))
    offset = lambda lineno, col: line_start[lineno - 1] + col  # noqa: E731  (ast columns count UTF-8 bytes)
    column = lambda at: len(source[: at].rsplit(b"\n", 1)[-1].decode()) + 1  # noqa: E731
    roots = [tree] if functions is None else [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in functions]
    if functions is not None and len(roots) != len(functions):
        raise SystemExit(f"{path}: some of {functions} not found (found {[n.name for n in roots]})")
    skip = skipped_nodes(tree)
    out = []

    def between(a, b, old, new, line):
        """The operator `old` in the source between nodes a and b (only the operator, parentheses and
        spaces there; otherwise no mutant) -> `new`."""
        start, end = offset(a.end_lineno, a.end_col_offset), offset(b.lineno, b.col_offset)
        gap = source[start:end].decode()
        if re.sub(r"[\s()\\]", "", gap) != old.replace(" ", ""):
            return
        m = re.search(r"\s+".join(re.escape(w) for w in old.split()), gap)
        at = start + len(gap[: m.start()].encode())
        out.append(Mutant(module, path, line, column(at), at, at + len(m.group().encode()), m.group(), new))

    def whole(node, new):
        start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        out.append(Mutant(module, path, node.lineno, column(start), start, end, source[start:end].decode(), new))

    for root in roots:
        for node in walk(root, skip):
            if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
                between(node.left, node.right, *BINARY[type(node.op)], node.lineno)
            elif isinstance(node, ast.AugAssign) and type(node.op) in BINARY:
                old, new = BINARY[type(node.op)]
                between(node.target, node.value, old + "=", new + "=", node.lineno)
            elif isinstance(node, ast.Compare):
                for left, op, right in zip([node.left, *node.comparators], node.ops, node.comparators):
                    if type(op) in COMPARE:
                        between(left, right, *COMPARE[type(op)], right.lineno)
            elif isinstance(node, ast.BoolOp):
                for a, b in zip(node.values, node.values[1:]):
                    between(a, b, *BOOLEAN[type(node.op)], b.lineno)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
                start, end = offset(node.operand.lineno, node.operand.col_offset), \
                    offset(node.operand.end_lineno, node.operand.end_col_offset)
                whole(node, source[start:end].decode())  # `not x` -> `x`, `-x` -> `x`
            elif isinstance(node, ast.Constant) and type(node.value) is bool:
                whole(node, str(not node.value))
            elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
                whole(node, repr(node.value + 1))
            elif isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else \
                    node.func.attr if isinstance(node.func, ast.Attribute) else None
                if name in NAMES:
                    end = offset(node.func.end_lineno, node.func.end_col_offset)
                    out.append(Mutant(module, path, node.lineno, column(end - len(name)), end - len(name), end, name,
                                      NAMES[name]))
    unique = {(m.start, m.end, m.mutant): m for m in out}  # a node reached twice gives one mutant
    return sorted(unique.values(), key=lambda m: (m.start, m.mutant))


def copy_repository(dest):
    """The working tree's tracked and untracked files (not the ignored: .venv, outputs) under dest."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def run_tests(copy, test_file, timeout):
    """pytest's exit code for one test file in the copy ("timeout" past `timeout` seconds)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",  # a mutant of equal size and mtime must not reuse a .pyc
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST, test_file], cwd=copy, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:  # past the timeout, or on Ctrl-C (the tests run in a session of their own: it does not reach them)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and what it started (sandboxed programs)
            proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default=",".join(MODULES), help=f"comma-separated, of: {', '.join(MODULES)}")
    parser.add_argument("--max-mutants", type=int, default=40, help="per module, a seeded sample; 0: every mutant")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--timeout-factor", type=float, default=3.0,
                        help="a mutant's test file runs at most this many times its time on the unmutated code "
                             "(at least 60 s); past it the mutant counts as killed (a hang is caught)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per test file instead, without first running the files on the unmutated code "
                             "(minutes saved on a loaded machine; check that the fast lane passes yourself)")
    parser.add_argument("--list", action="store_true", help="print the sampled mutants and stop")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")

    plan = {}
    for name in names:
        path, functions, _ = MODULES[name]
        every = mutants_of(name, path, open(os.path.join(ROOT, path), "rb").read(), functions)
        picked = every if not args.max_mutants or len(every) <= args.max_mutants else \
            random.Random(f"{args.seed}:{name}").sample(every, args.max_mutants)
        plan[name] = (len(every), sorted(picked, key=lambda m: m.start))
        print(f"{name}: {len(plan[name][1])} of {len(every)} mutants ({path})")
    if args.list:
        for name, (_, picked) in plan.items():
            for m in picked:
                print(f"  {m}")
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="mutation-") as copy:
        copy_repository(copy)
        timeout = {}  # seconds each test file may take on a mutant
        for test_file in sorted({t for name in names for t in MODULES[name][2]}):
            if args.timeout:
                timeout[test_file] = args.timeout
                continue
            t0 = time.time()
            code = run_tests(copy, test_file, None)
            if code not in (0, 5):
                raise SystemExit(f"{test_file} fails on the unmutated code (exit {code}): fix that first")
            print(f"unmutated {test_file}: {time.time() - t0:.0f} s")
            timeout[test_file] = max(60.0, args.timeout_factor * (time.time() - t0))
        for name, (_, picked) in plan.items():
            path, _, test_files = MODULES[name]
            original = open(os.path.join(copy, path), "rb").read()
            results[name] = []
            for i, m in enumerate(picked, 1):
                with open(os.path.join(copy, path), "wb") as f:
                    f.write(m.apply(original))
                outcome = "survived"
                try:
                    for test_file in test_files:
                        code = run_tests(copy, test_file, timeout[test_file])
                        if code not in (0, 5):  # 5: no fast-lane test in the file
                            outcome = "timeout" if code == "timeout" else "killed"
                            break
                finally:
                    with open(os.path.join(copy, path), "wb") as f:
                        f.write(original)
                results[name].append((m, outcome))
                print(f"[{name} {i}/{len(picked)}] {outcome:8} {m}", flush=True)

    print("\n| module | mutants (sampled of all) | killed | timeout | survived | score |\n|---|---|---|---|---|---|")
    total = caught = 0
    for name, rows in results.items():
        killed = sum(o == "killed" for _, o in rows)
        timeouts = sum(o == "timeout" for _, o in rows)
        total, caught = total + len(rows), caught + killed + timeouts
        score = f"{100 * (killed + timeouts) / len(rows):.0f}%" if rows else "-"
        print(f"| {name} | {len(rows)} of {plan[name][0]} | {killed} | {timeouts} | {len(rows) - killed - timeouts} | {score} |")
    if total:
        print(f"| all | {total} | | | {total - caught} | {100 * caught / total:.0f}% |")
    survivors = [m for rows in results.values() for m, o in rows if o == "survived"]
    print(f"\nsurvivors ({len(survivors)}):" if survivors else "\nno survivors")
    for m in survivors:
        print(f"  {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
