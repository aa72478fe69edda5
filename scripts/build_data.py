"""Build the bundled code-task data in data/ from scripts/task_families.py, every label verified by
running it in rlhf/sandbox/: references pass, rejected programs fail, and the tests of every
eval, validation and in-distribution task reject its family's bugs, the other variants' references
and the mutants of its reference that change what it returns.

Writes sft_train/sft_eval (TRL conversational), rm_train/rm_eval (TRL preference), ppo_prompts,
eval_tasks, val_tasks, indist_tasks and seed_prompts (project problem format, see data/DATA_CARD.md).

    python scripts/build_data.py                      # seed 0 -> data/
    python scripts/build_data.py --seed 1 --out /tmp/data
    python scripts/build_data.py --families 3 --out /tmp/small   # first 3 families (tests)
"""
import argparse
import ast
import collections
import copy
import itertools
import json
import os
import random
import re
import time

from rlhf import sandbox
from rlhf.common import run_stage
from rlhf.settings import UserError

if __package__:  # imported as scripts.build_data (tests, bench/)
    from scripts import task_families
else:  # run as `python scripts/build_data.py`: scripts/ is first on sys.path
    import task_families

WRAPPERS = {  # phrasing around each template: a model has to find the task inside
    "en": ["{}", "{} Reply with the code only.", "Python question: {}", "Please solve this. {}"],
    "zh": ["{}", "{}只需要给出代码。", "Python编程题：{}", "请完成：{}"],
}
SFT_TRAIN_PER_FAMILY = 170    # cap per family, so families with many variants do not dominate
SFT_EVAL_PER_FAMILY = 8
RM_TRAIN_PER_FAMILY = 60
RM_EVAL_PER_FAMILY = 8
RM_EVAL_PAIR_SHARE = 0.2      # share of a family's (variant, bug) program pairs that only rm_eval holds
PPO_PER_FAMILY = 20           # PPO prompts per family: unseen phrasings of the training variants
INDIST_PER_FAMILY = 2         # in-distribution tasks per family (indist_tasks.jsonl): the same, never trained on
POOL_MIN = 30                 # reserve at least this many of a family's training-variant instances for PPO + indist
EVAL_PER_FAMILY = 10          # eval tasks per family (eval_tasks.jsonl), its eval variants taken in turn
VAL_PER_FAMILY = 8            # validation tasks per family (val_tasks.jsonl): for choosing settings, never trained on
PER_VARIANT = 4               # at most this many eval (or validation) tasks on one variant (task class)
VAL_EVERY = 3                 # of a family's held-out variants the 2nd, 5th, 8th ... are validation's, the rest eval's
PROBE_DRAWS = 8               # probe inputs: the tests', the input generator's on this many more seeds, every variant's
CHECK_TIMEOUT_S = 0.25        # per wrong program on one task's tests (a reference takes ~10 ms; many mutants loop)
BATCH_TIMEOUT_S = 0.5         # per sandbox job that holds all the wrong programs of one task (passes)
PROBE_TIMEOUT_S = 2.0         # per program on the probe inputs (more calls)
# Realistic imperfection (data/DATA_CARD.md): in these families most SFT demonstrations come from
# a source with one habitual bug, as code scraped or written by people has. The tests and the RM
# pairs still call it wrong, so SFT imitates it and RL has something to correct.
HABITS = {"is_prime": "off_by_one", "fizzbuzz": "wrong_order", "caesar": "no_wrap", "kth_largest": "no_dedup",
          "chunk": "drops_tail", "fibonacci": "off_by_one", "flatten": "one_level",
          "power_sum": "off_by_one", "count_char": "off_by_one", "prefix_scan": "append_before_update",
          "word_freq": "wrong_init", "run_length": "off_by_one", "max_subarray": "zero_init"}
HABIT_SHARE = 0.6             # share of a habit family's SFT demonstrations that carry its bug
TRAINING = ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo")  # the files a model learns or selects from


def fenced(code):
    return f"```python\n{code}\n```"


def variant_roles(fam):
    """The role of each variant (parameter index) of a family: "train" (any training file may hold
    it), "eval", "val" (held out of every training file and of each other) or "seed" (the natural
    prompts' variant: seed_prompts.jsonl only, so that check asks for a program no training row
    holds). Variants that only a method tells apart (Family.behaviour) share their role."""
    held = list(dict.fromkeys(fam.task_class(i) for i in range(fam.n_seen, len(fam.params))))
    role = {c: "val" if j % VAL_EVERY == 1 else "eval" for j, c in enumerate(held)}
    if fam.bare:
        if fam.task_class(0) in role:
            raise UserError(f"{fam.name}: the natural prompts' variant (params[0]) is held out")
        role[fam.task_class(0)] = "seed"
    mixed = {fam.task_class(i) for i in range(fam.n_seen)} & set(held)
    if mixed:
        raise UserError(f"{fam.name}: variants {sorted(mixed)} differ only in method, but some are held out and "
                        "some not; order Family.params so that they are held out together")
    return [role.get(fam.task_class(i), "train") for i in range(len(fam.params))]


