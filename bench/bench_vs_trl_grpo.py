"""Our critic-free PPO (train_ppo.py --PPO_ADVANTAGE=grpo) against a peer: TRL's GRPOTrainer, both
rewarded by our sandbox's unit-test verdicts, same machine, same sitting, run alternately (ours,
theirs, ours, theirs, one pair per seed). TRL's side runs in the project's own environment (the trl
it installs is the current release, which has GRPOTrainer; no second environment as for TRL 1.10's
PPOTrainer), in a process of its own (bench/_trl_grpo.py), as ours does.

Both start from ./sft_model (policy and reference), fp32 on the CPU, for --steps iterations of
PPO_BATCH_SIZE answers each, on the same prompts in the same order (PPO_PROMPTS_FILE, every row with
unit tests; each iteration's prompts drawn by train_ppo's step_prompts). The settings, ours -> TRL's:

    PPO_SAMPLES_PER_PROMPT          -> num_generations (answers per prompt, the group)
    PPO_BATCH_SIZE / PPO_MINI_BATCH_SIZE -> steps_per_generation (mini-batches a generation is cut into),
                                       per_device_train_batch_size = PPO_MINI_BATCH_SIZE,
                                       gradient_accumulation_steps = 1 (one optimizer step a mini-batch)
    PPO_EPOCHS                      -> num_iterations (passes over each generation)
    --steps                         -> max_steps = steps x PPO_EPOCHS x mini-batches (optimizer steps)
    PPO_RESPONSE_LEN, PPO_TEMPERATURE -> max_completion_length, temperature (top_p 1, top_k 0 on both)
    PPO_LR (linear decay to 0, no warm-up) -> learning_rate, lr_scheduler_type linear, warmup_steps 0
    PPO_KL_COEF (k3, a loss term)   -> beta (TRL's KL is k3 in the loss)
    PPO_CLIP                        -> epsilon (epsilon_high the same)
    PPO_ADVANTAGE grpo | dr_grpo    -> scale_rewards group | none ((r - mean) / (std + 1e-4) | r - mean)
    PPO_LOSS_NORM batch | mini_batch -> loss_type dapo | bnpo (tokens of the batch / mini-batches | of the mini-batch)
    PPO_MAX_GRAD_NORM               -> max_grad_norm
    PPO_EXEC_WEIGHT, PPO_EXEC_REWARD -> reward_weights, the reward function (rlhf.reward.exec_rewards)
    AdamW eps 1e-5, weight decay 0.01 -> adam_epsilon, weight_decay
    dropout off, no gradient checkpointing -> disable_dropout, activation_checkpointing (TRL's default: on)

What only one side has is off (SAME_ALGORITHM): ours PPO_OVERSAMPLE=1, PPO_SIL_COEF=0, no missing-EOS
penalty (TRL's mask_truncated_completions off too), the KL as a k3 loss term instead of a k1 reward
penalty; TRL no vLLM, fp32, no entropy bonus. What stays different is each implementation's own:
ours samples with its own loop (finished rows leave the batch) and keeps the sampler's logprobs as
the "old" ones, TRL calls generate() (every row to the longest) and runs one more forward for them;
ours reshuffles the mini-batches every epoch, grouped by length, TRL cuts a generation into fixed
mini-batches once; ours divides the policy term by the tokens of answers in groups whose tests
disagree, dapo by every answer's tokens (the KL term: every token on both); ours decays every
weight, TRL not biases and norms; ours clamps the k3 log-ratio to [-10, 10]; ours also loads the
reward model (unused when every prompt has tests).

Figures per side over the seeds: episodes per second (iterations after the first, a warm-up),
seconds per iteration split into generation, scoring (the sandboxed tests), update (every optimizer
step of the iteration) and the rest (old and reference logprobs, advantages), peak RSS of the
training process (its own ru_maxrss), the test pass rate of the answers each side sampled, over
its iterations (the same prompts in the same order on both sides: learning along the way, paired
by seed), and validation pass@1 of each final policy (--tasks, greedy, _common.held_out, the same
function for both); each of the last two also as ours less TRL's per seed.

    python bench/bench_vs_trl_grpo.py                           # seeds 42, 1, 2 x 10 iterations a side
    python bench/bench_vs_trl_grpo.py --seeds=42 --steps=3      # a quick look
    python bench/bench_vs_trl_grpo.py --PPO_LOSS_NORM=mini_batch # ours' token mean per mini-batch, TRL's bnpo

Needs ./sft_model and ./rm_model (bash run.sh). Takes any --NAME=value override of config.py.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

import _common
import config as C
from rlhf.settings import UserError, apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"seeds": "42,1,2", "steps": 10, "tasks": "data/val_tasks.jsonl"}
# ours as GRPOTrainer works: no oversampling, self-imitation or missing-EOS penalty; the KL a k3 loss term
SAME_ALGORITHM = ["--PPO_ADVANTAGE=grpo", "--PPO_OVERSAMPLE=1", "--PPO_SIL_COEF=0", "--PPO_KL_LOSS=true",
                  "--PPO_KL_ESTIMATOR=k3", "--PPO_KL_TARGET=0", "--PPO_PENALIZE_MISSING_EOS=false", "--PRECISION=fp32"]
PARTS = ("generate", "reward", "update")


def figures(iterations, peak_rss_mib, policy):
    """A run's figures from its iterations ({"seconds", "generate", "reward", "update", "pass_rate"}
    each): time means over the iterations after the first (all of them when there is one), the rest
    of an iteration as "other"; the sampled answers' test pass rate over every iteration (the same
    prompts in the same order on both sides, so a paired measure of learning along the way)."""
    timed = iterations[1:] or iterations
    mean = {k: statistics.mean(i[k] for i in timed) for k in ("seconds", *PARTS)}
    mean["other"] = mean["seconds"] - sum(mean[k] for k in PARTS)
    return {"iterations": iterations, "episodes_per_second": C.PPO_BATCH_SIZE / mean["seconds"],
            "seconds_per_iteration": mean, "peak_rss_mib": peak_rss_mib, "policy": policy,
            "train_pass_rate": statistics.mean(i["pass_rate"] for i in iterations)}


def run_ours(out, steps, overrides):
    history = _common.run_train_ppo(out, steps, overrides)
    with open(os.path.join(out, "ppo_model", "rlhf_stage.json"), encoding="utf-8") as f:
        peak = json.load(f)["metrics"]["peak_rss_mib"]
    return figures([{"seconds": h["seconds"], "generate": h["generate_seconds"], "reward": h["reward_seconds"],
                     "update": h["update_seconds"], "pass_rate": h["test_pass_rate"]}
                    for h in history if "seconds" in h], peak, os.path.join(out, "ppo_model"))


def run_theirs(out, steps, overrides):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "_trl_grpo.py"), out, str(steps), *overrides],
                   check=True, cwd=ROOT, env=env)
    with open(os.path.join(out, "trl_timing.json"), encoding="utf-8") as f:
        timing = json.load(f)
    # TRL's update: the iteration less _generate_and_score_completions (generation, tests, logprob forwards);
    # its log once an iteration (logging_steps) holds that iteration's mean reward, here the tests' verdicts
    rewards = [log["rewards/unit_tests/mean"] for log in timing["logs"] if "rewards/unit_tests/mean" in log]
    return {**figures([{"seconds": i["seconds"], "generate": i["generate"], "reward": i["reward"],
                        "update": i["seconds"] - i["rollout"], "pass_rate": r}
                       for i, r in zip(timing["iterations"], rewards, strict=True)],
                      timing["peak_rss_mib"], os.path.join(out, "policy")),
            "prompts_scored": timing["prompts_scored"]}  # rows of load_prompts: each iteration's, as ours draws them


def main(argv):
    own, rest = _common.own_options(argv, DEFAULTS)
    if any(a.startswith("--SEED=") for a in rest):
        raise UserError("--SEED is set by the bench for each run: give --seeds=42,1,2")
    apply_overrides(SAME_ALGORITHM + rest)
    from rlhf.common import load_tokenizer
    from rlhf.ppo_setup import load_prompts

    for path in (C.SFT_DIR, C.RM_DIR):
        if not os.path.exists(os.path.join(path, "rlhf_stage.json")):
            raise UserError(f"{path} is needed: run `bash run.sh` (or train_sft.py, train_rm.py) first")
    prompts = load_prompts(C.PPO_PROMPTS_FILE, load_tokenizer(C.SFT_DIR), C.MAX_LEN - C.PPO_RESPONSE_LEN)
    if any(p["problem"] is None for p in prompts):
        raise UserError(f"{C.PPO_PROMPTS_FILE}: every prompt needs unit tests (TRL's side is rewarded by the tests "
                        "alone)")
    seeds, steps = [int(s) for s in own["seeds"].split(",")], own["steps"]
    overrides = [*SAME_ALGORITHM, *rest, f"--SFT_DIR={os.path.abspath(C.SFT_DIR)}",
                 f"--RM_DIR={os.path.abspath(C.RM_DIR)}"]
    result = _common.header("python bench/bench_vs_trl_grpo.py " + " ".join(argv))
    result.update(steps=steps, seeds=seeds, tasks=own["tasks"], batch_size=C.PPO_BATCH_SIZE,
                  mini_batch_size=C.PPO_MINI_BATCH_SIZE, epochs=C.PPO_EPOCHS,
                  samples_per_prompt=C.PPO_SAMPLES_PER_PROMPT,
                  response_len=C.PPO_RESPONSE_LEN, overrides=overrides, ours=[], theirs=[],
                  sft_pass_at_1=_common.held_out(C.SFT_DIR, own["tasks"])["pass_at_1"])
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for side, run in (("ours", run_ours), ("theirs", run_theirs)):
                out = os.path.join(tmp, f"{side}{seed}")
                os.makedirs(out)
                r = run(out, steps, overrides + [f"--SEED={seed}"])
                r.update(seed=seed, pass_at_1=_common.held_out(r.pop("policy"), own["tasks"])["pass_at_1"])
                result[side].append(r)
                print(f"seed {seed} | {side} | {r['episodes_per_second']:.2f} episodes/s | "
                      f"{r['seconds_per_iteration']['seconds']:.1f} s/iteration | sampled pass rate "
                      f"{r['train_pass_rate']:.3f} | pass@1 {r['pass_at_1']:.3f}",
                      flush=True)
    result["load_average_1min_after"] = os.getloadavg()[0]
    rows = []
    for side, label in (("ours", "ours (train_ppo.py, grpo)"), ("theirs", "TRL GRPOTrainer")):
        runs = result[side]
        eps = [r["episodes_per_second"] for r in runs]
        split = [f"{statistics.mean(r['seconds_per_iteration'][k] for r in runs):.2f}"
                 for k in ("seconds", *PARTS, "other")]
        result[f"{side}_episodes_per_second"] = statistics.mean(eps)
        rows.append([label, f"{statistics.mean(eps):.2f}", ", ".join(f"{x:.2f}" for x in eps), *split,
                     f"{max(r['peak_rss_mib'] for r in runs):.0f}",
                     f"{statistics.mean(r['train_pass_rate'] for r in runs):.3f}",
                     f"{statistics.mean(r['pass_at_1'] for r in runs):.3f}",
                     ", ".join(f"{r['pass_at_1']:.3f}" for r in runs)])
    rows.append(["SFT model (start)", "", "", "", "", "", "", "", "", "", f"{result['sft_pass_at_1']:.3f}", ""])
    result["ratio"] = result["ours_episodes_per_second"] / result["theirs_episodes_per_second"]
    print(f"{len(seeds)} seeds x {steps} iterations of {C.PPO_BATCH_SIZE} answers a side; validation: {own['tasks']}; "
          f"{result['machine']}")
    print("\n".join(_common.table(["run", "episodes/s (mean)", "per seed", "s/iteration", "generation", "scoring",
                                   "update", "other", "peak RSS (MiB)", "sampled pass rate", "pass@1 (mean)",
                                   "per seed"], rows)))
    print(f"ours / TRL = {result['ratio']:.2f}x episodes per second")
    for key, label in (("train_pass_rate", "sampled pass rate"), ("pass_at_1", "validation pass@1")):
        diff = [o[key] - t[key] for o, t in zip(result["ours"], result["theirs"])]
        result[f"{key}_ours_less_theirs"] = diff
        spread = f" (std {statistics.stdev(diff):.3f})" if len(diff) > 1 else ""
        print(f"{label}, ours less TRL's: mean {statistics.mean(diff):+.3f}{spread}; per seed "
              + ", ".join(f"{d:+.3f}" for d in diff))
    _common.save_results("vs_trl_grpo", result)
    return result


if __name__ == "__main__":
    from rlhf.common import run_stage

    run_stage(main)
