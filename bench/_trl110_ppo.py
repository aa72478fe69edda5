"""The peer side of bench_ppo_vs_trl.py: TRL 1.10.0's trl.experimental.ppo.PPOTrainer on our
./sft_model and ./rm_model with the PPO settings of config.py. Runs in the TRL venv
(bench/setup_trl110.sh), started by bench_ppo_vs_trl.py; not meant to be run by hand.

    bench/.venv-trl110/bin/python bench/_trl110_ppo.py OUT_DIR STEPS [--NAME=value ...]

Writes OUT_DIR/policy (the trained policy, for the common evaluation), OUT_DIR/reward_model
(the RM with its score head divided by the RM stage's std, so TRL's raw scores are in the units
of ours: normalised, up to the constant mean/std) and OUT_DIR/trl_timing.json (seconds at the
end of every PPO iteration, TRL's logged metrics).
"""

import json
import os
import sys
import time

import torch

import config as C
from rlhf.settings import apply_overrides


def main(out, steps, argv):
    apply_overrides(argv)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf.common import load_tokenizer, seed_everything
    from rlhf.reward import load_reward_normalization
    from rlhf.ppo_setup import load_prompts

    seed_everything(C.SEED)
    tokenizer = load_tokenizer(C.SFT_DIR)
    tokenizer.padding_side = "left"  # TRL's collator pads the queries; generation continues on the right
    prompts = load_prompts(C.PPO_PROMPTS_FILE, tokenizer, C.MAX_LEN - C.PPO_RESPONSE_LEN)  # the same prompts, same length filter as ours
    ids = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
           for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})

    norm = load_reward_normalization(C.RM_DIR)
    reward = AutoModelForSequenceClassification.from_pretrained(C.RM_DIR, dtype=torch.float32)
    with torch.no_grad():
        reward.score.weight /= norm["std"]  # scores in our normalised units (the head has no bias)
    reward.save_pretrained(os.path.join(out, "reward_model"))
    args = PPOConfig(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=C.PPO_BATCH_SIZE,
        gradient_accumulation_steps=1, num_mini_batches=C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE,
        num_ppo_epochs=C.PPO_EPOCHS, total_episodes=steps * C.PPO_BATCH_SIZE,
        local_rollout_forward_batch_size=C.PPO_BATCH_SIZE,  # one generate() call per batch, as ours
        response_length=C.PPO_RESPONSE_LEN, temperature=C.PPO_TEMPERATURE, learning_rate=C.PPO_LR,
        kl_coef=C.PPO_KL_COEF, kl_estimator=C.PPO_KL_ESTIMATOR, cliprange=C.PPO_CLIP, cliprange_value=C.PPO_VF_CLIP,
        vf_coef=C.PPO_VF_COEF, gamma=C.PPO_GAMMA, lam=C.PPO_LAM, stop_token="eos",
        missing_eos_penalty=-C.PPO_MISSING_EOS_PENALTY if C.PPO_PENALIZE_MISSING_EOS else None,
        bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
        num_sample_generations=0, seed=C.SEED, disable_tqdm=True,
    )
    marks, logged = [], []

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(C.SFT_DIR, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(C.SFT_DIR, dtype=torch.float32),
        reward_model=reward,
        value_model=AutoModelForSequenceClassification.from_pretrained(C.RM_DIR, dtype=torch.float32),
        train_dataset=dataset, callbacks=[Timing()],
    )
    start = time.perf_counter()
    trainer.train()
    trainer.save_model(os.path.join(out, "policy"))
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(os.path.join(out, "policy"))
    with open(os.path.join(out, "trl_timing.json"), "w", encoding="utf-8") as f:
        json.dump({"start": start, "step_ends": marks, "logs": logged}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
