"""The bundled data's splits and tests, checked on the files in data/ (not on how build_data meant
to make them): no eval variant in a training file or in validation, no validation variant in a
training file, no natural (seed) prompt or its reference in a training row, no RM program pair in
both rm_train and rm_eval, and eval/val/indist tests that reject their family's bugs, every other
variant's reference and (all of them in the slow lane, a sample in the fast one) the mutants of
their reference. Each check is a function that returns the problems it finds; the tests run it on
the bundled files and on a copy with a planted leak or weakened tests."""
import ast
import functools
import json
import os
import re

import pytest

from rlhf import sandbox
from rlhf.data import read_jsonl
from scripts import build_data, task_families

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
TRAINING = ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_prompts")
CHECKED = ("eval_tasks", "val_tasks", "indist_tasks")  # the task files whose tests must reject wrong programs
FAMILIES = {f.name: f for f in task_families.F}


def load(data=DATA):
    names = TRAINING + CHECKED + ("seed_prompts",)
    return {n: [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(os.path.join(data, n + ".jsonl"))]
            if os.path.exists(os.path.join(data, n + ".jsonl")) else [] for n in names}


@functools.lru_cache(maxsize=None)
def unnamed(code, name):
    return build_data.unnamed(code, name)


def name_of(row):
    return row["task_id"].split("/")[2]


def task_class(row):
    """(family, the evaluation task of its variant): variants only a method tells apart share one."""
    family, pi = row["task_id"].split("/")[:2]
    return family, FAMILIES[family].task_class(int(pi))


def unfenced(text):
    return text.removeprefix("```python\n").removesuffix("\n```")


def programs(row):
    """The programs a training row holds: the SFT answer, the RM pair's chosen and rejected, the
    PPO task's reference."""
    if "messages" in row:
        return [unfenced(row["messages"][-1]["content"])]
    if "chosen" in row:
        return [unfenced(row[k][-1]["content"]) for k in ("chosen", "rejected")]
    return [row["solution"]]


def prompt(row):
    if "messages" in row:
        return row["messages"][0]["content"]
    return row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]


def references():
    """{(family, reference program with its name replaced): {task classes whose reference it is}}."""
    out = {}
    for fam in task_families.F:
        for pi, p in enumerate(fam.params):
            code = unnamed(task_families.fill(fam.code, p, "NAME"), "NAME")
            out.setdefault((fam.name, code), set()).add((fam.name, fam.task_class(pi)))
    return out


def leaks(files):
    """Eval variants in a training file or in validation, validation variants in a training file:
    by the task a row asks (its task_id) and by every program it holds (a `wrong_value` pair rejects
    another variant's reference)."""
    held = {name: {task_class(r) for r in files[name]} for name in ("eval_tasks", "val_tasks")}
    refs, problems = references(), []
    problems += [f"eval_tasks and val_tasks share {c}" for c in held["eval_tasks"] & held["val_tasks"]]
    for name in TRAINING:
        for r in files[name]:
            for split, classes in held.items():
                if task_class(r) in classes:
                    problems.append(f"{name} {r['task_id']} asks for a variant of {split}")
                for code in programs(r):
                    hit = refs.get((r["family"], unnamed(code, name_of(r))), set()) & classes
                    problems += [f"{name} {r['task_id']} holds the reference of {split}'s variant {c}" for c in hit]
    return problems


def seed_leaks(files):
    """Training rows that hold a natural (seed) prompt, as it is or in any wrapper, or its reference."""
    seeds = files["seed_prompts"]
    asked = {w.format(s["prompt"]) for s in seeds for w in build_data.WRAPPERS[s["lang"]]}
    answers = {(s["family"], unnamed(s["solution"], s["entry_point"])) for s in seeds}
    problems = []
    for name in TRAINING:
        for r in files[name]:
            if prompt(r) in asked:
                problems.append(f"{name} {r['task_id']} asks a seed prompt: {prompt(r)!r}")
            problems += [f"{name} {r['task_id']} holds a seed prompt's reference" for code in programs(r)
                         if (r["family"], unnamed(code, name_of(r))) in answers]
    return problems


def shared_rm_pairs(files):
    """(chosen, rejected) program pairs, function names aside, in both rm_train and rm_eval."""
    def pairs(name):
        return {tuple(unnamed(c, name_of(r)) for c in programs(r)): r["task_id"] for r in files[name]}

    train = pairs("rm_train")
    return [f"rm_eval {tid} repeats rm_train {train[p]}" for p, tid in pairs("rm_eval").items() if p in train]


