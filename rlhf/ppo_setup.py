"""What train_ppo.py's loop needs around it: the settings checked together, the set-up (data,
models, optimizer, the resume point) as one PPOSetup, each iteration's prompts, the held-out
evaluation, the checkpoints and the final save. Settings are read in check_settings() and setup() only;
the other functions take what they need as arguments or from the PPOSetup."""

import contextlib
import dataclasses
import json
import os
import resource
import shutil

import torch

import config as C
from rlhf.checkpoints import checkpoint_folder, resume_from
from rlhf.codeeval import load_problems, sampled_pass_at_k, sandbox_limits, seed_prompt_passes
from rlhf.common import (
    check_lora_targets, end_of_turn_ids, load_causal_lm, load_tokenizer, lora_config, prompt_rng, stop_at_end_of_turn,
    torch_dtype,
)
from rlhf.data import load_rows, row_where, template_lengths
from rlhf.engines import full_weights_for_generation, plain_policy, shard_frozen_model, sharded, whole_models_loaded
from rlhf.handoff import disk_full_is_an_error, save_stage, write_json, write_jsonl
from rlhf.ppo_math import KLController
from rlhf.ppo_models import PolicyAndCritic, disable_dropout, frozen, zero_value_head
from rlhf.reward import RewardMix, reward_function
from rlhf.settings import UserError, scalar_settings

CHECKPOINT = {"marker": "ppo_state.json", "prefix": "step_"}  # step_N is complete once it holds ppo_state.json


def check_settings():
    """Settings that only make sense together: one line each, before any model is loaded."""
    for name in ("PPO_MINI_BATCH_SIZE", "PPO_SAMPLES_PER_PROMPT"):
        if getattr(C, name) < 1 or C.PPO_BATCH_SIZE % getattr(C, name):
            raise UserError(f"PPO_BATCH_SIZE ({C.PPO_BATCH_SIZE}) must be a multiple of {name} ({getattr(C, name)})")
    if C.PPO_ADVANTAGE in ("grpo", "dr_grpo", "rloo") and C.PPO_SAMPLES_PER_PROMPT < 2:
        raise UserError(f"PPO_ADVANTAGE={C.PPO_ADVANTAGE} compares the answers to one prompt: set PPO_SAMPLES_PER_PROMPT >= 2")
    if C.PPO_KL_LOSS and C.PPO_KL_ESTIMATOR == "k1":
        raise UserError("PPO_KL_LOSS needs PPO_KL_ESTIMATOR k2 or k3: k1 as a loss term has no gradient in expectation")


def reward_mix(settings):
    """How PPO scores an answer (rlhf.reward.RewardMix), from the PPO_* reward and SANDBOX_* settings
    (the config module, or any object with those attributes)."""
    s = settings
    return RewardMix(rm_weight=s.PPO_RM_WEIGHT, exec_weight=s.PPO_EXEC_WEIGHT, exec_reward=s.PPO_EXEC_REWARD,
                     rm_on_tested=s.PPO_RM_ON_TESTED,
                     reward_fn=reward_function(s.PPO_REWARD_FN) if s.PPO_REWARD_FN else None,
                     missing_eos_penalty=s.PPO_MISSING_EOS_PENALTY if s.PPO_PENALIZE_MISSING_EOS else None,
                     sandbox_limits=sandbox_limits(s))


def load_prompts(path, tokenizer, max_tokens):
    """PPO prompts: {"prompt": text or messages, ...}, or task rows with unit tests in any format
    (the project's, HumanEval, MBPP, APPS/TACO, CodeContests: rlhf.codeeval), which get an
    execution reward and ask what their format asks. Prompts over `max_tokens` (MAX_LEN -
    PPO_RESPONSE_LEN) are dropped with a count. Rows {"messages", "problem" (None without tests)}."""
    from rlhf.codeeval import prompt_and_problem

    rows = []
    for i, row in enumerate(load_rows(path)):
        messages, problem = prompt_and_problem(row, row_where(path, row, i), str(i))  # tests checked here
        rows.append({"messages": messages, "problem": problem})
    lengths = template_lengths(tokenizer, [r["messages"] for r in rows], path, add_generation_prompt=True)
    kept = [r for r, n in zip(rows, lengths) if n <= max_tokens]
    if not kept:
        raise UserError(f"{path}: every prompt is longer than MAX_LEN - PPO_RESPONSE_LEN = {max_tokens} tokens")
    if len(kept) < len(rows):
        print(f"dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {max_tokens} tokens")
    return kept


