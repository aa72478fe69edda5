"""Build the bundled code-task data in data/ from rlhf/task_families.py, every label
verified by running it in rlhf/sandbox/ (references pass, rejected programs fail).

Writes sft_train/sft_eval (TRL conversational), rm_train/rm_eval (TRL preference),
ppo_prompts, eval_tasks, val_tasks and seed_prompts (project problem format, see data/DATA_CARD.md).

    python scripts/build_data.py                      # seed 0 -> data/
    python scripts/build_data.py --seed 1 --out /tmp/data
    python scripts/build_data.py --families 3 --out /tmp/small   # first 3 families (tests)
"""
import argparse
import ast
import collections
import json
import os
import random
import time

from rlhf import sandbox, task_families
from rlhf.common import run_stage
from rlhf.settings import UserError

WRAPPERS = {  # phrasing around each template: a model has to find the task inside
    "en": ["{}", "{} Reply with the code only.", "Python question: {}", "Please solve this. {}"],
    "zh": ["{}", "{}只需要给出代码。", "Python编程题：{}", "请完成：{}"],
}
SFT_TRAIN_PER_FAMILY = 170    # cap per family, so families with many variants do not dominate
SFT_EVAL_PER_FAMILY = 8
RM_TRAIN_PER_FAMILY = 60
RM_EVAL_PER_FAMILY = 8
EVAL_PER_FAMILY = 5           # held-out problems per family (eval_tasks.jsonl)
PPO_PER_FAMILY = 20           # PPO prompts per family, same distribution as eval, other instances
VAL_PER_FAMILY = 3            # validation tasks per family (val_tasks.jsonl): for choosing settings, never trained on
EVAL_POOL_MIN = 30            # reserve at least this many unseen instances per family for eval + PPO
# Realistic imperfection (data/DATA_CARD.md): in these families most SFT demonstrations come from
# a source with one habitual bug, as code scraped or written by people has. The tests and the RM
# pairs still call it wrong, so SFT imitates it and RL has something to correct.
HABITS = {"is_prime": "off_by_one", "fizzbuzz": "wrong_order", "caesar": "no_wrap", "kth_largest": "no_dedup",
          "chunk": "drops_tail", "fibonacci": "off_by_one", "flatten": "one_level",
          "power_sum": "off_by_one", "count_char": "off_by_one", "prefix_scan": "append_before_update",
          "word_freq": "wrong_init", "run_length": "off_by_one", "max_subarray": "zero_init"}
HABIT_SHARE = 0.6             # share of a habit family's SFT demonstrations that carry its bug


def fenced(code):
    return f"```python\n{code}\n```"


def wrong_value_variant(fam, pi):
    """Index of the variant whose reference is variant pi's `wrong_value` bug: the next seen one
    (wrapping round), i.e. code that ignores what the prompt asks (a count of 'e' for "count the
    'a'"); seen variants only, so no held-out value reaches the RM pairs. None when there is none."""
    seen = range(fam.n_seen)
    return next((i for i in [*seen[pi + 1:], *seen[:pi]] if fam.params[i] is not fam.params[pi]), None)


def preference_row(t, rejected_code, bug):
    """An RM pair (TRL conversational preference format): task t's reference over rejected_code."""
    return {"prompt": [{"role": "user", "content": t["prompt"]}],
            "chosen": [{"role": "assistant", "content": fenced(t["solution"])}],
            "rejected": [{"role": "assistant", "content": fenced(rejected_code)}],
            "task_id": t["task_id"], "family": t["family"], "lang": t["lang"], "bug": bug}


def instances(fi, fam, rng):
    """All (family, params, name, phrasing) instances of one family, with their task fields."""
    out = []
    for pi, p in enumerate(fam.params):
        other = wrong_value_variant(fam, pi)
        tests_rng = random.Random(f"{rng.random()}")  # tests depend on (family, params) only
        args_list = fam.inputs(tests_rng, p)
        names = list(dict.fromkeys(task_families.fill(n, p, "") for n in fam.names))
        for name in names:
            tests = []
            for args in args_list:
                call = fam.call(name, args) if fam.call else f"{name}({', '.join(map(repr, args))})"
                want = fam.oracle(p, *args)
                if ast.literal_eval(repr(want)) != want:
                    raise UserError(f"{fam.name}: expected value {want!r} is not a literal")
                tests.append({"call": call, "expected": repr(want)})
            base = {"family": fam.name, "entry_point": name, "setup": fam.setup,
                    "solution": task_families.fill(fam.code, p, name), "tests": tests,
                    "bugs": {task_families.fill(k, p, name): task_families.fill(v, p, name) for k, v in fam.bugs.items()}
                    | ({"wrong_value": task_families.fill(fam.code, fam.params[other], name)} if other is not None else {}),
                    "heldout_params": pi >= fam.n_seen, "pi": pi}
            # the natural prompts, as they are (the seed prompts) and in the other wrappers: how a user
            # asks without naming a function or an order; all of them SFT demonstrations of the convention
            prompts = [("bare" if wi == 0 else f"barew{wi}", lang, w.format(text)) for lang, text in fam.bare
                       for wi, w in enumerate(WRAPPERS[lang])] if pi == 0 and name == names[0] else []
            for lang in ("en", "zh"):
                for ti, t in enumerate(getattr(fam, lang)):
                    if "$name" not in t and "${name}" not in t and name != names[0]:
                        continue  # a template without a name means the convention name
                    for wi, w in enumerate(WRAPPERS[lang]):
                        prompts.append((f"t{ti}w{wi}", lang, w.format(task_families.fill(t, p, name))))
            for tag, lang, text in prompts:
                out.append({**base, "task_id": f"{fam.name}/{pi}/{name}/{lang}/{tag}", "lang": lang,
                            "prompt": text, "bare": tag.startswith("bare"), "seed": tag == "bare"})
    return out