def wrong_value_variant(fam, pi, roles=None):
    """Index of the variant whose reference is variant pi's `wrong_value` bug: the next training
    variant that is another task (wrapping round), i.e. code that ignores what the prompt asks (a
    count of 'e' for "count the 'a'"); training variants only, so no held-out value reaches the RM
    pairs. None when there is none."""
    roles = roles or variant_roles(fam)
    seen = [i for i, r in enumerate(roles) if r == "train"]
    after = [i for i in seen if i > pi] + [i for i in seen if i < pi]
    return next((i for i in after if fam.task_class(i) != fam.task_class(pi)), None)


def preference_row(t, rejected_code, bug):
    """An RM pair (TRL conversational preference format): task t's reference over rejected_code."""
    return {"prompt": [{"role": "user", "content": t["prompt"]}],
            "chosen": [{"role": "assistant", "content": fenced(t["solution"])}],
            "rejected": [{"role": "assistant", "content": fenced(rejected_code)}],
            "task_id": t["task_id"], "family": t["family"], "lang": t["lang"], "bug": bug}


def call_of(fam, name, args):
    return fam.call(name, args) if fam.call else f"{name}({', '.join(map(repr, args))})"


def instances(fi, fam, rng):
    """All (family, params, name, phrasing) instances of one family, with their task fields."""
    out = []
    roles = variant_roles(fam)
    for pi, p in enumerate(fam.params):
        other = wrong_value_variant(fam, pi, roles)
        tests_rng = random.Random(f"{rng.random()}")  # tests depend on (family, params) only
        args_list = fam.inputs(tests_rng, p)
        names = list(dict.fromkeys(task_families.fill(n, p, "") for n in fam.names))
        for name in names:
            tests = []
            for args in args_list:
                want = fam.oracle(p, *args)
                if ast.literal_eval(repr(want)) != want:
                    raise UserError(f"{fam.name}: expected value {want!r} is not a literal")
                tests.append({"call": call_of(fam, name, args), "expected": repr(want)})
            base = {"family": fam.name, "entry_point": name, "setup": fam.setup,
                    "solution": task_families.fill(fam.code, p, name), "tests": tests,
                    "bugs": {task_families.fill(k, p, name): task_families.fill(v, p, name) for k, v in fam.bugs.items()}
                    | ({"wrong_value": task_families.fill(fam.code, fam.params[other], name)} if other is not None else {}),
                    "heldout_params": roles[pi] != "train", "role": roles[pi], "pi": pi, "cls": fam.task_class(pi),
                    "args": args_list}
            # the natural prompts, as a user asks without naming a function or an order: the seed check
            prompts = [("bare", lang, text) for lang, text in fam.bare] if pi == 0 and name == names[0] else []
            for lang in ("en", "zh"):
                for ti, t in enumerate(getattr(fam, lang)):
                    if "$name" not in t and "${name}" not in t and name != names[0]:
                        continue  # a template without a name means the convention name
                    for wi, w in enumerate(WRAPPERS[lang]):
                        prompts.append((f"t{ti}w{wi}", lang, w.format(task_families.fill(t, p, name))))
            for tag, lang, text in prompts:
                out.append({**base, "task_id": f"{fam.name}/{pi}/{name}/{lang}/{tag}", "lang": lang,
                            "prompt": text, "bare": tag == "bare", "seed": tag == "bare"})
    return out


def renamed(code, name, new):
    """The program with its function (or class) `name` called `new`, as ast.unparse writes it."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            node.name = new
        elif isinstance(node, ast.Name) and node.id == name:
            node.id = new
    return ast.unparse(tree)


def unnamed(code, name):
    """The program with its function named NAME: the same program under another name compares equal."""
    return renamed(code, name, "NAME")


def test_job(t, code, timeout=None):
    """A sandbox job: program `code` on task t's tests."""
    return dict(program=code, calls=[x["call"] for x in t["tests"]], setup=t["setup"], timeout=timeout,
                expected=[ast.literal_eval(x["expected"]) for x in t["tests"]])