# ---------------------------------------------------------------- tests that reject wrong programs
def wrong_programs(row, with_mutants):
    """[(kind, program)] row's tests must reject: the bugs of its family (for its variant and
    name), the reference of every variant that is another task, and (with_mutants) the mutants
    of its reference."""
    fam, pi, name = FAMILIES[row["family"]], int(row["task_id"].split("/")[1]), row["entry_point"]
    assert row["solution"] == task_families.fill(fam.code, fam.params[pi], name), f"{row['task_id']}: not its variant's reference"
    out = [(f"bug {task_families.fill(k, fam.params[pi], name)}", task_families.fill(v, fam.params[pi], name))
           for k, v in fam.bugs.items()]
    out += [(f"variant {qi}", task_families.fill(fam.code, q, name)) for qi, q in enumerate(fam.params)
            if fam.task_class(qi) != fam.task_class(pi)]
    if with_mutants:
        out += [(f"mutant: {kind}", code) for kind, code in build_data.mutants(row["solution"])]
    return out


def accepted_wrong_programs(rows, with_mutants=False):
    """["task_id: kind"] of the wrong programs (wrong_programs) a row's tests accept, each distinct
    (variant, tests) once, the function's name aside (a variant's tests under its two names differ
    in the name alone). A bug or mutant that answers the probe inputs (build_data.probe_inputs) as
    the oracle does is equivalent to the reference there, not wrong; another variant's reference
    never is."""
    units = {}
    for r in rows:
        units.setdefault((r["family"], r["task_id"].split("/")[1], re.sub(rf"\b{r['entry_point']}\b", "NAME",
                                                                         json.dumps(r["tests"]))), r)
    units = list(units.values())
    groups = [(i, r, wrong_programs(r, with_mutants)) for i, r in enumerate(units)]
    programs = {(i, kind): code for i, _, ps in groups for kind, code in ps}
    accepted = [k for k, ok in build_data.passes(groups).items() if ok]
    problems = [f"{units[i]['task_id']}: {kind}" for i, kind in accepted if kind.startswith("variant")]
    accepted = [(i, kind) for i, kind in accepted if not kind.startswith("variant")]
    probes = []
    for i, kind in accepted:
        r = units[i]
        fam, pi = FAMILIES[r["family"]], int(r["task_id"].split("/")[1])
        calls, expected = build_data.probe_inputs(fam, fam.params[pi], r["entry_point"], r["tests"])
        probes.append(dict(program=programs[(i, kind)], calls=calls, expected=expected, setup=r["setup"],
                           timeout=build_data.PROBE_TIMEOUT_S))
    on_probes = sandbox.run_many(probes)
    return problems + [f"{units[i]['task_id']}: {kind}" for (i, kind), v in zip(accepted, on_probes) if not v.passed]


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def files():
    return load()


def test_no_held_out_variant_in_training_or_validation(files):
    assert files["eval_tasks"] and files["val_tasks"]
    assert leaks(files) == []
    assert all(r["heldout_params"] for name in ("eval_tasks", "val_tasks", "seed_prompts") for r in files[name])
    assert not any(r["heldout_params"] for r in files["indist_tasks"] + files["ppo_prompts"])
    # planted: an eval task as an SFT demonstration; a validation variant's program as a rejected answer
    ev, va = files["eval_tasks"][0], files["val_tasks"][0]
    sft = {"messages": [{"role": "user", "content": ev["prompt"]},
                        {"role": "assistant", "content": build_data.fenced(ev["solution"])}],
           "task_id": ev["task_id"], "family": ev["family"]}
    pair = next(p for p in files["rm_train"] if p["family"] == va["family"])
    other = task_families.fill(FAMILIES[va["family"]].code, FAMILIES[va["family"]].params[int(va["task_id"].split("/")[1])],
                               name_of(pair))
    pair = dict(pair, rejected=[{"role": "assistant", "content": build_data.fenced(other)}])
    planted = dict(files, sft_train=files["sft_train"] + [sft], rm_train=files["rm_train"] + [pair],
                   val_tasks=files["val_tasks"] + [ev])
    found = leaks(planted)
    assert any(f"sft_train {ev['task_id']} asks for a variant of eval_tasks" in p for p in found)
    assert any(f"sft_train {ev['task_id']} holds the reference of eval_tasks" in p for p in found)
    assert any(p.startswith(f"rm_train {pair['task_id']} holds the reference of val_tasks") for p in found)
    assert any(p.startswith("eval_tasks and val_tasks share") for p in found)


def test_seed_prompts_and_their_references_are_in_no_training_row(files):
    assert {"用Python实现快速排序算法", "用Python实现二叉树遍历"} <= {s["prompt"] for s in files["seed_prompts"]}
    assert seed_leaks(files) == []
    seed = next(s for s in files["seed_prompts"] if s["prompt"] == "用Python实现快速排序算法")
    row = next(r for r in files["sft_train"] if r["family"] == "quick_sort")
    asked = dict(row, messages=[{"role": "user", "content": "Python编程题：" + seed["prompt"]}, row["messages"][1]])
    # the seed's reference under the other name, as a rejected answer (quicksort is quick_sort to the seed check)
    pair = next(p for p in files["rm_train"] if p["family"] == "quick_sort" and name_of(p) == "quicksort")
    answered = dict(pair, rejected=[{"role": "assistant", "content": build_data.fenced(
        task_families.fill(FAMILIES["quick_sort"].code, FAMILIES["quick_sort"].params[0], "quicksort"))}])
    found = seed_leaks(dict(files, sft_train=[asked], rm_train=[answered]))
    assert len(found) == 2 and "asks a seed prompt" in found[0] and "seed prompt's reference" in found[1]


