"""scripts/build_data.py and the bundled data it writes: formats, labels verified by execution,
disjoint splits, determinism."""
import dataclasses
import filecmp
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

from rlhf import codeeval
from rlhf.data import read_jsonl
from rlhf.settings import UserError
from scripts import build_data, task_families

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
FILES = ["sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_prompts", "eval_tasks", "val_tasks", "indist_tasks",
         "seed_prompts"]


def rows(name):
    return [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(os.path.join(DATA, name + ".jsonl"))]


def test_formats_and_disjoint_splits():
    sft = rows("sft_train")
    assert all(r["messages"][1]["content"].startswith("```python\n") and r["messages"][1]["content"].endswith("\n```")
               for r in sft)
    pair = rows("rm_train")[0]
    assert {"prompt", "chosen", "rejected", "bug"} <= set(pair) and pair["chosen"] != pair["rejected"]
    ids = {name: {r["task_id"] for r in rows(name)} for name in ("sft_train", "sft_eval", "ppo_prompts", "eval_tasks",
                                                                "val_tasks", "indist_tasks")}
    for a, b in itertools.combinations(ids, 2):
        assert not ids[a] & ids[b], (a, b)
    assert all(ids.values())
    # every eval and validation task is of a variant no training file holds; indist tasks are of trained ones
    assert all(r["heldout_params"] for r in rows("eval_tasks") + rows("val_tasks"))
    assert not any(r["heldout_params"] for r in rows("indist_tasks"))
    assert {r["habit"] for r in rows("eval_tasks")} == {True, False}
    assert all(r["habit"] == (r["family"] in build_data.HABITS) for r in rows("eval_tasks") + rows("val_tasks"))
    assert {"zh", "en"} == {r["lang"] for r in sft}
    assert len({r["family"] for r in sft}) == len(task_families.F)
    assert "用Python实现快速排序算法" not in {r["messages"][0]["content"] for r in sft}


def test_flawed_demonstrations_and_rm_pairs_that_check_the_prompt():
    sft = rows("sft_train")
    flawed = [r for r in sft if r["flaw"]]
    # only the habit families, each its one habitual bug, in about HABIT_SHARE of its demonstrations
    assert flawed and {r["family"] for r in flawed} <= set(build_data.HABITS)
    assert all(r["flaw"] == build_data.HABITS[r["family"]] for r in flawed)
    in_habits = [r for r in sft if r["family"] in build_data.HABITS]
    assert abs(len(flawed) / len(in_habits) - build_data.HABIT_SHARE) < 0.1
    assert not any(r["flaw"] for r in rows("sft_eval"))
    # a rejected answer may be another variant's reference: right code for a task the prompt did not ask
    # (a seen variant's: SFT and the RM never see a held-out value)
    pairs = rows("rm_train")
    wrong_value = [p for p in pairs if p["bug"] == "wrong_value"]
    assert 0.3 < len(wrong_value) / len(pairs) < 0.6

    def unnamed(code):  # the program with its function's (or class's) name replaced: names vary across variants
        return code.replace(re.search(r"(?:def|class) (\w+)", code).group(1), "f")

    seen, held = set(), set()  # the references of every variant, named f
    for fam in task_families.F:
        for i, (p, role) in enumerate(zip(fam.params, build_data.variant_roles(fam))):
            name = task_families.fill(fam.names[0], p, "")
            (held if role != "train" else seen).add(
                unnamed(build_data.fenced(task_families.fill(fam.code, p, name))))
    rejected = {unnamed(p["rejected"][0]["content"]) for p in wrong_value}
    assert rejected <= seen and not rejected & (held - seen)


def test_no_training_file_holds_a_held_out_value_of_the_eval_set():
    """Held-out parameter values (a variant: family + parameters, e.g. count the 'u') are eval-only:
    no SFT demonstration, RM pair or PPO prompt asks for one, whatever its wording."""
    def variant(r):
        return tuple(r["task_id"].split("/")[:2])

    held = {variant(r) for r in rows("eval_tasks") if r["heldout_params"]}
    assert len(held) >= 20
    for name in ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_prompts"):
        assert not held & {variant(r) for r in rows(name)}, name
    assert not any(r["heldout_params"] for r in rows("ppo_prompts"))


def test_seed_prompts_file_holds_the_natural_prompts_with_their_tests():
    """The natural prompts, each with tests of the convention it means; their variant is in no
    training file (tests/test_splits.py checks the prompts and programs themselves)."""
    problems = {p.messages()[0]["content"]: p for p in codeeval.load_problems(os.path.join(DATA, "seed_prompts.jsonl"))}
    assert {"用Python实现快速排序算法", "用Python实现二叉树遍历"} <= set(problems)
    quick = problems["用Python实现快速排序算法"]
    assert quick.record["entry_point"] == "quick_sort" and len(quick.record["tests"]) >= 4
    for fam in task_families.F:
        if fam.bare:
            assert build_data.variant_roles(fam)[0] == "seed"
            trained = {tuple(r["task_id"].split("/")[:2]) for name in ("sft_train", "rm_train", "ppo_prompts") for r in rows(name)}
            assert (fam.name, "0") not in trained