def batch_job(t, codes):
    """One sandbox job for several programs on task t's tests: program j named <name>_<j>, its call
    the list of t's test calls, its expected value the list of theirs. The job fails every call
    (pass_fraction 0) when, and only when, every program fails the tests."""
    name = t["entry_point"]
    calls = ["[" + ", ".join(re.sub(rf"\b{name}\b", f"{name}_{j}", x["call"]) for x in t["tests"]) + "]"
             for j in range(len(codes))]
    return dict(program="\n\n".join(renamed(c, name, f"{name}_{j}") for j, c in enumerate(codes)), calls=calls,
                expected=[[ast.literal_eval(x["expected"]) for x in t["tests"]]] * len(codes), setup=t["setup"],
                timeout=BATCH_TIMEOUT_S)


def passes(groups, workers=None, timeout=CHECK_TIMEOUT_S):
    """{(key, kind): passed?} of programs most of which should fail their task's tests: groups are
    (key, task, [(kind, program)]). Each group runs as one sandbox job (batch_job), and its programs
    one at a time (`timeout` each; None: the sandbox's own) where that job did not fail them all:
    one passed, or one looped and the job timed out."""
    verdicts = sandbox.run_many([batch_job(t, [c for _, c in ps]) for _, t, ps in groups], workers=workers)
    out, singles = {}, []
    for (key, t, ps), v in zip(groups, verdicts):
        if v.status == "failed" and v.pass_fraction == 0:
            out.update({(key, kind): False for kind, _ in ps})
        else:
            singles += [((key, kind), test_job(t, code, timeout)) for kind, code in ps]
    out.update({k: v.passed for (k, _), v in zip(singles, sandbox.run_many([j for _, j in singles], workers=workers))})
    return out


def verify(tasks, rm_tasks, workers=None):
    """Run the reference of every variant (must pass) and every bug of the RM tasks (must fail),
    once per variant (family, pi): its tests and programs under its two names differ in the name alone.

    Exits with a list when a reference fails. A bug that passes a parameter variant's tests
    is equivalent to the reference there (e.g. a wrong direction with a shift of 13), so it
    is dropped for that variant; an RM task left without any failing bug is an error.
    Returns (programs run, {(family, pi): failing bug kinds}, bugs dropped).
    """
    refs, bugs = {}, {}
    for t in tasks:
        refs.setdefault((t["family"], t["pi"]), t)
    for t in rm_tasks:
        bugs.setdefault((t["family"], t["pi"]), t)
    verdicts = sandbox.run_many([test_job(t, t["solution"]) for t in refs.values()], workers=workers)
    bad = [f"{'/'.join(map(str, key))} reference: {v.status} {v.detail}" for key, v in zip(refs, verdicts) if not v.passed]
    # the sandbox's own time limit: which bugs fail decides the files, and must not depend on the load
    passed = passes([(key, t, sorted(t["bugs"].items())) for key, t in bugs.items()], workers, timeout=None)
    failing = collections.defaultdict(list)
    for (key, kind), ok in passed.items():
        if not ok:
            failing[key].append(kind)
    bad += [f"{t['task_id']}: no bug fails the tests" for t in rm_tasks if not failing[(t["family"], t["pi"])]]
    if bad:
        raise UserError("labels failed verification (references must pass, rejected "
                        "programs must fail):\n  " + "\n  ".join(bad[:20])
                        + (f"\n  ... {len(bad) - 20} more" if len(bad) > 20 else ""))
    return len(refs) + len(passed), failing, sum(passed.values())


# ---------------------------------------------------------------- mutants
_BINOPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Add, ast.FloorDiv], ast.FloorDiv: [ast.Mult, ast.Mod],
           ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult], ast.Div: [ast.FloorDiv]}
_COMPARE = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE], ast.Gt: [ast.GtE, ast.Lt], ast.GtE: [ast.Gt, ast.LtE],
            ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.In: [ast.NotIn], ast.NotIn: [ast.In],
            ast.Is: [ast.IsNot], ast.IsNot: [ast.Is]}


def _plus(node, d):
    return ast.BinOp(node, ast.Add() if d > 0 else ast.Sub(), ast.Constant(1))


