"""The peer side of bench_vs_trl_grpo.py: TRL's GRPOTrainer on our ./sft_model with the PPO settings
of config.py, rewarded by our sandbox's unit-test verdicts. Runs in the project's own environment
(its trl is the current release), in a process of its own, started by bench_vs_trl_grpo.py; not
meant to be run by hand.

    python bench/_trl_grpo.py OUT_DIR STEPS [--NAME=value ...]

Writes OUT_DIR/policy (the trained policy, for the common evaluation) and OUT_DIR/trl_timing.json:
the prompts each answer was scored against (their rows in load_prompts' order), per iteration its
seconds and where they went (generate: GRPOTrainer._generate_single_turn;
reward: _calculate_rewards; rollout: all of _generate_and_score_completions, which also runs the
old-logprob and reference forwards; the update is the rest of the iteration), TRL's logged
metrics, and the process's peak RSS.
"""

import collections
import json
import os
import resource
import sys
import time

import torch

import config as C
from rlhf.settings import UserError, apply_overrides

LOSS_TYPE = {"batch": "dapo", "mini_batch": "bnpo"}  # PPO_LOSS_NORM -> loss_type with the same denominator
SCALE_REWARDS = {"grpo": "group", "dr_grpo": "none"}  # PPO_ADVANTAGE -> scale_rewards: (r - mean) [/ (std + 1e-4)]


def grpo_config(out, steps):
    """GRPOConfig kwargs that match config.py's PPO settings (bench_vs_trl_grpo.py's docstring has the
    mapping); a setting GRPOTrainer has no counterpart for is a UserError."""
    unmatched = {"PPO_ADVANTAGE": C.PPO_ADVANTAGE not in SCALE_REWARDS, "PPO_KL_LOSS": not C.PPO_KL_LOSS,
                 "PPO_KL_ESTIMATOR": C.PPO_KL_ESTIMATOR != "k3", "PPO_KL_TARGET": C.PPO_KL_TARGET > 0,
                 "PPO_OVERSAMPLE": C.PPO_OVERSAMPLE != 1, "PPO_SIL_COEF": C.PPO_SIL_COEF != 0,
                 "PPO_PENALIZE_MISSING_EOS": C.PPO_PENALIZE_MISSING_EOS, "PPO_RM_ON_TESTED": C.PPO_RM_ON_TESTED,
                 "PPO_REWARD_FN": bool(C.PPO_REWARD_FN), "USE_LORA": C.USE_LORA}
    if any(unmatched.values()):
        raise UserError(f"GRPOTrainer has nothing like {', '.join(k for k, v in unmatched.items() if v)} as set: "
                        "leave them at bench_vs_trl_grpo.SAME_ALGORITHM's values")
    mini_batches = C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE
    return dict(
        output_dir=os.path.join(out, "trainer"), num_generations=C.PPO_SAMPLES_PER_PROMPT,
        per_device_train_batch_size=C.PPO_MINI_BATCH_SIZE, gradient_accumulation_steps=1,
        steps_per_generation=mini_batches, num_iterations=C.PPO_EPOCHS, max_steps=steps * C.PPO_EPOCHS * mini_batches,
        max_completion_length=C.PPO_RESPONSE_LEN, temperature=C.PPO_TEMPERATURE, top_p=1.0, top_k=0,
        learning_rate=C.PPO_LR, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=C.PPO_MAX_GRAD_NORM,
        adam_epsilon=1e-5, weight_decay=0.01,  # ours: torch.optim.AdamW(eps=1e-5), its default weight decay 0.01
        beta=C.PPO_KL_COEF, epsilon=C.PPO_CLIP, loss_type=LOSS_TYPE[C.PPO_LOSS_NORM],
        scale_rewards=SCALE_REWARDS[C.PPO_ADVANTAGE], reward_weights=[C.PPO_EXEC_WEIGHT],
        mask_truncated_completions=False,
        shuffle_dataset=False,  # the dataset already lists each iteration's prompts in our order
        disable_dropout=True, activation_checkpointing=C.GRADIENT_CHECKPOINTING, use_vllm=False,
        bf16=False, fp16=False, use_cpu=True, seed=C.SEED, report_to=[], logging_steps=C.PPO_EPOCHS * mini_batches,
        save_strategy="no", disable_tqdm=True,
    )


def unit_test_reward(asked, scored):
    """GRPOTrainer's reward function: each completion's sandbox verdict on its prompt's tests, as our
    PPO scores it (rlhf.reward.exec_rewards; PPO_EXEC_WEIGHT is TRL's reward weight); `row` is the
    dataset column that says which of the rows `asked` (load_prompts) was asked, appended to `scored`."""
    from rlhf.ppo_setup import reward_mix
    from rlhf.reward import exec_rewards

    mix = reward_mix(C)

    def unit_tests(prompts, completions, row, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        scored.extend(row)
        return exec_rewards([asked[i] for i in row], texts, "cpu", mix).tolist()

    return unit_tests


def main(out, steps, argv):
    apply_overrides(argv)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.common import load_causal_lm, load_tokenizer, seed_everything
    from rlhf.ppo_setup import load_prompts, step_prompts

    seed_everything(C.SEED)
    args = GRPOConfig(**grpo_config(out, steps))
    tokenizer = load_tokenizer(C.SFT_DIR)
    prompts = load_prompts(C.PPO_PROMPTS_FILE, tokenizer, C.MAX_LEN - C.PPO_RESPONSE_LEN)  # the same prompts and filter
    # each iteration's prompts as train_ppo.py draws them (step_prompts), in order: with shuffle_dataset off,
    # TRL's sampler takes them generation batch by generation batch, each prompt num_generations times
    numbered = [dict(p, row=i) for i, p in enumerate(prompts)]
    dataset = Dataset.from_list([
        {"prompt": p["messages"], "row": p["row"]} for step in range(1, steps + 1)
        for p in step_prompts(numbered, step, 0, C.PPO_BATCH_SIZE // C.PPO_SAMPLES_PER_PROMPT, seed=C.SEED,
                              samples_per_prompt=1)])

    per_iteration = args.steps_per_generation * args.num_iterations
    spent, iterations, logged, scored = collections.Counter(), [], [], []

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_iteration == 0:
                now = time.perf_counter()
                iterations.append({"seconds": now - self.start, **spent})
                self.start = now
                spent.clear()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer = GRPOTrainer(model=load_causal_lm(C.SFT_DIR, dtype=torch.float32), args=args, train_dataset=dataset,
                          reward_funcs=[unit_test_reward(prompts, scored)], processing_class=tokenizer,
                          callbacks=[Timing()])

    def timed(name, method):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    for name, method in (("generate", "_generate_single_turn"), ("reward", "_calculate_rewards"),
                         ("rollout", "_generate_and_score_completions")):
        setattr(trainer, method, timed(name, getattr(trainer, method)))
    trainer.train()
    trainer.save_model(os.path.join(out, "policy"))
    tokenizer.save_pretrained(os.path.join(out, "policy"))
    with open(os.path.join(out, "trl_timing.json"), "w", encoding="utf-8") as f:
        json.dump({"iterations": iterations, "logs": logged, "prompts_scored": scored,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


if __name__ == "__main__":
    from rlhf.common import run_stage

    run_stage(lambda argv: main(argv[0], int(argv[1]), argv[2:]))