def step_prompts(prompts, step, rank, count, *, seed, samples_per_prompt):
    """The `count` prompts of one iteration on one process, each repeated samples_per_prompt times
    (answers that pass and fail side by side are what the advantages learn from). A function of
    (seed, rank, step) only: a resumed run sees the prompts it would have seen, no sampler state."""
    rng = prompt_rng(seed, rank, step)
    picked = [prompts[rng.randrange(len(prompts))] for _ in range(count)]
    return [row for row in picked for _ in range(samples_per_prompt)]


def encode_prompts(tokenizer, batch, device):
    texts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in batch]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@dataclasses.dataclass
class PPOSetup:
    """Everything setup() builds for the loop; None where the run has no such thing."""
    accelerator: object  # the run's accelerate.Accelerator
    model: torch.nn.Module  # the prepared PolicyAndCritic: the policy, and the critic with gae
    optimizer: torch.optim.Optimizer  # AdamW over both (prepared): the policy at PPO_LR, the critic at PPO_CRITIC_LR
    scheduler: object  # linear decay to 0 over every update of the run (prepared)
    critic: bool  # a critic is trained (PPO_ADVANTAGE=gae)
    tokenizer: object  # the SFT stage's tokenizer and chat template
    eos_ids: list  # the ids that end an answer: sampling, masks, the missing-EOS penalty
    rm_tokenizer: object  # the RM stage's tokenizer
    norm: dict  # the RM's score normalisation ("mean", "std") from the RM stage
    reward: RewardMix  # how an answer's score is made (rlhf.reward)
    rm_every_row: bool  # the RM reads every answer: its forwards are collectives (ZeRO-3, FSDP)
    prompts: list  # PPO prompts, rows {"messages", "problem"} (load_prompts)
    oversample: int  # prompts sampled per prompt trained on: PPO_OVERSAMPLE where tests can choose, else 1
    problems: list  # held-out tasks (EVAL_TASKS_FILE) for pass@1
    seed_problems: list  # natural prompts (SEED_PROMPTS_FILE) asked after the last iteration
    kl_ctl: KLController  # the KL coefficient, fixed or adaptive; checkpointed
    ckpt_dir: str  # where the checkpoints are (RUNS_DIR/ppo/checkpoints)
    start: int  # the last finished iteration: 0, or the step a checkpoint resumes from
    history: list  # a row of metrics per finished iteration and evaluation
    run_settings: dict  # the run's settings {NAME: value}: recorded with each checkpoint and the output
    ref_copy: torch.nn.Module | None = None  # the frozen reference as a model of its own (use reference())
    rm_copy: torch.nn.Module | None = None  # the frozen reward model as a model of its own (use reward_model())

    def reference(self):
        """The frozen SFT policy the KL is measured to: its own copy, or with LoRA the policy with
        its adapter disabled. A context manager."""
        return frozen(self.ref_copy, lambda: self.accelerator.unwrap_model(self.model).policy)

    def reward_model(self):
        """The frozen reward model: its own copy, or with LoRA and a critic the critic (initialised
        from the RM) with its adapter disabled. A context manager."""
        return frozen(self.rm_copy, lambda: self.accelerator.unwrap_model(self.model).critic)