class _Mutate(ast.NodeTransformer):
    """Makes mutation number `target` of a syntax tree, counting the possible ones in visiting
    order (so one tree copy per mutant, the same count each time); `kind` names it, None when
    the tree has fewer. Mutations, after Offutt et al. 1996's sufficient operators: arithmetic and
    comparison operators, and/or, dropped not and unary minus, integer constants +-1, the non-constant
    bounds of range() and slices and indexes +-1, conditions negated, statements deleted, a loop
    left after its first pass (`break`) or through the return that follows it (an early return)."""

    def __init__(self, target):
        self.target, self.count, self.kind = target, 0, None

    def _here(self, kind):
        hit = self.count == self.target
        self.count += 1
        if hit:
            self.kind = kind
        return hit

    def visit_BinOp(self, node):
        self.generic_visit(node)
        for alt in _BINOPS.get(type(node.op), []):
            if self._here(f"{type(node.op).__name__} -> {alt.__name__}"):
                node.op = alt()
        return node

    def visit_AugAssign(self, node):
        return self.visit_BinOp(node)

    def visit_Compare(self, node):
        self.generic_visit(node)
        for i, op in enumerate(list(node.ops)):
            for alt in _COMPARE[type(op)]:
                if self._here(f"{type(op).__name__} -> {alt.__name__}"):
                    node.ops[i] = alt()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        if self._here("and <-> or"):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)) and self._here(f"drop {type(node.op).__name__}"):
            return node.operand
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, bool):
            if self._here("True <-> False"):
                return ast.Constant(not node.value)
        elif isinstance(node.value, int):
            for d in (1, -1):
                if self._here(f"constant {d:+d}"):
                    return ast.Constant(node.value + d)
        return node

    def _bound(self, node, what):
        for d in (1, -1):
            if node is not None and not isinstance(node, ast.Constant) and self._here(f"{what} {d:+d}"):
                return _plus(node, d)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "range":
            node.args = [self._bound(a, "range bound") for a in node.args]
        return node

    def visit_Slice(self, node):
        self.generic_visit(node)
        node.lower, node.upper = self._bound(node.lower, "slice start"), self._bound(node.upper, "slice end")
        return node

    def visit_Subscript(self, node):
        self.generic_visit(node)
        if not isinstance(node.slice, (ast.Slice, ast.Tuple)):
            node.slice = self._bound(node.slice, "index")
        return node

    def _negate(self, node):
        if self._here("condition negated"):
            return ast.UnaryOp(ast.Not(), node)
        return node

    def visit_IfExp(self, node):
        self.generic_visit(node)
        node.test = self._negate(node.test)
        return node

    def visit_comprehension(self, node):
        self.generic_visit(node)
        node.ifs = [self._negate(c) for c in node.ifs]
        return node

    def _block(self, node, field="body"):
        stmts = getattr(node, field)
        for i, s in enumerate(list(stmts)):
            if self._here(f"line {s.lineno} deleted"):
                setattr(node, field, stmts[:i] + stmts[i + 1:] or [ast.Pass()])
                return
            if isinstance(s, (ast.For, ast.While)):
                if self._here(f"line {s.lineno} loop breaks after one pass"):
                    s.body = s.body + [ast.Break()]
                    return
                ret = next((r for r in stmts[i + 1:] if isinstance(r, ast.Return)), None)
                if ret is not None and self._here(f"line {ret.lineno} returns inside the loop above it"):
                    s.body = s.body + [copy.deepcopy(ret)]
                    return

    def visit_If(self, node):
        self.generic_visit(node)
        node.test = self._negate(node.test)
        self._block(node)
        if node.orelse:
            self._block(node, "orelse")
        return node

    def visit_While(self, node):
        self.generic_visit(node)
        node.test = self._negate(node.test)
        self._block(node)
        return node

    def visit_For(self, node):
        self.generic_visit(node)
        self._block(node)
        return node

    visit_FunctionDef = visit_ClassDef = visit_For


def mutants(code):
    """[("#number kind", program)] of the distinct mutants of a program (_Mutate) that compile."""
    tree = ast.parse(code)
    out, seen = [], {ast.unparse(tree)}
    for target in itertools.count():
        mutate = _Mutate(target)
        mutant = mutate.visit(copy.deepcopy(tree))
        if mutate.kind is None:
            return out
        src = ast.unparse(ast.fix_missing_locations(mutant))
        if src in seen:
            continue
        seen.add(src)
        try:
            compile(src, "<mutant>", "exec")  # compiled, never run here: only in the sandbox
        except SyntaxError:  # e.g. a `break` that no loop holds any more
            continue
        out.append((f"#{target} {mutate.kind}", src))  # numbered: a kind recurs at other places


