"""The stages' own evaluation, timed: greedy answers by prompts per generate call, sampled answers
(pass@EVAL_SAMPLES) by prompts per call, and the sandbox verdicts of the sampled answers with every
answer run (sandbox.run_many) against each distinct answer run once (sandbox.run_unique).

    python bench/bench_eval.py                        # ./sft_model on data/eval_tasks.jsonl
    python bench/bench_eval.py --SFT_DIR=runs/x/sft_model --greedy=16,64 --sampled=16 --rounds=1

Needs ./sft_model (bash run.sh). About 6 minutes on 2 cores.
"""

import os
import sys
import time

import torch

import _common
import config as C
from rlhf import sandbox
from rlhf.codeeval import completion_for, generate_completions, load_problems, sandbox_limits, score_samples
from rlhf.common import load_causal_lm, load_tokenizer, torch_dtype
from rlhf.settings import apply_overrides

DEFAULTS = {"tasks": "data/eval_tasks.jsonl", "greedy": "16,64,128", "sampled": "16,4", "rounds": 2}


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv):
    own, rest = _common.own_options(argv, DEFAULTS)
    apply_overrides(rest, quiet=True)
    model, tokenizer = load_causal_lm(C.SFT_DIR, torch_dtype(C.PRECISION), for_training=False), load_tokenizer(C.SFT_DIR)
    problems = load_problems(own["tasks"])
    messages = [p.messages() for p in problems]
    result = _common.header("python bench/bench_eval.py " + " ".join(argv))
    result.update(model=C.SFT_DIR, tasks=own["tasks"], samples=C.EVAL_SAMPLES, greedy=[], sampled=[], verdicts=[])
    rows = []
    for per_call in [int(x) for x in own["greedy"].split(",")]:
        texts, seconds = timed(generate_completions, model, tokenizer, messages, C.GEN_MAX_NEW_TOKENS,
                               answers_per_call=per_call, progress=False)
        summary, _ = score_samples(problems, [{"task_id": p.task_id, "completion": completion_for(p, t[0])}
                                              for p, t in zip(problems, texts)], ks=(1,), progress=False,
                                   limits=sandbox_limits(C))
        result["greedy"].append({"prompts_per_call": per_call, "seconds": seconds, "pass_at_1": summary["pass@1"]})
        rows.append([f"greedy, {len(problems)} answers", f"{per_call} prompts a call", f"{seconds:.1f}",
                     f"pass@1 {summary['pass@1']:.3f}"])
    n = C.EVAL_SAMPLES
    for per_call in [int(x) for x in own["sampled"].split(",")]:
        torch.manual_seed(C.SEED)
        texts, seconds = timed(generate_completions, model, tokenizer, messages, C.GEN_MAX_NEW_TOKENS, n, 1.0, 1.0,
                               answers_per_call=per_call * n, progress=False)
        result["sampled"].append({"prompts_per_call": per_call, "seconds": seconds})
        rows.append([f"sampled, {n} x {len(problems)} answers", f"{per_call} prompts ({per_call * n} answers) a call",
                     f"{seconds:.1f}", ""])
    jobs = [p.job(completion_for(p, t)) for p, outs in zip(problems, texts) for t in outs]
    for r in range(own["rounds"]):
        for run in (sandbox.run_many, sandbox.run_unique):
            verdicts, seconds = timed(run, jobs, limits=sandbox_limits(C))
            passed, ran = sum(v.passed for v in verdicts), len({id(v) for v in verdicts})  # a verdict per job run
            result["verdicts"].append({"round": r, "how": run.__name__, "seconds": seconds, "passed": passed, "ran": ran})
            rows.append([f"sandbox verdicts of the {len(jobs)} sampled answers", f"{run.__name__}, round {r + 1}",
                         f"{seconds:.1f}", f"{passed} pass, {ran} programs run"])
    result.update(load_average_1min_after=os.getloadavg()[0])
    print(f"{C.SFT_DIR} on {own['tasks']}, {result['machine']}, {result['torch_threads']} torch threads, "
          f"load {result['load_average_1min']:.2f} before, {result['load_average_1min_after']:.2f} after")
    print("\n".join(_common.table(["step", "how", "seconds", "result"], rows)))
    _common.save_results("eval", result)


if __name__ == "__main__":
    main(sys.argv[1:])
