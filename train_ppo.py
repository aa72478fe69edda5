"""Stage 3 of 3: PPO, our own implementation on accelerate + transformers + peft.

Reads  ./sft_model (policy and frozen reference), ./rm_model (frozen reward model; the critic
       starts from it), PPO_PROMPTS_FILE (prompts, with unit tests where available) and
       EVAL_TASKS_FILE (held-out tasks for pass@1).
Writes ./ppo_model: a plain causal-LM folder (merged when LoRA is on) with tokenizer, chat
       template, eval_results.json and rlhf_stage.json; checkpoints and logs under RUNS_DIR/ppo.

One iteration: sample responses to a batch of prompts (rollout; PPO_OVERSAMPLE x more prompts,
keeping those whose answers disagree in the unit tests), score them (normalised RM score + test
reward, a penalty when a response never ends), shape per-token rewards with a KL penalty to the
SFT reference, estimate advantages with GAE, then PPO_EPOCHS of clipped policy and value updates
over mini-batches. The math is in the section below, each trick with its source; the loop is
main().

    python train_ppo.py                                    # embedded default, CPU is fine
    python train_ppo.py --USE_LORA=true --PPO_LR=1e-5      # LoRA: reference = adapter disabled
    accelerate launch --config_file accelerate_configs/ddp.yaml train_ppo.py  # several GPUs (README: DeepSpeed, FSDP)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_ppo.py  # 2 CPU processes

Any constant of config.py can be overridden as --NAME=value. Interrupted runs resume from the
last checkpoint (RESUME, PPO_SAVE_EVERY).
"""

import contextlib
import json
import os
import random
import resource
import shutil
import time

import torch

import config as C
from rlhf.checkpoints import disk_full_is_an_error, diverged, resume_from
from rlhf.common import (
    check_output_dir, load_causal_lm, load_tokenizer, lora_config, precision, report_to, require_stage_output,
    run_stage, save_stage_output, save_tokenizer, scalar_settings, start_stage, torch_dtype, write_json,
)
from rlhf.data import load_rows, prompt_messages
from rlhf.engines import full_weights_for_generation, plain_policy, sharded
from rlhf.settings import UserError

# ---- PPO math (pure functions, unit-tested in tests/test_ppo_math.py) ----
# Conventions shared by every function below:
# - B = batch of responses, T = response length (prompt tokens removed), right-padded.
# - `mask` is a bool tensor (B, T), True on valid response tokens. It comes from the position of
#   the first EOS only (first_eos_mask), never from the pad id: a token equal to pad_id before the
#   first EOS is valid, and the mask stays right even where pad_id == eos_id.
# - Every response has at least one valid token (an EOS at position 0 is a one-token response
#   whose only action is stopping), so masked means over a batch never divide by zero.
# - Padding positions of returned (B, T) tensors are 0.


def first_eos_mask(response_ids, eos_id):
    """Valid-token mask of right-padded responses: every token up to and including the first EOS.

    eos_id: an int, or a list of ints for models with several stop tokens.
    Returns (mask (B, T) bool, ends_with_eos (B,) bool, last_index (B,) long). last_index is the
    position of the first EOS, or T - 1 for a response that never emitted EOS (cut at the length
    limit); it is always a valid token. Truncation after EOS as in Huang et al. 2024 (N+ details).
    """
    if response_ids.shape[1] == 0:
        raise ValueError("first_eos_mask: responses have length 0; generate at least one token")
    is_eos = torch.isin(response_ids, torch.as_tensor(eos_id, device=response_ids.device))  # (B, T)
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # (B, T) number of EOS strictly before t
    mask = eos_before == 0  # (B, T)
    ends_with_eos = is_eos.any(1)  # (B,)
    last_index = mask.sum(1) - 1  # (B,)
    return mask, ends_with_eos, last_index


def truncate_after_eos(response_ids, eos_id, pad_id):
    """Copy of response_ids (B, T) with every token after the first EOS replaced by pad_id.

    The reward model must score exactly this truncated text (Huang et al. 2024, "truncate after EOS");
    `generate` already pads finished rows, this also covers samplers that keep going.
    """
    mask, _, _ = first_eos_mask(response_ids, eos_id)
    return torch.where(mask, response_ids, pad_id)  # (B, T)


