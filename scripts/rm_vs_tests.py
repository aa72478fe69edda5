"""Does the reward model agree with the unit tests? A check before trusting the RM as a PPO reward.

Reads the per-task results of `scripts/evaluate.py --out` (a model's greedy answers and their test
verdicts) and scores with the RM, for every task whose answer FAILED its tests, that answer and the
task's reference solution (which passes). An RM that rewards correctness prefers the reference;
one that rewards looking like its training data may prefer the wrong answer, and PPO then pulls
the policy towards it unless the tests outweigh the RM (PPO_EXEC_WEIGHT vs PPO_RM_WEIGHT).
Printed per group: all failures, and, for our task format, tasks whose parameter values were
held out of SFT/RM data ("heldout_params") against the others.

    python scripts/evaluate.py --problems data/eval_tasks.jsonl --model ./sft_model --out /tmp/sft.jsonl
    python scripts/rm_vs_tests.py --results /tmp/sft.jsonl            # RM: ./rm_model
"""
import argparse
import os

import config as C
from rlhf import codeeval
from rlhf.common import load_tokenizer, run_stage
from rlhf.data import read_jsonl
from rlhf.settings import UserError, tool_help


def reference_answer(problem):
    """The problem's reference program, as the assistant answers in the RM's data are written."""
    r = problem.record
    code = {"humaneval": (r.get("prompt") or "") + (r.get("canonical_solution") or ""), "mbpp": r.get("code"),
            "project": r.get("solution")}[problem.format]
    return f"```python\n{code}\n```" if code else None


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=tool_help(__file__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="per-task results jsonl written by scripts/evaluate.py --out")
    ap.add_argument("--problems", default=C.EVAL_TASKS_FILE, help="the problem file those results are for")
    ap.add_argument("--rm", default=C.RM_DIR, help="reward model folder")
    args = ap.parse_args(argv)
    for path in (args.results, args.problems, args.rm):
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist")
    from rlhf.reward import load_reward_model, score_responses

    problems = {p.task_id: p for p in codeeval.load_problems(args.problems)}
    rows = read_jsonl(args.results)
    failed = [r for r in rows if not r.get("passed") and r.get("task_id") in problems and "raw" in r]
    failed = [r for r in failed if reference_answer(problems[r["task_id"]])]
    if not failed:
        raise UserError(f"no failed answer with a reference solution in {args.results}")
    rm, tokenizer = load_reward_model(args.rm), load_tokenizer(args.rm)
    prompts = [problems[r["task_id"]].messages() for r in failed]
    wrong = score_responses(rm, tokenizer, prompts, [r["raw"] for r in failed])
    right = score_responses(rm, tokenizer, prompts, [reference_answer(problems[r["task_id"]]) for r in failed])
    heldout = [problems[r["task_id"]].record.get("heldout_params") for r in failed]
    groups = {"all failures": [True] * len(failed), "held-out parameter values": [h is True for h in heldout],
              "seen parameter values": [h is False for h in heldout]}
    print(f"RM {args.rm} on {len(failed)} failed answers of {len(rows)} ({args.results}):")
    for name, member in groups.items():
        idx = [i for i, m in enumerate(member) if m]
        if not idx:
            continue
        prefers = sum(bool(right[i] > wrong[i]) for i in idx) / len(idx)
        mean_right = sum(float(right[i]) for i in idx) / len(idx)
        mean_wrong = sum(float(wrong[i]) for i in idx) / len(idx)
        print(f"  {name:26s} n={len(idx):4d} | RM prefers the reference {prefers:.1%} | "
              f"mean RM score: reference {mean_right:.2f}, failed answer {mean_wrong:.2f}")


if __name__ == "__main__":
    run_stage(main)
