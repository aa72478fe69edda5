"""Our PPO (train_ppo.py) against a peer: TRL 1.10.0's trl.experimental.ppo.PPOTrainer (the last
TRL release with PPO), same machine, same sitting, run alternately (ours, theirs, ours, theirs).

Both start from ./sft_model (policy and reference) and ./rm_model (reward and value model), fp32,
with the same prompts (PPO_PROMPTS_FILE), batch (PPO_BATCH_SIZE), response length
(PPO_RESPONSE_LEN), PPO epochs, mini-batches (PPO_BATCH_SIZE / PPO_MINI_BATCH_SIZE), learning
rate, KL coefficient, clip ranges, temperature and seed, and --steps iterations each. Ours runs with
one sample per prompt and the RM as the only reward (PPO_SAMPLES_PER_PROMPT=1,
PPO_EXEC_WEIGHT=0, PPO_RM_WEIGHT=1; no oversampling then), as TRL's PPOTrainer does; TRL's reward model is the RM with its score head
divided by the RM stage's std, so both optimise the same normalised score. What stays different
is each implementation's own choice (ours: critic lr PPO_CRITIC_LR, gradient clipping, responses
padded to the longest; TRL: one lr, full-vocabulary logits kept from generate()).

Speed: episodes per second over the iterations after the first (warm-up), median over rounds.
Reward gain: both final policies and the SFT model answer the first PPO_EVAL_TASKS tasks of --tasks
(validation by default: a comparison, not the held-out figure) greedily (_common.held_out); the gain
is the mean normalised RM score (and pass@1) minus the SFT model's.

    bash bench/setup_trl110.sh                          # once: the TRL 1.10 venv
    python bench/bench_ppo_vs_trl.py                    # 2 rounds x 5 iterations each
    python bench/bench_ppo_vs_trl.py --rounds=1 --steps=3 --PPO_RESPONSE_LEN=64
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

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
SAME_REWARD = ["--PPO_SAMPLES_PER_PROMPT=1", "--PPO_EXEC_WEIGHT=0", "--PPO_RM_WEIGHT=1", "--PPO_ADVANTAGE=gae"]  # what TRL's PPOTrainer does (GAE critic)


def run_ours(out, steps, overrides):
    history = _common.run_train_ppo(out, steps, [*SAME_REWARD, *overrides])
    seconds = [h["seconds"] for h in history]
    return {"seconds_per_iteration": seconds, "episodes_per_second": len(seconds[1:]) * C.PPO_BATCH_SIZE / sum(seconds[1:]),
            "train_score_first_last": [history[0]["rm_score"], history[-1]["rm_score"]], "policy": f"{out}/ppo_model"}


def run_theirs(out, steps, overrides, python):
    cmd = [python, os.path.join(ROOT, "bench", "_trl110_ppo.py"), out, str(steps), *SAME_REWARD, *overrides]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    with open(os.path.join(out, "trl_timing.json"), encoding="utf-8") as f:
        timing = json.load(f)
    ends = [timing["start"]] + timing["step_ends"]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    scores = [log["objective/scores"] for log in timing["logs"] if "objective/scores" in log]
    return {"seconds_per_iteration": seconds, "episodes_per_second": len(seconds[1:]) * C.PPO_BATCH_SIZE / sum(seconds[1:]),
            "train_score_first_last": [scores[0], scores[-1]] if scores else None, "policy": f"{out}/policy"}


def main(argv):
    own, rest = _common.own_options(argv, {"rounds": 2, "steps": 5, "tasks": "data/val_tasks.jsonl",
                                           "venv": os.environ.get("TRL110_VENV", "bench/.venv-trl110")})
    apply_overrides(rest)
    python = os.path.join(ROOT, own["venv"], "bin", "python")
    if not os.path.exists(python):
        subprocess.run(["bash", os.path.join(ROOT, "bench", "setup_trl110.sh")], check=True,
                       env=dict(os.environ, TRL110_VENV=own["venv"]))
    overrides = rest + [f"--SFT_DIR={os.path.abspath(C.SFT_DIR)}", f"--RM_DIR={os.path.abspath(C.RM_DIR)}"]
    result = _common.header("python bench/bench_ppo_vs_trl.py " + " ".join(argv))
    trl_version = subprocess.run([python, "-c", "import trl, transformers; print(trl.__version__, transformers.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.split()
    result.update(peer=f"trl {trl_version[0]} (transformers {trl_version[1]})", steps=own["steps"], rounds=own["rounds"],
                  tasks=own["tasks"], batch_size=C.PPO_BATCH_SIZE, mini_batch_size=C.PPO_MINI_BATCH_SIZE, ppo_epochs=C.PPO_EPOCHS,
                  response_len=C.PPO_RESPONSE_LEN, ours=[], theirs=[])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(own["rounds"]):
            for side, run in (("ours", lambda o: run_ours(o, own["steps"], overrides)),
                              ("theirs", lambda o: run_theirs(o, own["steps"], overrides, python))):
                out = os.path.join(tmp, f"{side}{r}")
                os.makedirs(out)
                result[side].append(run(out))
                print(f"round {r + 1} | {side} | {result[side][-1]['episodes_per_second']:.2f} episodes/s", flush=True)
        tasks = C.PPO_EVAL_TASKS or None
        quality = {side: _common.held_out(policy, own["tasks"], tasks) for side, policy in
                   (("sft", C.SFT_DIR), ("ours", result["ours"][-1]["policy"]), ("theirs", result["theirs"][-1]["policy"]))}
    result["held_out"] = quality
    result["load_average_1min_after"] = os.getloadavg()[0]
    ours = statistics.median(x["episodes_per_second"] for x in result["ours"])
    theirs = statistics.median(x["episodes_per_second"] for x in result["theirs"])
    result.update(ours_episodes_per_second=ours, theirs_episodes_per_second=theirs, ratio=ours / theirs)
    rows = []
    for side, label in (("ours", "ours (train_ppo.py)"), ("theirs", f"TRL {trl_version[0]} PPOTrainer")):
        eps = statistics.median(x["episodes_per_second"] for x in result[side])
        gain = quality[side]["rm_score"] - quality["sft"]["rm_score"]
        rows.append([label, f"{eps:.2f}", ", ".join(f"{x['episodes_per_second']:.2f}" for x in result[side]),
                     f"{gain:+.3f}", f"{quality[side]['pass_at_1']:.3f}"])
    rows.append(["SFT model (start)", "", "", "0", f"{quality['sft']['pass_at_1']:.3f}"])
    print("\n".join(_common.table(["run", "episodes/s (median)", "rounds", "RM score gain (held-out)", "pass@1"], rows)))
    print(f"ours / TRL = {ours / theirs:.2f}x episodes per second")
    _common.save_results("ppo_vs_trl", result)


if __name__ == "__main__":
    main(sys.argv[1:])