def logprobs_from_logits(logits, tokens, temperature):
    """Log-probability (B, T) of each taken token under softmax(logits / temperature).

    logits (B, T, V) must already be aligned with tokens (B, T): for a causal LM over prompt +
    response, logits = output.logits[:, prompt_len - 1 : -1]. The SAME temperature must be used for
    the rollout ("old") logprobs, the reference logprobs and the training forward, otherwise the
    PPO ratio and the KL are off from step 0 (TRL <= 1.10 PPOv2 and the N+ code divide all three).
    Memory: one float32 (B, T, V) copy, gather + logsumexp instead of a full log_softmax output.
    """
    scaled = logits.float() / temperature  # (B, T, V)
    taken = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return taken - torch.logsumexp(scaled, dim=-1)  # (B, T)


def entropy_from_logits(logits, temperature):
    """Entropy (B, T) of softmax(logits / temperature); pass the sampling temperature so it is the
    entropy of the distribution actually sampled from. Form as in TRL <= 1.10 PPOv2:
    H = logsumexp(x) - sum(softmax(x) * x). Expects finite logits."""
    scaled = logits.float() / temperature  # (B, T, V)
    probs = torch.softmax(scaled, dim=-1)  # (B, T, V)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(-1)  # (B, T)


def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate (B, T) of KL(policy || reference) from logprobs of sampled tokens.

    Schulman, "Approximating KL divergence" (2020), with r = p_ref / p_policy = exp(ref_logp - logp):
      k1 = -log r = logp - ref_logp      unbiased, can be negative per token (TRL, N+ default)
      k2 = 0.5 * (log r)^2               biased, low variance, >= 0
      k3 = (r - 1) - log r               unbiased, low variance, >= 0 (OpenRLHF, GRPO)
    k3 clamps log r to [-10, 10] before exp so one outlier token cannot give inf (OpenRLHF does the same).
    """
    log_ratio = ref_logp - logp  # (B, T) log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_ratio = log_ratio.clamp(-10.0, 10.0)
        return torch.expm1(log_ratio) - log_ratio  # expm1 keeps k3 exactly 0 when equal
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; use 'k1', 'k2' or 'k3'")


def apply_missing_eos_penalty(score, ends_with_eos, penalty):
    """Scores (B,) where a response that never emitted EOS gets `penalty` INSTEAD of its RM score.

    Replace, not subtract, as in the N+ code (Huang et al. 2024, penalty -1): a response cut at the
    length limit is worth a fixed low value whatever the RM thinks of the fragment, so the policy
    cannot earn reward by rambling. (TRL's `missing_eos_penalty` subtracts instead, which keeps the RM's
    ranking among cut responses but lets a high-scoring fragment beat a finished answer.)
    Pick `penalty` below the usual range of the (normalised) RM score.
    """
    return torch.where(ends_with_eos, score, torch.full_like(score, penalty))  # (B,)


def per_token_rewards(score, kl, mask, last_index, kl_coef):
    """Per-token reward (B, T): -kl_coef * kl on valid tokens, plus the sequence score (B,) added
    at the last valid token (Ziegler et al. 2019 KL-shaped reward; InstructGPT). 0 on padding.

    Where the score lands: on last_index, the EOS (or the final token when cut), as the N+ code and
    OpenRLHF do. TRL <= 1.10 PPOv2 puts it one position later when it fits (on the first pad) and
    trains the value there, so the score reaches the EOS only through that extra value estimate, and
    lands on a different place for responses that fill T. The last token is the action that ended
    the episode: the score belongs to it, in one place for every response.
    (Reading the score from the RM at the position it was trained on is the caller's job.)
    """
    rewards = torch.where(mask, -kl_coef * kl, 0.0)  # (B, T)
    return rewards.scatter_add(1, last_index.unsqueeze(1), score.unsqueeze(1).to(rewards.dtype))


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where the bool mask is True (all of them, or along dim).
    Padding values never enter, not even NaN or inf."""
    x = torch.where(mask, x, 0.0)
    if dim is None:
        return x.sum() / mask.sum()
    return x.sum(dim) / mask.sum(dim)


def masked_var(x, mask, unbiased=True):
    """Variance of x over valid positions; unbiased divides by n - 1 (as TRL's masked_var)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var: unbiased variance needs at least 2 valid tokens")
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over valid tokens only; padding set to 0.

    shift_mean=True for advantages (mean 0, var 1; Ziegler et al. 2019, N+, TRL). shift_mean=False
    for rewards: scale only, keep the mean, so the sign of the reward survives (TRL's
    `whiten_rewards`). Statistics are over this tensor only (per process under multi-GPU, like TRL).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    rewards, values (B, T); rewards and values outside the mask are treated as 0, so the state after
    the last valid token is terminal (V = 0). Returns (advantages, returns), both (B, T), 0 on
    padding; returns = advantages + values (the value target, as in TRL, N+, OpenRLHF).
    """
    rewards = torch.where(mask, rewards, 0.0)  # (B, T)
    values = torch.where(mask, values, 0.0)  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,) TD error
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]  # (B,)
        advantages[:, t] = last_gae
    return advantages, advantages + values