def test_variant_roles():
    """Held-out variants alternate eval, val, eval, eval, val, ...; variants that only a method
    tells apart (simple_sorts' algorithms) are one task, held out together."""
    roles = {f.name: build_data.variant_roles(f) for f in task_families.F}
    assert roles["sum_multiples"][-8:] == ["eval", "val", "eval", "eval", "val", "eval", "eval", "val"]
    assert roles["quick_sort"][0] == "seed" and roles["is_prime"] == ["train"]
    sorts = next(f for f in task_families.F if f.name == "simple_sorts")
    by_order = {(p["rev"], r) for p, r in zip(sorts.params, roles["simple_sorts"])}
    assert by_order == {(False, "train"), (True, "eval")}
    mixed = dataclasses.replace(sorts, heldout=2)  # one descending sort trained, two held out
    with pytest.raises(UserError, match="differ only in method"):
        build_data.variant_roles(mixed)


def test_the_build_stops_on_tests_that_accept_a_wrong_program():
    """is_prime without 4 and the squares of primes: its planted off_by_one (range(2, int(n ** 0.5)))
    passes, and the check names it; with them, nothing passes."""
    fam = next(f for f in task_families.F if f.name == "is_prime")
    weak = dataclasses.replace(fam, inputs=lambda rng, p: [(0,), (1,), (2,), (3,), (7,), (-7,), (97,), (100,)])
    for family, passes in ((fam, True), (weak, False)):
        tasks = build_data.instances(0, family, build_data.random.Random(0))[:1]
        if passes:
            stats, _ = build_data.check_tests(tasks, [family], workers=2)
            counts = stats[("is_prime", 0)]
            n_mutants = sum(kind.startswith("mutant") for kind, _ in build_data.wrong_programs(tasks[0]))
            assert counts["bug killed"] == 2 and counts["mutant killed"] > 10
            assert counts["mutant killed"] + counts["mutant equivalent"] == n_mutants  # each mutant its own verdict
        else:
            with pytest.raises(UserError, match=r"is_prime/0/\w+: its tests accept bug off_by_one"):
                build_data.check_tests(tasks, [family], workers=2)


def test_quick_sort_is_one_program_for_both_orders():
    """Descending sorts by the negated key: partition and return line are the same in every
    variant, so the prompt decides one spot (the model copied one side's comparison into the
    other when each order had its own); the tests still tell the two orders apart."""
    family = next(f for f in task_families.F if f.name == "quick_sort")
    programs = {p["rev"]: task_families.fill(family.code, p, "quick_sort") for p in family.params if p["key"] == "x"}
    key_line = lambda code: next(line for line in code.splitlines() if "key = lambda" in line)  # noqa: E731
    assert [line for line in programs[True].splitlines() if line != key_line(programs[True])] == \
        [line for line in programs[False].splitlines() if line != key_line(programs[False])]
    assert key_line(programs[True]).endswith("-x") and key_line(programs[False]).endswith(": x")
    namespace = {}
    exec(programs[True], namespace)  # our own reference, not a generated program
    assert namespace["quick_sort"]([3, -3, 13, 1, -1, 3]) == [13, 3, 3, 1, -1, -3]
    assert {"wrong_comparison", "wrong_direction"} <= set(family.bugs)


def test_eval_and_ppo_files_load_as_problems():
    for name in ("eval_tasks", "ppo_prompts", "val_tasks", "indist_tasks", "seed_prompts"):
        problems = codeeval.load_problems(os.path.join(DATA, name + ".jsonl"))
        assert all(p.format == "project" for p in problems)
        assert problems[0].messages()[0]["role"] == "user"


def small_tasks():
    rng = build_data.random.Random(0)
    return [t for fam in task_families.F[:2] for t in build_data.instances(0, fam, rng)][:4]


def test_verify_rejects_a_corrupt_reference():
    tasks = small_tasks()
    build_data.verify(tasks, tasks[:1], workers=2)  # the real labels pass
    broken = dict(tasks[0], solution=tasks[0]["solution"].replace("==", "!="))
    with pytest.raises(UserError, match="reference"):
        build_data.verify([broken], [], workers=2)
    no_bug = dict(tasks[0], bugs={"same": tasks[0]["solution"]})  # a "bug" that passes
    with pytest.raises(UserError, match="no bug fails"):
        build_data.verify([no_bug], [no_bug], workers=2)


def test_build_is_deterministic(tmp_path):
    for d in ("a", "b"):
        subprocess.run([sys.executable, "scripts/build_data.py", "--families", "2", "--seed", "3",
                        "--out", str(tmp_path / d)], check=True, capture_output=True)
    for name in FILES:
        assert filecmp.cmp(tmp_path / "a" / f"{name}.jsonl", tmp_path / "b" / f"{name}.jsonl", shallow=False), name
    assert json.loads(open(tmp_path / "a" / "eval_tasks.jsonl").readline())["family"] in ("sum_multiples", "count_char")