def setup(accelerator):
    """Data, models, optimizer and scheduler (prepared), KL controller, and the resume point."""
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from rlhf.reward import load_reward_model, load_reward_normalization

    critic_on = C.PPO_ADVANTAGE == "gae"
    reward = reward_mix(C)
    # data (before the models: a mistake in it is reported in seconds)
    tokenizer = load_tokenizer(C.SFT_DIR)
    prompts = load_prompts(C.PPO_PROMPTS_FILE, tokenizer, C.MAX_LEN - C.PPO_RESPONSE_LEN)
    problems = load_problems(C.EVAL_TASKS_FILE)[: C.EVAL_MAX_TASKS or None] if C.EVAL_TASKS_FILE else []
    seed_problems = load_problems(C.SEED_PROMPTS_FILE) if C.SEED_PROMPT_SAMPLES and C.SEED_PROMPTS_FILE else []
    n_tested = sum(r["problem"] is not None for r in prompts)
    # oversampling picks prompts by their test results: without tests (or their reward) it would only cost time
    oversample = C.PPO_OVERSAMPLE if n_tested and C.PPO_EXEC_WEIGHT and C.PPO_SAMPLES_PER_PROMPT > 1 else 1
    if accelerator.is_main_process:
        if C.PPO_SAMPLES_PER_PROMPT == 1:  # no group of answers to one prompt whose test results could differ
            print("PPO_SAMPLES_PER_PROMPT=1: every answer trains the policy against the "
                  f"{'critic' if critic_on else 'batch mean'}; PPO_OVERSAMPLE and PPO_SIL_COEF (they compare "
                  "the answers to one prompt) are not used")
        elif oversample < C.PPO_OVERSAMPLE:
            print(f"PPO_OVERSAMPLE={C.PPO_OVERSAMPLE} is not used: no prompt has unit tests, or PPO_EXEC_WEIGHT is 0")
        print(f"data: {len(prompts)} prompts ({n_tested} with unit tests), {len(problems)} held-out tasks | "
              f"advantages: {C.PPO_ADVANTAGE}")
        if not C.EVAL_TASKS_FILE:
            print("no held-out evaluation: EVAL_TASKS_FILE is empty")

    # models: policy + reference from SFT; reward model from RM, and the critic (gae only) too
    rm_tokenizer, norm = load_tokenizer(C.RM_DIR), load_reward_normalization(C.RM_DIR)
    policy = load_causal_lm(C.SFT_DIR, torch.float32, qlora=C.QLORA,  # trained: fp32 master weights (QLORA: 4-bit base)
                            gradient_checkpointing=C.GRADIENT_CHECKPOINTING)
    check_lora_targets(policy, C.USE_LORA, C.LORA_TARGET_MODULES)
    eos_ids = end_of_turn_ids(tokenizer, policy)  # where an answer ends: sampling, masks, the missing-EOS penalty
    critic = load_reward_model(C.RM_DIR, dtype=torch.float32) if critic_on else None
    ref_copy = rm_copy = None
    if C.USE_LORA:  # the reference is the policy with its adapter off; the RM is the critic's, when there is one
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config("CAUSAL_LM", C))
        if critic is not None:  # its head `score` trained in full (modules_to_save)
            critic = get_peft_model(critic, lora_config("SEQ_CLS", C))
    # frozen copies: whole on every process, or (PPO_SHARD_FROZEN_MODELS, ZeRO-3) partitioned as they load
    # and given inference engines after prepare
    with contextlib.nullcontext() if C.PPO_SHARD_FROZEN_MODELS else whole_models_loaded(accelerator):
        if not C.USE_LORA:  # in the policy's own precision (cast after prepare): at step 0 the KL is 0, not rounding
            ref_copy = AutoModelForCausalLM.from_pretrained(C.SFT_DIR, dtype=torch.float32).to(accelerator.device)
        if critic is None or not C.USE_LORA:
            rm_copy = load_reward_model(C.RM_DIR, dtype=torch_dtype(C.PRECISION)).to(accelerator.device)
    for m in (policy, critic, ref_copy, rm_copy):
        if m is not None:
            disable_dropout(m)
    for m in (ref_copy, rm_copy):
        if m is not None:
            m.eval().requires_grad_(False)
    if critic is not None:
        zero_value_head(critic)
    if C.GRADIENT_CHECKPOINTING:
        policy.gradient_checkpointing_enable()

    # one optimizer; the critic learns faster than the policy (OpenRLHF: ~10x); eps 1e-5: N+ details
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": C.PPO_LR}]
    if critic is not None:
        groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": C.PPO_CRITIC_LR})
    # fused: one kernel over all tensors (timed in bench/README.md); engines that shard or wrap the
    # parameters keep torch's default
    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # one process, DDP
    fused = accelerator.device.type in ("cpu", "cuda") and accelerator.distributed_type in plain
    optimizer = torch.optim.AdamW(groups, eps=1e-5, fused=fused or None)
    n_updates = C.PPO_STEPS * C.PPO_EPOCHS * (C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE)
    # linear decay to 0, no warm-up (transformers' get_linear_schedule_with_warmup(optimizer, 0, n); not
    # imported from there: it loads the Trainer utilities and peft, seconds of start-up for every rank)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, (n_updates - k) / max(1, n_updates)))
    if accelerator.state.deepspeed_plugin is not None:
        # no dataloader goes through prepare, so DeepSpeed cannot infer the micro-batch; and it clips
        # gradients itself (accelerator.clip_grad_norm_ is a no-op there). TRL's PPO set the same.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = C.PPO_MINI_BATCH_SIZE
        ds_config["gradient_clipping"] = C.PPO_MAX_GRAD_NORM
    model, optimizer, scheduler = accelerator.prepare(PolicyAndCritic(policy, critic), optimizer, scheduler)
    if ref_copy is not None:  # DeepSpeed holds the policy in bf16/fp16; elsewhere fp32 master weights, under autocast
        ref_copy.to(next(accelerator.unwrap_model(model).policy.parameters()).dtype)
    if C.PPO_SHARD_FROZEN_MODELS:  # after prepare: the DeepSpeed config is complete
        ref_copy, rm_copy = (None if m is None else shard_frozen_model(accelerator, m) for m in (ref_copy, rm_copy))
    kl_ctl = KLController(C.PPO_KL_COEF, C.PPO_KL_TARGET or None, C.PPO_KL_HORIZON)
    accelerator.register_for_checkpointing(kl_ctl)

    ckpt_dir, start, history, run_settings = checkpoint_folder(C.RUNS_DIR, "ppo"), 0, [], scalar_settings()
    last = resume_from(ckpt_dir, run_settings, **CHECKPOINT)
    if last:
        accelerator.load_state(last)
        with open(os.path.join(last, CHECKPOINT["marker"]), encoding="utf-8") as f:
            saved = json.load(f)
        start, history = saved["step"], saved["history"]
    return PPOSetup(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, critic=critic_on,
        tokenizer=tokenizer, eos_ids=eos_ids, rm_tokenizer=rm_tokenizer, norm=norm, reward=reward,
        # the RM's forwards are collectives under ZeRO-3/FSDP: then every process reads all its answers
        rm_every_row=sharded(accelerator) and (C.PPO_RM_ON_TESTED or n_tested < len(prompts)),
        prompts=prompts, oversample=oversample, problems=problems, seed_problems=seed_problems, kl_ctl=kl_ctl,
        ckpt_dir=ckpt_dir, start=start, history=history, run_settings=run_settings, ref_copy=ref_copy, rm_copy=rm_copy)