def verify(tasks, rm_tasks, workers=None):
    """Run every distinct reference (must pass) and every bug of the RM tasks (must fail).

    Exits with a list when a reference fails. A bug that passes a parameter variant's tests
    is equivalent to the reference there (e.g. a wrong direction with a shift of 13), so it
    is dropped for that variant; an RM task left without any failing bug is an error.
    Returns (programs run, {(family, pi, name): failing bug kinds}, bugs dropped).
    """
    jobs = {}
    for t, kinds in [(t, ["reference"]) for t in tasks] + [(t, sorted(t["bugs"])) for t in rm_tasks]:
        calls = [x["call"] for x in t["tests"]]
        expected = [ast.literal_eval(x["expected"]) for x in t["tests"]]
        for kind in kinds:
            code = t["solution"] if kind == "reference" else t["bugs"][kind]
            jobs.setdefault((t["family"], t["pi"], t["entry_point"], kind),
                            dict(program=code, calls=calls, expected=expected, setup=t["setup"]))
    keys = list(jobs)
    verdicts = sandbox.run_many([jobs[k] for k in keys], workers=workers)
    bad = [f"{k[0]}/{k[1]}/{k[2]} reference: {v.status} {v.detail}" for k, v in zip(keys, verdicts)
           if k[3] == "reference" and not v.passed]
    failing = collections.defaultdict(list)
    for k, v in zip(keys, verdicts):
        if k[3] != "reference" and not v.passed:
            failing[k[:3]].append(k[3])
    bad += [f"{t['task_id']}: no bug fails the tests" for t in rm_tasks
            if not failing[(t["family"], t["pi"], t["entry_point"])]]
    if bad:
        raise UserError("labels failed verification (references must pass, rejected "
                        "programs must fail):\n  " + "\n  ".join(bad[:20])
                        + (f"\n  ... {len(bad) - 20} more" if len(bad) > 20 else ""))
    dropped = sum(1 for k, v in zip(keys, verdicts) if k[3] != "reference" and v.passed)
    return len(keys), failing, dropped


def task_record(t):
    """A task in the project problem format (data/DATA_CARD.md)."""
    keys = ("task_id", "family", "lang", "prompt", "entry_point", "solution", "tests", "setup")
    return {k: t[k] for k in keys} | {"heldout_params": t["heldout_params"]}