def test_no_rm_program_pair_in_both_rm_files(files):
    assert shared_rm_pairs(files) == []
    assert {p["bug"] for p in files["rm_eval"]} > {"wrong_value"}  # both kinds of pair held out
    # planted: an rm_train pair under another function name in rm_eval
    pair = files["rm_train"][0]
    name, new = name_of(pair), "renamed_fn"
    moved = {k: [{"role": "assistant", "content": build_data.fenced(build_data.renamed(code, name, new))}]
             for k, code in zip(("chosen", "rejected"), programs(pair))}
    planted = dict(files, rm_eval=files["rm_eval"] + [dict(pair, **moved, task_id=pair["task_id"].replace(name, new))])
    assert len(shared_rm_pairs(planted)) == 1


@pytest.mark.slow  # about a thousand programs; the fast lane checks a sample (the mutants' test below)
def test_checked_tasks_reject_their_bugs_and_the_other_variants(files):
    """Every eval, val and indist task: its family's bugs (the planted habits included) and every
    other variant's reference fail its tests."""
    rows = [r for name in CHECKED for r in files[name]]
    assert len(rows) > 300 and all("habit" in r for r in rows)
    assert accepted_wrong_programs(rows) == []


def test_the_check_catches_weak_tests(files):
    """collatz with powers of two alone (the odd rule never runs), kth_largest without repeated
    values (its planted no_dedup passes), power_sum with n = 0 and 1 alone: the check names what
    they accept."""
    def arg(row, test):  # the one argument of a call name(arg)
        return ast.literal_eval(test["call"][len(row["entry_point"]) + 1:-1])

    collatz = next(r for r in files["eval_tasks"] if r["family"] == "collatz")
    powers = [t for t in collatz["tests"] if arg(collatz, t) in (1, 2, 16)]
    kth = next(r for r in files["eval_tasks"] if r["family"] == "kth_largest")
    distinct = [t for t in kth["tests"] if len(set(arg(kth, t))) == len(arg(kth, t))]
    assert powers and distinct
    found = accepted_wrong_programs([dict(collatz, tests=powers), dict(kth, tests=distinct)])
    assert any(f.startswith(collatz["task_id"] + ": variant") for f in found)
    assert kth["task_id"] + ": bug no_dedup" in found
    # power_sum asked for n = 0 and 1 alone: a mutant with another exponent passes (1 ** 6 == 1)
    power = next(r for r in files["eval_tasks"] if r["family"] == "power_sum")
    found = accepted_wrong_programs([dict(power, tests=[t for t in power["tests"] if arg(power, t) in (0, 1)])], True)
    assert any(f.startswith(power["task_id"] + ": mutant: #") and f.endswith("constant +1") for f in found)


def sample(files, n_families):
    """One checked task of each of the first n families (sorted by name), its first in task_id order."""
    rows = sorted((r for name in CHECKED for r in files[name]), key=lambda r: r["task_id"])
    first = {}
    for r in rows:
        first.setdefault(r["family"], r)
    return [first[f] for f in sorted(first)[:n_families]]


def test_checked_tasks_reject_the_mutants_of_a_sample(files):
    assert accepted_wrong_programs(sample(files, 6), with_mutants=True) == []


@pytest.mark.slow
def test_checked_tasks_reject_the_mutants_of_their_reference(files):
    rows = [r for name in CHECKED for r in files[name]]
    assert accepted_wrong_programs(rows, with_mutants=True) == []


def test_mutants_change_what_they_should():
    kinds = " | ".join(kind for family in ("max_subarray", "chunk") for kind, _ in build_data.mutants(
        task_families.fill(FAMILIES[family].code, FAMILIES[family].params[0], "f")))
    for kind in ("Lt -> LtE", "Add -> Sub", "Sub -> Add", "constant +1", "constant -1", "range bound +1", "index -1",
                 "slice end +1", "condition negated", "deleted", "loop breaks after one pass", "returns inside the loop"):
        assert kind in kinds, kind
    code = "def f(n):\n    if n < 2:\n        return n\n    return f(n - 1) + 1"
    mutated = {kind.split(" ", 1)[1]: program for kind, program in build_data.mutants(code)}
    assert mutated["Lt -> LtE"] == "def f(n):\n    if n <= 2:\n        return n\n    return f(n - 1) + 1"
    assert all(ast.parse(c) for c in mutated.values()) and code not in mutated.values()