def evaluate(policy, tokenizer, rm, rm_tokenizer, norm, problems, device, max_new_tokens, limits, answers_per_call):
    """Greedy pass@1 on held-out tasks (sandboxed under `limits`; answers_per_call: GEN_BATCH_SIZE) and
    the mean normalised RM score of the answers; and each task's answer and verdict (rows as the SFT
    stage's eval_results.jsonl)."""
    from rlhf.codeeval import completion_for, generate_completions, pass_at_1_metrics, score_samples
    from rlhf.reward import normalize_rewards, score_responses

    texts = [t[0] for t in generate_completions(policy, tokenizer, [p.messages() for p in problems], max_new_tokens,
                                                progress=False, answers_per_call=answers_per_call)]
    summary, answers = score_samples(problems, [{"task_id": p.task_id, "completion": completion_for(p, t), "raw": t}
                                                for p, t in zip(problems, texts)], ks=(1,), progress=False,
                                     limits=limits)
    scores = score_responses(rm, rm_tokenizer, [p.messages() for p in problems], texts, device=device)
    return {**pass_at_1_metrics(summary), "rm_score": normalize_rewards(scores.float().mean().item(), norm)}, answers


def run_evaluation(s, step, problems, max_new_tokens, answers_per_call, samples=0, seed_prompt_samples=None):
    """The policy on held-out `problems` (evaluate; answers_per_call: GEN_BATCH_SIZE), with `samples`
    the pass@samples of answers sampled at temperature 1, with seed_prompt_samples how often its
    answers to the natural seed prompts pass. Every process calls it: the main one evaluates (and prints and logs the figures
    at `step`), the others too where the weights are sharded (every forward is then a collective);
    ({}, []) elsewhere and without tasks."""
    accelerator, result, answers, limits = s.accelerator, {}, [], s.reward.sandbox_limits
    if (accelerator.is_main_process or sharded(accelerator)) and problems:
        with s.reward_model() as rm, accelerator.autocast(), \
                full_weights_for_generation(accelerator, s.model, with_critic=s.critic) as policy:
            result, answers = evaluate(policy, s.tokenizer, rm, s.rm_tokenizer, s.norm, problems, accelerator.device,
                                       max_new_tokens, limits, answers_per_call)
            if samples:  # the trained policy's pass@k, as SFT reports it
                result.update(sampled_pass_at_k(policy, s.tokenizer, problems, samples, max_new_tokens, progress=False,
                                                limits=limits, answers_per_call=answers_per_call))
            if seed_prompt_samples is not None:  # the natural prompts, asked as a user asks
                result.update(seed_prompt_passes(policy, s.tokenizer, s.seed_problems, seed_prompt_samples,
                                                 max_new_tokens, progress=False, limits=limits,
                                                 answers_per_call=answers_per_call))
    if accelerator.is_main_process and result:
        print(f"ppo eval step {step} | pass@1 {result['pass_at_1']:.3f} | rm score {result['rm_score']:.3f}")
        accelerator.log({f"ppo/eval_{k}": v for k, v in result.items() if not isinstance(v, dict)}, step=step)
    accelerator.wait_for_everyone()
    return result, answers