# ---------------------------------------------------------------- tests that reject wrong programs
def nearby(value):
    """Values near an argument, of its type: the neighbours a test suggests, where a generator's
    blind spot hides (the square of a small prime, a list with each value twice, a word reversed)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [0, value - 1, value + 1, -value, 2 * value] + ([value * value] if abs(value) <= 5 else [])
    if isinstance(value, str):
        return [value[::-1], value.upper(), value.lower(), value + value, value[1:], " " + value]
    if isinstance(value, list):
        out = [value[::-1], value + value, value[1:], value[:-1]]
        if all(type(x) is int for x in value):
            out += [sorted(value), sorted(value + value), [x + 1 for x in value], [-x for x in value]]
        return out
    return []


def probe_inputs(fam, p, name, tests):
    """(calls, expected) on which a program must answer as variant p's oracle does to count as
    equivalent to its reference: the tests, the input generator drawn on PROBE_DRAWS more seeds,
    each argument of those draws moved to a value nearby, and the inputs the generator gives every
    other variant (those this variant's oracle can answer)."""
    draws = [a for r in range(PROBE_DRAWS) for a in fam.inputs(random.Random(f"probe {fam.name} {r}"), p)]
    draws += [args[:i] + (v,) + args[i + 1:] for args in draws for i, x in enumerate(args) for v in nearby(x)]
    draws += [a for qi, q in enumerate(fam.params) for a in fam.inputs(random.Random(f"probe {fam.name} variant {qi}"), q)]
    calls, expected = [x["call"] for x in tests], [ast.literal_eval(x["expected"]) for x in tests]
    seen = set(calls)
    for args in draws:
        call = call_of(fam, name, args)
        if call in seen:
            continue
        seen.add(call)
        try:
            want = fam.oracle(p, *args)
        except Exception:  # noqa: BLE001 -- an input not of this variant's (a collatz start that cycles, 0 for roman)
            continue
        if ast.literal_eval(repr(want)) == want:
            calls.append(call)
            expected.append(want)
    return calls, expected


def wrong_programs(t):
    """[(kind, program)] task t's tests must reject, its reference's other variants aside: its
    family's bugs (filled for t's variant and name) and the mutants of its reference; distinct."""
    out = [(f"bug {k}", code) for k, code in t["bugs"].items() if k != "wrong_value"]
    out += [(f"mutant: {kind}", code) for kind, code in mutants(t["solution"])]
    seen, distinct = {ast.unparse(ast.parse(t["solution"]))}, []
    for kind, code in out:
        key = ast.unparse(ast.parse(code))
        if key not in seen:
            seen.add(key)
            distinct.append((kind, code))
    return distinct


def answers(fam, p, args_list):
    """Variant p's oracle on each argument tuple; None where it has none (another variant's input
    it cannot take: a collatz start that cycles under its rule, an unsorted list)."""
    out = []
    for args in args_list:
        try:
            out.append(fam.oracle(p, *args))
        except Exception:  # noqa: BLE001 -- any error of the oracle means the input is not one of p's
            out.append(None)
    return out


def other_references(units, fams):
    """How the tests of each unit (family, pi) fare against the reference of every variant of its
    family that is another task. Variant q's reference runs once on the test inputs of all the
    units it must fail, and must answer there as q's oracle does (else it is wrong); a unit's
    tests reject it when one of them expects other than q's oracle answers. Where q's oracle has no
    answer for a unit's input (it loops there, or raises), q's reference runs on that unit's tests.
    Returns (runs of q's references, {(unit, kind): accepted?} decided, jobs still to run)."""
    runs, decided, jobs = [], {}, []
    for family in dict.fromkeys(k[0] for k in units):
        fam = fams[family]
        for qi, q in enumerate(fam.params):
            against = [(key, t) for key, t in units.items()
                       if key[0] == family and fam.task_class(t["pi"]) != fam.task_class(qi)]
            if not against:
                continue
            args = list({repr(a): a for _, t in against for a in t["args"]}.values())
            got = dict(zip(map(repr, args), answers(fam, q, args)))
            name = against[0][1]["entry_point"]
            ok = [a for a in args if got[repr(a)] is not None]
            runs.append((f"{family}/{qi}", dict(program=task_families.fill(fam.code, q, name), setup=fam.setup,
                                                calls=[call_of(fam, name, a) for a in ok],
                                                expected=[got[repr(a)] for a in ok])))
            for key, t in against:
                q_says = [got[repr(a)] for a in t["args"]]
                want = [ast.literal_eval(x["expected"]) for x in t["tests"]]
                if any(g is not None and not sandbox.values_match(g, w) for g, w in zip(q_says, want)):
                    decided[(key, f"variant {qi}")] = False
                elif None in q_says:
                    code = task_families.fill(fam.code, q, t["entry_point"])
                    jobs.append(((key, f"variant {qi}"), test_job(t, code, CHECK_TIMEOUT_S)))
                else:
                    decided[(key, f"variant {qi}")] = True
    return runs, decided, jobs


def check_tests(tasks, families, workers=None):
    """Do the tests of these tasks reject wrong programs? Checked once per variant (family, pi),
    under one of its names (tests and programs differ only in the name): its family's bugs, the
    mutants of its reference (wrong_programs), and the reference of every variant that is another
    task (other_references). A bug or mutant its tests accept is run on the probe inputs
    (probe_inputs): one that answers them all as the oracle does is equivalent to the reference
    there and skipped (counted, the bugs listed); any other, and any other task's reference, is a
    wrong program the tests accept, and the build stops with the list. Returns ({(family, pi):
    Counter of bugs, variants and mutants killed or equivalent}, ["family/pi: bug" equivalent])."""
    fams = {f.name: f for f in families}
    units = {}
    for t in tasks:
        units.setdefault((t["family"], t["pi"]), t)
    probes = {}
    for key, t in units.items():
        calls, expected = probe_inputs(fams[key[0]], fams[key[0]].params[key[1]], t["entry_point"], t["tests"])
        probes[key] = dict(calls=calls, expected=expected, setup=t["setup"], timeout=PROBE_TIMEOUT_S)

    runs, passed, jobs = other_references(units, fams)
    jobs += [((key, "reference"), dict(probes[key], program=t["solution"])) for key, t in units.items()]
    verdicts = sandbox.run_many([j for _, j in runs] + [j for _, j in jobs], workers=workers)
    bad = [f"reference of {what} on the inputs of the other variants' tests: {v.status} {v.detail}"
           for (what, _), v in zip(runs, verdicts) if not v.passed]
    verdicts = dict(zip((k for k, _ in jobs), verdicts[len(runs):]))
    bad += [f"{key[0]}/{key[1]} reference on the probe inputs: {v.status} {v.detail}"
            for (key, kind), v in verdicts.items() if kind == "reference" and not v.passed]
    passed |= {k: v.passed for k, v in verdicts.items() if k[1] != "reference"}  # the other variants' references
    bad += [f"{key[0]}/{key[1]}/{units[key]['entry_point']}: its tests accept the reference of {kind}, another task "
            "(strengthen the inputs; if no input tells the two apart, make them one task: Family.behaviour)"
            for (key, kind), ok in passed.items() if ok]
    wrong = {key: wrong_programs(t) for key, t in units.items()}
    passed |= passes([(key, units[key], ps) for key, ps in wrong.items()], workers)
    programs = {(key, kind): code for key, ps in wrong.items() for kind, code in ps}
    accepted = [k for k, ok in passed.items() if ok and not k[1].startswith("variant")]
    on_probes = sandbox.run_many([dict(probes[key], program=programs[(key, kind)]) for key, kind in accepted],
                                 workers=workers)
    equivalent = {k for k, v in zip(accepted, on_probes) if v.passed}
    bad += [f"{key[0]}/{key[1]}/{units[key]['entry_point']}: its tests accept {kind} ({v.detail})"
            for (key, kind), v in zip(accepted, on_probes) if not v.passed]
    if bad:
        raise UserError(f"tests too weak or references wrong ({len(bad)}): strengthen the family's inputs in "
                        "scripts/task_families.py\n  " + "\n  ".join(bad[:40])
                        + (f"\n  ... {len(bad) - 40} more" if len(bad) > 40 else ""))
    stats = collections.defaultdict(collections.Counter)
    for (key, kind), ok in passed.items():
        stats[key][f"{kind.split()[0].rstrip(':')} {'equivalent' if ok else 'killed'}"] += 1  # bug, variant, mutant
    return stats, sorted(f"{key[0]}/{key[1]}: {kind}" for key, kind in equivalent if kind.startswith("bug"))


def mutation_score(stats, rows):
    """(mutants killed, behaviour-changing mutants, equivalent ones skipped) over the variants of a
    file's rows. The build stops on a behaviour-changing mutant the tests accept: every mutant
    not killed is equivalent on the probe inputs, and the score is 1 by construction."""
    total = collections.Counter()
    for key in {(r["family"], int(r["task_id"].split("/")[1])) for r in rows}:
        total.update(stats[key])
    return total["mutant killed"], total["mutant killed"], total["mutant equivalent"]


# ---------------------------------------------------------------- the split
def task_record(t):
    """A task in the project problem format (data/DATA_CARD.md)."""
    keys = ("task_id", "family", "lang", "prompt", "entry_point", "solution", "tests", "setup")
    return {k: t[k] for k in keys} | {"heldout_params": t["heldout_params"], "habit": t["family"] in HABITS}


def spread(tasks, n):
    """Up to n of the (shuffled) tasks, their variants (task classes) taken in turn, at most
    PER_VARIANT each."""
    by_variant = collections.defaultdict(list)
    for t in tasks:
        by_variant[t["cls"]].append(t)
    rounds = [[ts[r] for ts in by_variant.values() if r < len(ts)] for r in range(PER_VARIANT)]
    return [t for r in rounds for t in r][:n]


def split(all_tasks, rng):
    by_family = collections.defaultdict(list)
    for t in all_tasks:
        by_family[t["family"]].append(t)
    out = collections.defaultdict(list)
    for family, tasks in by_family.items():
        rng.shuffle(tasks)
        seen = [t for t in tasks if t["role"] == "train"]
        reserve = min(max(round(0.12 * len(seen)), POOL_MIN), len(seen) // 2)
        pool, rest = seen[:reserve], seen[reserve:]
        out["indist"] += pool[:INDIST_PER_FAMILY]
        out["ppo"] += pool[INDIST_PER_FAMILY:INDIST_PER_FAMILY + PPO_PER_FAMILY]
        out["eval"] += spread([t for t in tasks if t["role"] == "eval"], EVAL_PER_FAMILY)
        out["val"] += spread([t for t in tasks if t["role"] == "val"], VAL_PER_FAMILY)
        out["sft_eval"] += rest[:SFT_EVAL_PER_FAMILY]
        train = rest[SFT_EVAL_PER_FAMILY:SFT_EVAL_PER_FAMILY + SFT_TRAIN_PER_FAMILY]
        out["sft_train"] += train
        out["rm_train"] += train[:RM_TRAIN_PER_FAMILY]
        # in no SFT training row nor PPO prompt; build() keeps those with a program pair only rm_eval holds
        out["rm_eval"] += (rest[:SFT_EVAL_PER_FAMILY] + rest[SFT_EVAL_PER_FAMILY + SFT_TRAIN_PER_FAMILY:]
                           + pool[INDIST_PER_FAMILY + PPO_PER_FAMILY:])
    for rows in out.values():
        rng.shuffle(rows)
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def tasks_and_split(seed=0, n_families=None):
    """(families, every instance, the instances of each file, the RNG the build goes on with): the
    part of the build that decides which task lands where, before anything runs."""
    rng = random.Random(seed)
    families = task_families.F[:n_families] if n_families else task_families.F
    all_tasks = [t for fi, fam in enumerate(families) for t in instances(fi, fam, rng)]
    return families, all_tasks, split(all_tasks, rng), rng


def held_out_programs(families):
    """{(family, unnamed reference)} of every variant no training file may hold (eval, val, seed)."""
    out = set()
    for fam in families:
        for pi, role in enumerate(variant_roles(fam)):
            if role != "train":
                out.add((fam.name, unnamed(task_families.fill(fam.code, fam.params[pi], "NAME"), "NAME")))
    return out


def rm_pairs(parts, failing, forbidden, seed):
    """(rm_train rows, rm_eval rows). A family's (variant, bug) program pairs are dealt out first:
    RM_EVAL_PAIR_SHARE of them (none when it has one) are rm_eval's alone, so that no rm_eval
    pair's (chosen, rejected) programs are an rm_train pair's, even under another function name;
    every variant keeps one for rm_train, so each rm_train task has its pair. A bug whose program
    is a held-out variant's reference is never used."""
    rng = random.Random(f"rm pairs {seed}")

    def kinds(t):
        return [k for k in failing[(t["family"], t["pi"])]
                if (t["family"], unnamed(t["bugs"][k], t["entry_point"])) not in forbidden]

    usable = {}  # (family, pi) -> the bugs every name of the variant can use
    for t in parts["rm_train"] + parts["rm_eval"]:
        key = (t["family"], t["pi"])
        usable[key] = usable.get(key, set(kinds(t))) & set(kinds(t))
    held = set()
    for family in sorted({f for f, _ in usable}):
        n = sum(len(ks) for (f, _), ks in usable.items() if f == family)
        pool = sorted({(t["pi"], k) for t in parts["rm_eval"] if t["family"] == family for k in usable[(family, t["pi"])]})
        rng.shuffle(pool)  # drawn among the pairs an rm_eval candidate can have
        per_variant = collections.Counter()
        for pi, k in pool:
            if n > 1 and per_variant.total() < (round(RM_EVAL_PAIR_SHARE * n) or 1) \
                    and per_variant[pi] + 1 < len(usable[(family, pi)]):
                held.add((family, pi, k))
                per_variant[pi] += 1

    def pair(t, in_eval):
        options = [k for k in kinds(t) if ((t["family"], t["pi"], k) in held) == in_eval]
        if options:
            bug = rng.choice(options)
            return preference_row(t, t["bugs"][bug], bug)
        return None

    train = [pair(t, False) for t in parts["rm_train"]]
    assert all(train), "an rm_train task has no pair left"
    per_family, held_rows = collections.Counter(), []
    for t in parts["rm_eval"]:
        if per_family[t["family"]] < RM_EVAL_PER_FAMILY and (p := pair(t, True)):
            per_family[t["family"]] += 1
            held_rows.append(p)
    return train, held_rows


def build(out_dir, seed=0, n_families=None, workers=None):
    t0 = time.time()
    families, all_tasks, parts, rng = tasks_and_split(seed, n_families)
    checked = parts["eval"] + parts["val"] + parts["indist"]
    used = [t for name in (*TRAINING, "eval", "val", "indist") for t in parts[name]]
    with_bugs = parts["rm_train"] + parts["rm_eval"] + [t for t in parts["sft_train"] if t["family"] in HABITS]
    n_programs, failing, dropped = verify(used, with_bugs, workers)
    t1 = time.time()
    stats, not_wrong = check_tests(checked, families, workers)
    t2 = time.time()
    forbidden = held_out_programs(families)

    # the split rule, asserted on what the build made: eval's variants (task classes) are in no
    # training file and not in validation, validation's in no training file
    def classes(name):
        return {(t["family"], t["cls"]) for t in parts[name]}

    trained = set().union(*(classes(name) for name in TRAINING))
    assert not classes("eval") & (trained | classes("val")) and not classes("val") & trained, "a held-out variant leaked"
    ids = {name: {t["task_id"] for t in parts[name]} for name in parts}
    for a, b in itertools.combinations(("sft_train", "sft_eval", "ppo", "eval", "val", "indist"), 2):
        assert not ids[a] & ids[b], f"{a} and {b} share a task"

    habit_rng = random.Random(f"habits {seed}")

    def sft(t, flawed=False):
        habit = HABITS.get(t["family"])
        if (flawed and habit in failing[(t["family"], t["pi"])]
                and (t["family"], unnamed(t["bugs"][habit], t["entry_point"])) not in forbidden
                and habit_rng.random() < HABIT_SHARE):
            code, flaw = t["bugs"][habit], habit  # fails its tests: verified above
        else:
            code, flaw = t["solution"], ""
        return {"messages": [{"role": "user", "content": t["prompt"]},
                             {"role": "assistant", "content": fenced(code)}],
                "task_id": t["task_id"], "family": t["family"], "lang": t["lang"], "flaw": flaw}

    def ppo(t):
        return task_record(t) | {"prompt": [{"role": "user", "content": t["prompt"]}]}

    rm_train, rm_eval = rm_pairs(parts, failing, forbidden, seed)
    os.makedirs(out_dir, exist_ok=True)
    files = {"sft_train": [sft(t, flawed=True) for t in parts["sft_train"]], "sft_eval": [sft(t) for t in parts["sft_eval"]],
             "rm_train": rm_train, "rm_eval": rm_eval,
             "ppo_prompts": [ppo(t) for t in parts["ppo"]], "eval_tasks": [task_record(t) for t in parts["eval"]],
             "val_tasks": [task_record(t) for t in parts["val"]], "indist_tasks": [task_record(t) for t in parts["indist"]],
             # the natural prompts, in no training row: asked 10 times after each stage (report.md)
             "seed_prompts": sorted((task_record(t) for t in all_tasks if t["seed"]), key=lambda r: r["task_id"])}
    for name, rows in files.items():
        write_jsonl(os.path.join(out_dir, name + ".jsonl"), rows)
    print(f"build_data: {len(families)} families, {len(all_tasks)} instances, seed {seed}, {time.time() - t0:.1f} s: "
          f"{n_programs} labels verified in the sandbox ({dropped} bugs equivalent to the reference for their "
          f"parameters dropped) in {t1 - t0:.0f} s; {sum(sum(s.values()) for s in stats.values())} wrong programs "
          f"checked against the tests of {len(stats)} held-out and in-distribution variants in {t2 - t1:.0f} s")
    for name, rows in files.items():
        langs = collections.Counter(r["lang"] for r in rows)
        variants = len({tuple(r["task_id"].split("/")[:2]) for r in rows})
        line = f"  {name + '.jsonl':20s} {len(rows):5d} rows  {variants:4d} variants  (zh {langs['zh']}, en {langs['en']})"
        if name in ("eval_tasks", "val_tasks", "indist_tasks"):
            killed, changing, equivalent = mutation_score(stats, rows)
            line += f"  mutants killed {killed}/{changing} ({equivalent} equivalent on the probes)"
        print(line)
    flawed = collections.Counter(r["family"] for r in files["sft_train"] if r["flaw"])
    print(f"  sft_train demonstrations with a habitual bug: {sum(flawed.values())}/{len(files['sft_train'])} "
          f"({len(flawed)} families, {HABIT_SHARE:.0%} of each one's demonstrations)")
    total = collections.Counter()
    for s in stats.values():
        total.update(s)
    print("  wrong programs on the held-out and in-distribution tests: "
          + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    print("  bugs equivalent to the reference on the probe inputs, so not wrong there: " + ("; ".join(not_wrong) or "none"))
    return {name: len(rows) for name, rows in files.items()}


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
    ap.add_argument("--families", type=int, default=None, help="only the first N families (quick builds)")
    ap.add_argument("--workers", type=int, default=None, help="sandbox processes in parallel (default: CPUs)")
    args = ap.parse_args(argv)
    build(os.path.normpath(args.out), args.seed, args.families, args.workers)


if __name__ == "__main__":
    run_stage(main)
