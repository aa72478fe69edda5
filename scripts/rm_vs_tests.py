"""Does the reward model agree with the unit tests? A check before trusting the RM as a PPO reward.

Reads the per-task results of `scripts/evaluate.py --out` (a model's greedy answers and their test
verdicts) and scores with the RM, for every task whose answer FAILED its tests, that answer and the
task's reference solution (which passes). An RM that rewards correctness prefers the reference;
one that rewards looking like its training data may prefer the wrong answer, and PPO then pulls
the policy towards it unless the tests outweigh the RM (PPO_EXEC_WEIGHT vs PPO_RM_WEIGHT).
Printed per group: all failures, and, for our task format, tasks whose parameter values were
held out of SFT/RM data ("heldout_params") against the others; with --by-family, also one line per
task family (where the RM fails: a family whose variants differ by one value, or a held-out rule).

    python scripts/evaluate.py --problems data/eval_tasks.jsonl --model ./sft_model --out /tmp/sft.jsonl
    python scripts/rm_vs_tests.py --results /tmp/sft.jsonl            # RM: ./rm_model
    python scripts/rm_vs_tests.py --results ./sft_model/eval_results.jsonl   # the SFT stage's own answers
    python scripts/rm_vs_tests.py --results ./sft_model/eval_results.jsonl --by-family

train_rm.py computes the first figure ("all failures") at its end from the SFT stage's answers:
`heldout_test_agreement` in ./rm_model/eval_results.json and in the pipeline's report.
"""
import argparse
import os

import config as C
from rlhf import codeeval
from rlhf.common import load_tokenizer, run_stage
from rlhf.data import read_jsonl
from rlhf.settings import UserError, tool_help


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=tool_help(__file__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="per-task results jsonl written by scripts/evaluate.py --out")
    ap.add_argument("--problems", default=C.EVAL_TASKS_FILE, help="the problem file those results are for")
    ap.add_argument("--rm", default=C.RM_DIR, help="reward model folder")
    ap.add_argument("--by-family", action="store_true", help="also a line per task family (project format)")
    args = ap.parse_args(argv)
    for path in (args.results, args.problems, args.rm):
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist")
    from rlhf.reward import load_reward_model, agreement_with_tests

    problems = codeeval.load_problems(args.problems)
    rows = read_jsonl(args.results)
    rm, tokenizer = load_reward_model(args.rm), load_tokenizer(args.rm)
    groups = agreement_with_tests(rm, tokenizer, problems, rows)
    if not groups:
        raise UserError(f"no failed answer with a reference solution in {args.results}")
    print(f"RM {args.rm} on {groups['all failures'][1]} failed answers of {len(rows)} ({args.results}):")
    for name, (prefers, n, mean_right, mean_wrong) in groups.items():
        print(f"  {name:26s} n={n:4d} | RM prefers the reference {prefers:.1%} | "
              f"mean RM score: reference {mean_right:.2f}, failed answer {mean_wrong:.2f}")
    if args.by_family:  # reference preferred / failures, each family's group by group
        family = {p.task_id: p.record.get("family") for p in problems}
        for name in sorted({family.get(str(r.get("task_id"))) for r in rows} - {None}):
            mine = agreement_with_tests(rm, tokenizer, problems, [r for r in rows if family.get(str(r.get("task_id"))) == name])
            if mine:
                print(f"  {name:26s} " + " | ".join(f"{group.split()[0]} {round(share * n)}/{n}" for group, (share, n, *_) in mine.items()))


if __name__ == "__main__":
    run_stage(main)