def save_checkpoint(accelerator, folder, step, history, run_settings):
    """accelerate's state (models, optimizer, scheduler, RNGs, KL controller) + our step counter and `run_settings`,
    written to a temporary folder and renamed, so a kill mid-save never leaves a half checkpoint
    that looks complete; older checkpoints are removed after."""
    final = os.path.join(folder, f"step_{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    kept = "the previous checkpoint is kept and a rerun resumes from it"
    with disk_full_is_an_error(f"checkpoint {final}", tmp, kept):
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()  # save_state has no barrier: every process's RNG state is written
        if accelerator.is_main_process:
            write_json(os.path.join(tmp, CHECKPOINT["marker"]), {"step": step, "history": history,
                                                                 "settings": run_settings})
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for d in os.listdir(folder):
            if d.startswith("step_") and d != f"step_{step}":
                shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_policy(s, out_dir, metrics, answers, sft_dir, lora):
    """./ppo_model: the trained policy as a plain causal LM (the SFT model's architecture, its LoRA
    adapter merged: `lora` is its LoraConfig, None without LoRA), its tokenizer, the metrics with
    the peak memory (eval_results.json, rlhf_stage.json) and the final evaluation's answers
    (eval_results.jsonl). Every process calls it (the shards are gathered); the main one writes."""
    policy = plain_policy(s.accelerator, s.model, torch.float32, sft_dir, lora)
    if s.accelerator.is_main_process:
        stop_at_end_of_turn(policy, s.tokenizer)
        metrics = {**metrics, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "history": s.history}
        save_stage("ppo", out_dir, policy, s.tokenizer, metrics, s.ckpt_dir, s.run_settings,
                   also=lambda tmp: write_jsonl(os.path.join(tmp, "eval_results.jsonl"), answers) if answers else None)