def split(all_tasks, rng):
    by_family = collections.defaultdict(list)
    for t in all_tasks:
        by_family[t["family"]].append(t)
    out, val = collections.defaultdict(list), []
    for family, tasks in by_family.items():
        wrapped = [t for t in tasks if t["bare"] and not t["seed"]]  # left out of the shuffle: the split
        tasks = [t for t in tasks if not t["bare"] or t["seed"]]     # of every other task stays as it was
        rng.shuffle(tasks)
        bare = [t for t in tasks if t["bare"]] + wrapped  # the natural prompts always go to SFT
        held = [t for t in tasks if t["heldout_params"] and not t["bare"]]
        seen = [t for t in tasks if not t["heldout_params"] and not t["bare"]]
        reserve = min(max(round(0.12 * len(seen)), EVAL_POOL_MIN - len(held)), len(seen) // 2)
        pool = held + seen[:reserve]
        rng.shuffle(pool)
        rest = seen[reserve:]
        out["eval"] += pool[:EVAL_PER_FAMILY]
        out["ppo"] += pool[EVAL_PER_FAMILY:EVAL_PER_FAMILY + PPO_PER_FAMILY]
        val += pool[EVAL_PER_FAMILY + PPO_PER_FAMILY:EVAL_PER_FAMILY + PPO_PER_FAMILY + VAL_PER_FAMILY]
        out["sft_eval"] += rest[:SFT_EVAL_PER_FAMILY]
        train = bare + rest[SFT_EVAL_PER_FAMILY:SFT_EVAL_PER_FAMILY + SFT_TRAIN_PER_FAMILY - len(bare)]
        out["sft_train"] += train
        out["rm_train"] += train[:RM_TRAIN_PER_FAMILY]
        out["rm_eval"] += rest[:RM_EVAL_PER_FAMILY]
    for rows in out.values():
        rng.shuffle(rows)
    random.Random(len(val)).shuffle(val)  # its own RNG: the other files stay as they were before it existed
    out["val"] = val
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
    parts = split(all_tasks, rng)
    # PPO trains on seen variants only: no held-out value of the eval set reaches any training data
    # (filtered after the split, so every other file is what it was before this rule)
    parts["ppo"] = [t for t in parts["ppo"] if not t["heldout_params"]]
    return families, all_tasks, parts, rng


def build(out_dir, seed=0, n_families=None, workers=None):
    t0 = time.time()
    families, all_tasks, parts, rng = tasks_and_split(seed, n_families)
    used = [t for name in ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo", "eval", "val") for t in parts[name]]
    with_bugs = parts["rm_train"] + parts["rm_eval"] + [t for t in parts["sft_train"] if t["family"] in HABITS]
    n_programs, failing, dropped = verify(used, with_bugs, workers)
    ids = {name: {t["task_id"] for t in parts[name]} for name in parts}
    assert not ids["sft_train"] & (ids["sft_eval"] | ids["eval"] | ids["ppo"]), "splits overlap"
    assert not ids["eval"] & ids["ppo"] and not ids["sft_eval"] & (ids["eval"] | ids["ppo"]), "splits overlap"
    assert not ids["val"] & (ids["eval"] | ids["ppo"] | ids["sft_train"] | ids["sft_eval"]), "splits overlap"
    held = {(t["family"], t["pi"]) for t in parts["eval"] if t["heldout_params"]}
    trained = ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo")
    assert not held & {(t["family"], t["pi"]) for name in trained for t in parts[name]}, "a held-out value is trained on"

    habit_rng = random.Random(f"habits {seed}")

    def sft(t, flawed=False):
        habit = HABITS.get(t["family"])
        if (flawed and not t["bare"] and habit in failing[(t["family"], t["pi"], t["entry_point"])]
                and habit_rng.random() < HABIT_SHARE):  # the natural prompts' demonstrations are correct
            code, flaw = t["bugs"][habit], habit  # fails its tests: verified above
        else:
            code, flaw = t["solution"], ""
        return {"messages": [{"role": "user", "content": t["prompt"]},
                             {"role": "assistant", "content": fenced(code)}],
                "task_id": t["task_id"], "family": t["family"], "lang": t["lang"], "flaw": flaw}

    def pair(t):
        bug = rng.choice(failing[(t["family"], t["pi"], t["entry_point"])])
        return preference_row(t, t["bugs"][bug], bug)

    def ppo(t):
        return task_record(t) | {"prompt": [{"role": "user", "content": t["prompt"]}]}

    os.makedirs(out_dir, exist_ok=True)
    files = {"sft_train": [sft(t, flawed=True) for t in parts["sft_train"]], "sft_eval": [sft(t) for t in parts["sft_eval"]],
             "rm_train": [pair(t) for t in parts["rm_train"]], "rm_eval": [pair(t) for t in parts["rm_eval"]],
             "ppo_prompts": [ppo(t) for t in parts["ppo"]], "eval_tasks": [task_record(t) for t in parts["eval"]],
             "val_tasks": [task_record(t) for t in parts["val"]],
             # the natural prompts (also SFT demonstrations): asked 10 times after each stage (report.md)
             "seed_prompts": sorted((task_record(t) for t in all_tasks if t["seed"]), key=lambda r: r["task_id"])}
    for name, rows in files.items():
        write_jsonl(os.path.join(out_dir, name + ".jsonl"), rows)
    counts = {name: len(rows) for name, rows in files.items()}
    print(f"build_data: {len(families)} families, {len(all_tasks)} instances, {n_programs} programs verified "
          f"in the sandbox ({dropped} bugs equivalent to the reference for their parameters dropped), "
          f"seed {seed}, {time.time() - t0:.1f} s")
    for name, n in counts.items():
        langs = collections.Counter(r["lang"] for r in files[name])
        print(f"  {name + '.jsonl':20s} {n:5d} rows  (zh {langs['zh']}, en {langs['en']})")
    flawed = collections.Counter(r["family"] for r in files["sft_train"] if r["flaw"])
    print(f"  sft_train demonstrations with a habitual bug: {sum(flawed.values())}/{counts['sft_train']} "
          f"({len(flawed)} families, {HABIT_SHARE:.0%} of each one's demonstrations)")
    held = sum(t["heldout_params"] for t in parts["eval"])
    print(f"  eval_tasks with parameters unseen in SFT: {held}/{len(parts['eval'])}")
    return counts


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