def policy_loss(logp, old_logp, advantages, mask, clip):
    """Clipped surrogate loss of PPO (Schulman et al. 2017), masked mean over valid tokens.

    logp (B, T) from the current forward (with grad); old_logp, advantages (B, T) from the rollout.
    Returns (loss, stats) with detached tensor stats: clipfrac (share of valid tokens where the
    clipped term is active), approx_kl (k3 of old vs new, as CleanRL; TRL logs 0.5 * logratio^2),
    ratio_mean, ratio_var. The log ratio is zeroed on padding before exp, so garbage logprobs there
    can give neither inf nor a NaN gradient.
    """
    log_ratio = torch.where(mask, logp - old_logp, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_unclipped = -advantages * ratio  # (B, T)
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss (PPO2 baselines; TRL, N+): 0.5 * max((V - R)^2, (V_clip - R)^2), masked mean,
    where V_clip = old_V + clamp(V - old_V, -clip, clip). values (B, T) with grad, the rest from the
    rollout. Returns (loss, stats) with vf_clipfrac (share of valid tokens where the clipped term wins).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    loss_unclipped = (values - returns) ** 2  # (B, T)
    loss_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def mixed_groups(passed, group):
    """(N / group,) bool: True for each group of `group` consecutive responses (the answers to one
    prompt) whose unit-test rewards `passed` (N,) differ. NaN (no tests) counts as not mixed."""
    groups = passed.reshape(-1, group)
    return (groups.amax(1) > groups.amin(1)) & ~groups.isnan().any(1)


def informative_groups(passed, group, keep):
    """Indices (keep * group,) of the responses to train on, out of a larger sampled batch: `keep`
    groups, those with mixed test results first (in sampled order), then the others to fill up, so
    the count and every shape stay fixed; returned in sampled order.

    A group whose answers all pass or all fail teaches little: its advantages are mostly the
    critic's error on one outcome. Training on the prompts with mixed outcomes is DAPO's "dynamic
    sampling" (Yu et al. 2025, arXiv 2503.14476); here sampling cost is small next to the update.
    """
    mixed = mixed_groups(passed, group)
    chosen = torch.cat([mixed.nonzero().flatten(), (~mixed).nonzero().flatten()])[:keep].sort().values
    return (chosen.unsqueeze(1) * group + torch.arange(group, device=passed.device)).flatten()


class KLController:
    """KL coefficient beta: fixed when target is None, else adaptive (Ziegler et al. 2019):
    beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.

    current_kl: mean per-response KL (sum over tokens of k1, averaged over the batch);
    n_steps, horizon: counted in episodes (responses), as Ziegler et al. and OpenRLHF (horizon 10000).
    state_dict() holds only the coefficient; target and horizon come from the settings of the run.
    """

    def __init__(self, init_coef, target=None, horizon=10000):
        self.value, self.target, self.horizon = float(init_coef), target, horizon

    def update(self, current_kl, n_steps):
        if self.target is None:
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


# ---- end of PPO math ----


# ---- models ----

class PolicyAndCritic(torch.nn.Module):
    """Policy and critic in one module, so accelerate (DDP, DeepSpeed, FSDP) prepares, clips and
    checkpoints them together with one optimizer (as TRL's PolicyAndValueWrapper)."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, position_ids):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits, token_values(self.critic, input_ids, attention_mask, position_ids)


def token_values(critic, input_ids, attention_mask, position_ids):
    """Per-token values (B, L): the reward model's scalar head applied at every position instead
    of only the last one (critic initialised from the RM: DeepSpeed-Chat, OpenRLHF, N+)."""
    base = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return critic.score(hidden).squeeze(-1).float()  # (B, L); peft routes `score` to its trained copy


def disable_dropout(model):
    """Dropout off in every model during RL: with it the ratio is not 1 at the first update and
    the KL is noise (N+ implementation details; TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def positions(attention_mask):
    """Position ids that skip the left padding, as generate() computes them (B, L)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def response_logits(model, query, query_mask, response):
    """Logits (B, T, V) that predict each response token, from one forward over prompt + response."""
    ids = torch.cat([query, response], 1)  # (B, P + T)
    mask = torch.cat([query_mask, torch.ones_like(response)], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    return logits[:, query.shape[1] - 1: -1]  # (B, T, V): position P-1+t predicts response token t


# ---- data ----

def load_prompts(path, tokenizer):
    """PPO prompts: {"prompt": text or messages, ...}; rows that also carry unit tests (the
    project's task format, or HumanEval/MBPP fields) get an execution reward."""
    from rlhf.codeeval import Problem, detect_format

    rows = []
    for i, row in enumerate(load_rows(path)):
        messages = prompt_messages(row, f"{path}:{row.get('_line', i + 1)}")
        record = {k: v for k, v in row.items() if k != "_line"}
        if isinstance(record.get("prompt"), list):  # the task formats expect the request as text
            record["prompt"] = messages[-1]["content"]
        fmt = detect_format(record)
        problem = Problem(str(record.get("task_id", len(rows))), fmt, record) if fmt else None
        rows.append({"messages": messages, "problem": problem})
    limit = C.MAX_LEN - C.PPO_RESPONSE_LEN
    lengths = [len(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
               for r in rows]
    kept = [r for r, n in zip(rows, lengths) if n <= limit]
    if not kept:
        raise UserError(f"{path}: every prompt is longer than MAX_LEN - PPO_RESPONSE_LEN = {limit} tokens")
    if len(kept) < len(rows):
        print(f"dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {limit} tokens")
    return kept


def encode_prompts(tokenizer, batch, device):
    texts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in batch]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ---- scoring: reward model + unit tests ----

def exec_rewards(batch, texts, device):
    """Unit-test reward (B,) of each response (PPO_EXEC_REWARD of its sandbox verdict); NaN where the
    prompt has no tests or PPO_EXEC_WEIGHT is 0."""
    from rlhf.codeeval import completion_for
    from rlhf.sandbox import run_many

    passed = torch.full((len(batch),), float("nan"), device=device)
    tested = [i for i, r in enumerate(batch) if r["problem"] is not None]
    if tested and C.PPO_EXEC_WEIGHT:
        verdicts = run_many([batch[i]["problem"].job(completion_for(batch[i]["problem"], texts[i])) for i in tested])
        # "all": the verdict greedy pass@1 counts; "fraction" also pays for near misses
        passed[tested] = torch.tensor([float(v.passed) if C.PPO_EXEC_REWARD == "all" else v.pass_fraction
                                       for v in verdicts], device=device)
    return passed


def score_responses(rm, rm_tokenizer, norm, batch, texts, ends_with_eos, passed, device):
    """Sequence scores (B,) and the normalised RM scores (B,), given the test rewards `passed` (B,).

    The RM reads the response exactly as it was trained on it: prompt + answer through the chat
    template, scored at the template's last token (rlhf.reward.score_responses); normalised with
    the mean/std the RM stage stored (N+: centre on reference responses)."""
    from rlhf.reward import score_responses as rm_scores

    rm_score = rm_scores(rm, rm_tokenizer, [r["messages"] for r in batch], texts, device=device)
    rm_score = (rm_score.float().to(device) - norm["mean"]) / norm["std"]
    score = C.PPO_RM_WEIGHT * rm_score + C.PPO_EXEC_WEIGHT * torch.nan_to_num(passed, nan=0.0)
    if C.PPO_REWARD_FN:  # a user's own reward on top: f(list of messages, list of texts) -> floats
        score = score + torch.tensor(custom_reward_fn()([r["messages"] for r in batch], texts),
                                     dtype=score.dtype, device=device)
    if C.PPO_PENALIZE_MISSING_EOS:
        score = apply_missing_eos_penalty(score, ends_with_eos, C.PPO_MISSING_EOS_PENALTY)
    return score, rm_score


def custom_reward_fn():
    """The function PPO_REWARD_FN names ("package.module:function")."""
    import importlib

    module, _, name = C.PPO_REWARD_FN.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"PPO_REWARD_FN={C.PPO_REWARD_FN!r}: no such function; write it as module:function") from None


# ---- evaluation, checkpoints ----

def evaluate(policy, tokenizer, rm, rm_tokenizer, norm, problems, device):
    """Greedy pass@1 on held-out tasks (sandboxed) and the mean normalised RM score of the answers."""
    from rlhf.codeeval import completion_for, generate_completions, score_samples
    from rlhf.reward import score_responses as rm_scores

    texts = [t[0] for t in generate_completions(policy, tokenizer, [p.messages() for p in problems],
                                                C.GEN_MAX_NEW_TOKENS, progress=False)]
    summary, _ = score_samples(problems, [{"task_id": p.task_id, "completion": completion_for(p, t)}
                                          for p, t in zip(problems, texts)], ks=(1,), progress=False)
    scores = rm_scores(rm, rm_tokenizer, [p.messages() for p in problems], texts, device=device)
    per_lang = {f"pass_at_1_{k[len('pass@1_'):]}": v for k, v in summary.items() if k.startswith("pass@1_")}
    return {"pass_at_1": summary["pass@1"], **per_lang,
            "rm_score": (scores.float().mean().item() - norm["mean"]) / norm["std"]}


CHECKPOINT = {"marker": "ppo_state.json", "prefix": "step_"}  # step_N is complete once it holds ppo_state.json


def save_checkpoint(accelerator, folder, step, history):
    """accelerate's state (models, optimizer, scheduler, RNGs, KL controller) + our step counter,
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
                                                                 "settings": scalar_settings()})
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for d in os.listdir(folder):
            if d.startswith("step_") and d != f"step_{step}":
                shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---- the loop ----

def main(argv):
    start_stage("ppo", argv)
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from rlhf.codeeval import load_problems
    from rlhf.reward import load_reward_normalization

    require_stage_output(C.SFT_DIR, "sft")
    require_stage_output(C.RM_DIR, "rm")
    check_output_dir(C.PPO_DIR)
    for name in ("PPO_MINI_BATCH_SIZE", "PPO_SAMPLES_PER_PROMPT"):
        if getattr(C, name) < 1 or C.PPO_BATCH_SIZE % getattr(C, name):
            raise UserError(f"PPO_BATCH_SIZE ({C.PPO_BATCH_SIZE}) must be a multiple of {name} ({getattr(C, name)})")
    run_dir = os.path.join(C.RUNS_DIR, "ppo")
    accelerator = Accelerator(mixed_precision="bf16" if precision() == "bf16" else "no",
                              log_with=report_to() or None, project_dir=run_dir)
    device = accelerator.device

    # ---- data (before the models: a mistake in it is reported in seconds)
    tokenizer = load_tokenizer(C.SFT_DIR)
    prompts = load_prompts(C.PPO_PROMPTS_FILE, tokenizer)
    problems = load_problems(C.EVAL_TASKS_FILE)[: C.EVAL_MAX_TASKS or None] if os.path.exists(C.EVAL_TASKS_FILE) else []
    n_tested = sum(r["problem"] is not None for r in prompts)
    # oversampling picks prompts by their test results: without tests (or their reward) it would only cost time
    oversample = C.PPO_OVERSAMPLE if n_tested and C.PPO_EXEC_WEIGHT else 1
    if accelerator.is_main_process:
        if oversample < C.PPO_OVERSAMPLE:
            print(f"PPO_OVERSAMPLE={C.PPO_OVERSAMPLE} is not used: no prompt has unit tests, or PPO_EXEC_WEIGHT is 0")
        print(f"data: {len(prompts)} prompts ({n_tested} with unit tests), {len(problems)} held-out tasks")
        if not os.path.exists(C.EVAL_TASKS_FILE):
            print(f"no held-out evaluation: EVAL_TASKS_FILE {C.EVAL_TASKS_FILE} does not exist")

    # ---- models: policy + reference from SFT, critic + reward model from RM
    rm_tokenizer = load_tokenizer(C.RM_DIR)
    norm = load_reward_normalization(C.RM_DIR)
    policy = load_causal_lm(C.SFT_DIR, dtype=torch.float32)  # trained: fp32 master weights (QLORA: 4-bit base)
    critic = AutoModelForSequenceClassification.from_pretrained(C.RM_DIR, dtype=torch.float32)
    if C.USE_LORA:
        # LoRA: the reference is the policy with its adapter disabled, the reward model the critic
        # with its adapter disabled: four roles, two networks (TRL, LLaMA-Factory, verl).
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config("CAUSAL_LM"))
        critic_cfg = lora_config("SEQ_CLS")
        critic_cfg.modules_to_save = ["score"]
        critic = get_peft_model(critic, critic_cfg)
        ref_policy, reward_model = None, None
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(C.SFT_DIR, dtype=torch_dtype()).to(device).eval()
        reward_model = AutoModelForSequenceClassification.from_pretrained(C.RM_DIR, dtype=torch_dtype()).to(device).eval()
        for frozen in (ref_policy, reward_model):
            frozen.requires_grad_(False)
    for m in (policy, critic, ref_policy, reward_model):
        if m is not None:
            disable_dropout(m)
    if C.GRADIENT_CHECKPOINTING:
        policy.gradient_checkpointing_enable()

    model = PolicyAndCritic(policy, critic)
    params = [p for p in model.parameters() if p.requires_grad]
    # the critic learns faster than the policy (OpenRLHF: critic lr ~10x the actor's); eps 1e-5: N+ details
    optimizer = torch.optim.AdamW([
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": C.PPO_LR},
        {"params": [p for p in critic.parameters() if p.requires_grad], "lr": C.PPO_CRITIC_LR},
    ], eps=1e-5)
    mini_batches = C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, C.PPO_STEPS * C.PPO_EPOCHS * mini_batches)
    if accelerator.state.deepspeed_plugin is not None:
        # no dataloader goes through prepare, so DeepSpeed cannot infer the micro-batch; and it clips
        # gradients itself (accelerator.clip_grad_norm_ is a no-op there). TRL's PPO set the same.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = C.PPO_MINI_BATCH_SIZE
        ds_config["gradient_clipping"] = C.PPO_MAX_GRAD_NORM
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    kl_ctl = KLController(C.PPO_KL_COEF, C.PPO_KL_TARGET or None, C.PPO_KL_HORIZON)
    accelerator.register_for_checkpointing(kl_ctl)

    def unwrapped():
        return accelerator.unwrap_model(model)

    def reference():  # context + model giving reference logits
        if C.USE_LORA:
            return unwrapped().policy.disable_adapter(), unwrapped().policy
        return contextlib.nullcontext(), ref_policy

    def rm():
        if C.USE_LORA:
            return unwrapped().critic.disable_adapter(), unwrapped().critic
        return contextlib.nullcontext(), reward_model

    # ---- resume
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    start, history = 0, []
    last = resume_from(ckpt_dir, **CHECKPOINT)
    if last:
        accelerator.load_state(last)
        saved = json.load(open(os.path.join(last, CHECKPOINT["marker"])))
        start, history = saved["step"], saved["history"]
    accelerator.init_trackers("ppo")

    def run_eval(step, final=False):
        """Held-out pass@1 and RM score: a subset (PPO_EVAL_TASKS) during training, all at the end."""
        result = {}
        if (accelerator.is_main_process or sharded(accelerator)) and problems:  # sharded: forwards are collectives
            ctx, rm_model = rm()
            subset = problems if final else problems[: C.PPO_EVAL_TASKS or None]
            with ctx, full_weights_for_generation(accelerator, model, with_critic=True) as policy_full:
                result = evaluate(policy_full, tokenizer, rm_model, rm_tokenizer, norm, subset, device)
        if accelerator.is_main_process and result:
            print(f"ppo eval step {step} | pass@1 {result['pass_at_1']:.3f} | rm score {result['rm_score']:.3f}")
            accelerator.log({f"ppo/eval_{k}": v for k, v in result.items()}, step=step)
        accelerator.wait_for_everyone()
        return result

    if start == 0 and (C.PPO_EVAL_EVERY or 0) > 0:
        before = run_eval(0, final=True)  # the SFT baseline, on the same tasks as the final evaluation
        if before:
            history.append({"step": 0, **{f"eval_{k}": v for k, v in before.items()}})

    # ---- train
    from tqdm.auto import tqdm

    bar = tqdm(total=C.PPO_STEPS, initial=start, desc="ppo", disable=not accelerator.is_main_process)
    t_start, episodes = time.time(), 0
    eos_ids = [tokenizer.eos_token_id]
    for step in range(start + 1, C.PPO_STEPS + 1):
        t0 = time.time()
        # prompts of this step: a function of (seed, rank, step) only, so a resumed run sees the
        # same prompts it would have seen, with no sampler state to save
        rng = random.Random(C.SEED * 1_000_003 + accelerator.process_index * 10_007 + step)
        # each prompt is sampled PPO_SAMPLES_PER_PROMPT times: answers to the same prompt that
        # pass and fail side by side are what the advantages learn from
        n_prompts = C.PPO_BATCH_SIZE // C.PPO_SAMPLES_PER_PROMPT
        picked = [prompts[rng.randrange(len(prompts))] for _ in range(n_prompts * oversample)]
        batch = [row for row in picked for _ in range(C.PPO_SAMPLES_PER_PROMPT)]

        # ---- rollout (no gradients): sample, then logprobs, reference logprobs, values, scores
        model.eval()
        with torch.no_grad():
            query, query_mask = encode_prompts(tokenizer, batch, device)
            t_gen = time.time()
            with full_weights_for_generation(accelerator, model) as policy_full:
                gen = policy_full.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=C.PPO_RESPONSE_LEN,
                                           do_sample=True, temperature=C.PPO_TEMPERATURE, top_k=0, top_p=1.0,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids)
            gen_seconds = time.time() - t_gen
            # generate stops when every row has ended: (B, T') with T' <= PPO_RESPONSE_LEN
            response = truncate_after_eos(gen[:, query.shape[1]:], eos_ids, tokenizer.pad_token_id)
            _, _, last_index = first_eos_mask(response, eos_ids)
            texts = tokenizer.batch_decode([row[: n + 1] for row, n in zip(response, last_index)], skip_special_tokens=True)
            passed = exec_rewards(batch, texts, device)  # (B,) unit-test reward, NaN without tests
            sampled = {"sampled_pass_rate": passed.nanmean(),  # of every sampled answer, before filtering
                       "mixed_groups": mixed_groups(passed, C.PPO_SAMPLES_PER_PROMPT).float().mean()}
            if oversample > 1:  # keep PPO_BATCH_SIZE responses, prompts with mixed test results first
                keep = informative_groups(passed, C.PPO_SAMPLES_PER_PROMPT, n_prompts)
                batch, texts, passed = [batch[i] for i in keep], [texts[i] for i in keep], passed[keep]
                query, query_mask, response = query[keep], query_mask[keep], response[keep]
                width = int(query_mask.sum(1).max())  # drop the columns that were padding for every kept row
                query, query_mask = query[:, -width:], query_mask[:, -width:]
                response = response[:, : int(last_index[keep].max()) + 1]
            # pad to the longest response of any process (not to PPO_RESPONSE_LEN: most answers are
            # far shorter), so every process runs the same number of identically shaped steps
            longest = accelerator.reduce(torch.tensor([response.shape[1]], device=device), "max").item()
            response = torch.nn.functional.pad(response, (0, longest - response.shape[1]),
                                               value=tokenizer.pad_token_id)  # (B, T)
            mask, ends_with_eos, last_index = first_eos_mask(response, eos_ids)  # (B, T), (B,), (B,)

            old_logp, ref_logp, values = [], [], []
            for i in range(0, C.PPO_BATCH_SIZE, C.PPO_MINI_BATCH_SIZE):
                s = slice(i, i + C.PPO_MINI_BATCH_SIZE)
                q, qm, r = query[s], query_mask[s], response[s]
                ids = torch.cat([q, r], 1)
                am = torch.cat([qm, torch.ones_like(r)], 1)
                logits, v = model(ids, am, positions(am))
                old_logp.append(logprobs_from_logits(logits[:, q.shape[1] - 1: -1], r, C.PPO_TEMPERATURE))
                values.append(v[:, q.shape[1] - 1: -1])  # V(s_t): state before response token t
                ref_ctx, ref_model = reference()
                with ref_ctx:
                    ref_logp.append(logprobs_from_logits(response_logits(ref_model, q, qm, r), r, C.PPO_TEMPERATURE))
            old_logp, ref_logp, values = torch.cat(old_logp), torch.cat(ref_logp), torch.cat(values)  # (B, T)

            rm_ctx, rm_model = rm()
            with rm_ctx:
                score, rm_score = score_responses(rm_model, rm_tokenizer, norm, batch, texts, ends_with_eos, passed, device)

            # ---- rewards and advantages
            kl = torch.where(mask, kl_estimate(old_logp, ref_logp, C.PPO_KL_ESTIMATOR), 0.0)  # (B, T)
            rewards = per_token_rewards(score, kl, mask, last_index, kl_ctl.value)  # (B, T)
            advantages, returns = gae(rewards, values, mask, C.PPO_GAMMA, C.PPO_LAM)
            advantages = masked_whiten(advantages, mask)  # Ziegler et al. 2019; N+
            kl_per_response = kl.sum(1)  # (B,)

        # ---- PPO update: PPO_EPOCHS passes over the batch in shuffled mini-batches
        t_update = time.time()
        model.train()
        stats = []
        shuffle = torch.Generator().manual_seed(C.SEED + 7919 * step + accelerator.process_index)
        for _ in range(C.PPO_EPOCHS):
            order = torch.randperm(C.PPO_BATCH_SIZE, generator=shuffle).to(device)
            for i in range(0, C.PPO_BATCH_SIZE, C.PPO_MINI_BATCH_SIZE):
                idx = order[i: i + C.PPO_MINI_BATCH_SIZE]
                q, qm, r, m = query[idx], query_mask[idx], response[idx], mask[idx]
                ids = torch.cat([q, r], 1)
                am = torch.cat([qm, torch.ones_like(r)], 1)
                logits, v = model(ids, am, positions(am))
                logits, v = logits[:, q.shape[1] - 1: -1], v[:, q.shape[1] - 1: -1]  # (B', T, V), (B', T)
                logp = logprobs_from_logits(logits, r, C.PPO_TEMPERATURE)
                pg_loss, pg_stats = policy_loss(logp, old_logp[idx], advantages[idx], m, C.PPO_CLIP)
                vf_loss, vf_stats = value_loss(v, values[idx], returns[idx], m, C.PPO_VF_CLIP)
                loss = pg_loss + C.PPO_VF_COEF * vf_loss
                if not torch.isfinite(loss):
                    raise diverged("ppo", step, f"policy loss {pg_loss.item()}, value loss {vf_loss.item()}",
                                   ckpt_dir, "PPO_LR (or PPO_CRITIC_LR, or check the reward scale)", **CHECKPOINT)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, C.PPO_MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits, C.PPO_TEMPERATURE), m)
                stats.append({"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": entropy,
                              **pg_stats, **vf_stats})

        update_seconds = time.time() - t_update
        # ---- metrics: means over this process's batch, then over processes
        tested = ~torch.isnan(passed)
        local = {
            "score": score.mean(), "rm_score": rm_score.mean(), **sampled,
            "test_pass_rate": passed[tested].mean() if tested.any() else torch.tensor(float("nan"), device=device),
            "kl": kl_per_response.mean(),
            "non_score_reward": (rewards.sum(1) - score).mean(),
            "reward_mean": rewards.sum(1).mean(),
            "response_length": mask.sum(1).float().mean(), "eos_rate": ends_with_eos.float().mean(),
            **{k: torch.stack([s_[k] for s_ in stats]).float().mean() for k in stats[0]},
        }
        metrics = {k: accelerator.reduce(v.detach().float().reshape(1).to(device), "mean").item() for k, v in local.items()}
        kl_ctl.update(metrics["kl"], C.PPO_BATCH_SIZE * accelerator.num_processes)
        metrics.update(kl_coef=kl_ctl.value, lr=scheduler.get_last_lr()[0], seconds=time.time() - t0,
                       generate_seconds=gen_seconds, update_seconds=update_seconds)  # this process's (bench/)
        episodes += C.PPO_BATCH_SIZE * accelerator.num_processes
        accelerator.log({f"ppo/{k}": v for k, v in metrics.items()}, step=step)
        if accelerator.is_main_process:
            bar.update(1)
            bar.write(f"ppo step {step}/{C.PPO_STEPS} | score {metrics['score']:.3f} | pass {metrics['test_pass_rate']:.2f} "
                      f"| kl {metrics['kl']:.3f} | entropy {metrics['entropy']:.2f} | len {metrics['response_length']:.0f} "
                      f"| eos {metrics['eos_rate']:.2f} | clip {metrics['clipfrac']:.2f} | {metrics['seconds']:.1f} s")
        row = {"step": step, **metrics}
        if C.PPO_EVAL_EVERY and step % C.PPO_EVAL_EVERY == 0 and step != C.PPO_STEPS:
            row.update({f"eval_{k}": v for k, v in run_eval(step).items()})
        history.append(row)
        # every PPO_SAVE_EVERY iterations and after the last one: a kill in the final evaluation redoes no training
        if C.PPO_SAVE_EVERY and (step % C.PPO_SAVE_EVERY == 0 or step == C.PPO_STEPS):
            save_checkpoint(accelerator, ckpt_dir, step, history)
    bar.close()
    seconds = time.time() - t_start

    # ---- final evaluation and save ./ppo_model
    final = run_eval(C.PPO_STEPS, final=True)
    policy_out = plain_policy(accelerator, model, torch.float32)  # every process: gathers shards
    if accelerator.is_main_process:
        trained = [h for h in history if "kl" in h]
        last_rows = trained[-5:] or [{}]
        metrics = {
            **final,
            "kl": sum(h.get("kl", 0.0) for h in last_rows) / len(last_rows),
            "reward_mean": sum(h.get("reward_mean", 0.0) for h in last_rows) / len(last_rows),
            "response_length": sum(h.get("response_length", 0.0) for h in last_rows) / len(last_rows),
            "train_seconds": seconds,
            "episodes_per_second": episodes / seconds if episodes else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "history": history,
        }

        def save(tmp):
            policy_out.save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
            write_json(os.path.join(tmp, "eval_results.json"), {k: v for k, v in metrics.items() if k != "history"})

        save_stage_output(C.PPO_DIR, "ppo", save, metrics)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "history"}
        print(f"ppo done | {shown} | saved {C.PPO_DIR}")
    accelerator.end_training()


if __name__ == "__main__":
    run_stage(main)
