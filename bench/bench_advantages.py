"""PPO's advantage estimators side by side on the embedded default: gae (critic) against the
critic-free grpo and rloo (PPO_ADVANTAGE), each over several seeds, everything else equal.

Each run is train_ppo.py with the default settings, `--PPO_ADVANTAGE=<estimator> --SEED=<seed>`,
greedy pass@1 on `--tasks` at the end (no evaluation during training, no checkpoints). The table:
pass@1 (mean and per seed; the SFT model on the same tasks as the start), KL per response (last 5
iterations), seconds per iteration, peak RSS. Choose settings with the validation split (the
default, data/val_tasks.jsonl); `--heldout=data/eval_tasks.jsonl` adds each final model's pass@1
on the held-out set, the final figure, once.

    python bench/bench_advantages.py                                    # gae, grpo, rloo x seeds 42, 1, 2
    python bench/bench_advantages.py --estimators=grpo,gae --seeds=42 --PPO_STEPS=10
    python bench/bench_advantages.py --heldout=data/eval_tasks.jsonl    # and the held-out figure

Needs ./sft_model and ./rm_model (bash run.sh). About 10 minutes a run on 2 cores (30 iterations).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

import _common
import config as C
from rlhf.settings import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"estimators": "gae,grpo,rloo", "seeds": "42,1,2", "tasks": "data/val_tasks.jsonl", "heldout": ""}


def pass_at_1(model_dir, tasks):
    """Greedy pass@1 of the model in `model_dir` on `tasks` (the SFT model: where every run starts)."""
    from rlhf.codeeval import evaluate_model, load_problems, sandbox_limits
    from rlhf.common import load_causal_lm, load_tokenizer, torch_dtype

    model = load_causal_lm(model_dir, torch_dtype(C.PRECISION), for_training=False)
    summary = evaluate_model(model, load_tokenizer(model_dir), load_problems(tasks), max_new_tokens=C.GEN_MAX_NEW_TOKENS,
                             ks=(1,), progress=False, limits=sandbox_limits(C), answers_per_call=C.GEN_BATCH_SIZE)
    return summary["pass@1"]


def run(out, estimator, seed, tasks, heldout, overrides):
    cmd = [sys.executable, os.path.join(ROOT, "train_ppo.py"), f"--PPO_ADVANTAGE={estimator}", f"--SEED={seed}",
           f"--EVAL_TASKS_FILE={tasks}", f"--PPO_DIR={out}/ppo_model", f"--RUNS_DIR={out}/runs", "--PPO_EVAL_EVERY=0",
           "--PPO_SAVE_EVERY=0", "--REPORT_TO=none", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "ppo_model", "rlhf_stage.json"), encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    seconds = [h["seconds"] for h in metrics["history"] if "seconds" in h]
    return {"estimator": estimator, "seed": seed, "pass_at_1": metrics["pass_at_1"], "kl": metrics["kl"],
            "seconds_per_iteration": statistics.median(seconds), "peak_rss_mib": metrics["peak_rss_mib"],
            "heldout_pass_at_1": pass_at_1(os.path.join(out, "ppo_model"), heldout) if heldout else None}


def main(argv):
    own, rest = _common.own_options(argv, DEFAULTS)
    apply_overrides(rest, quiet=True)
    for path in (C.SFT_DIR, C.RM_DIR):
        if not os.path.exists(os.path.join(path, "rlhf_stage.json")):
            raise SystemExit(f"error: {path} is needed: run `bash run.sh` (or train_sft.py, train_rm.py) first")
    tasks = os.path.abspath(own["tasks"])
    heldout = own["heldout"] and os.path.abspath(own["heldout"])
    overrides = rest + [f"--SFT_DIR={os.path.abspath(C.SFT_DIR)}", f"--RM_DIR={os.path.abspath(C.RM_DIR)}"]
    result = _common.header("python bench/bench_advantages.py " + " ".join(argv))
    result.update(tasks=own["tasks"], heldout=own["heldout"], steps=C.PPO_STEPS, sft_pass_at_1=pass_at_1(C.SFT_DIR, tasks),
                  sft_heldout_pass_at_1=pass_at_1(C.SFT_DIR, heldout) if heldout else None, runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        for estimator in own["estimators"].split(","):
            for seed in [int(s) for s in own["seeds"].split(",")]:
                out = os.path.join(tmp, f"{estimator}_{seed}")
                result["runs"].append(run(out, estimator, seed, tasks, heldout, overrides))
                r = result["runs"][-1]
                extra = f" | held-out pass@1 {r['heldout_pass_at_1']:.3f}" if heldout else ""
                print(f"{estimator} seed {seed} | pass@1 {r['pass_at_1']:.3f}{extra} | kl {r['kl']:.3f} | "
                      f"{r['seconds_per_iteration']:.1f} s/iteration | {r['peak_rss_mib']:.0f} MiB", flush=True)
    result["load_average_1min_after"] = os.getloadavg()[0]
    def mean_and_seeds(runs, key):  # two table cells: the mean over seeds, then each seed's figure
        return [f"{statistics.mean(r[key] for r in runs):.3f}", ", ".join(f"{r[key]:.3f}" for r in runs)]

    keys = ["pass_at_1"] + (["heldout_pass_at_1"] if heldout else [])
    rows = [["SFT model (start)"] + [c for k in keys for c in (f"{result['sft_' + k]:.3f}", "")] + ["", "", ""]]
    for estimator in own["estimators"].split(","):
        runs = [r for r in result["runs"] if r["estimator"] == estimator]
        rows.append([estimator, *[c for k in keys for c in mean_and_seeds(runs, k)],
                     f"{statistics.mean(r['kl'] for r in runs):.3f}",
                     f"{statistics.median(r['seconds_per_iteration'] for r in runs):.1f}",
                     f"{max(r['peak_rss_mib'] for r in runs):.0f}"])
    print(f"tasks: {own['tasks']}{', held-out: ' + own['heldout'] if heldout else ''}, {C.PPO_STEPS} iterations, "
          f"{result['machine']}")
    print("\n".join(_common.table(["estimator", "pass@1 (mean)", "per seed"]
                                  + (["held-out pass@1 (mean)", "per seed"] if heldout else [])
                                  + ["KL (nats/response)", "s/iteration", "peak RSS (MiB)"], rows)))
    name = "advantages" if own["estimators"] == DEFAULTS["estimators"] else "advantages_" + own["estimators"].replace(",", "_")
    _common.save_results(name, result)


if __name__ == "__main__":
    main(sys.argv[1:])
