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
    accelerate launch --config_file accelerate_configs/ddp.yaml train_ppo.py  # several GPUs (docs/DISTRIBUTED.md: DeepSpeed, FSDP)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_ppo.py  # 2 CPU processes

Any constant of config.py can be overridden as --NAME=value. Interrupted runs resume from the
last checkpoint (RESUME, PPO_SAVE_EVERY).
"""

import contextlib
import json
import os
import resource
import shutil
import time

import torch

import config as C
from rlhf.checkpoints import diverged, resume_from
from rlhf.codeeval import load_problems, sampled_pass_at_k, seed_prompt_passes
from rlhf.common import (
    check_lora_targets, end_of_turn_ids, head_scales_logits, launched_with_sharded_weights, load_causal_lm, load_tokenizer,
    lora_config, mixed_precision, precision, prompt_rng, report_to, run_stage, start_stage, stop_at_end_of_turn, torch_dtype,
)
from rlhf.data import load_rows, row_where, template_lengths
from rlhf.engines import full_weights_for_generation, plain_policy, shard_frozen_model, sharded, whole_models_loaded
from rlhf.generation import generate, hf_model, positions
from rlhf.handoff import check_output_dir, disk_full_is_an_error, require_stage_output, save_stage, write_json, write_jsonl
from rlhf.reward import RewardMix, exec_rewards, reward_function, sequence_scores
from rlhf.ppo_math import (
    compute_advantages, first_eos_mask, gae, imitation_rows, informative_groups, kl_estimate,
    KLController, length_grouped_order, logprobs_and_entropy, logprobs_from_logits, loss_normalizers, masked_total,
    mixed_groups, policy_loss, policy_rows, self_imitation_loss, truncate_after_eos, value_loss,
)
from rlhf.settings import UserError, scalar_settings


# ---- models ----

class PolicyAndCritic(torch.nn.Module):
    """Policy and critic (None with a critic-free estimator) in one module, so accelerate (DDP,
    DeepSpeed, FSDP) prepares, clips and checkpoints them together with one optimizer (as TRL's
    PolicyAndValueWrapper)."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic
        # the decoder block classes: FSDP's transformer-based wrap (accelerate) shards each block apart
        self._no_split_modules = sorted({*(getattr(policy, "_no_split_modules", None) or []),
                                         *(getattr(critic, "_no_split_modules", None) or [])})

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, keep=None):
        """(logits, values (B, L) or None): the policy's logits of the last logits_to_keep positions,
        or with `keep` (B, T) only those of its True positions (n, V) (logits_for)."""
        logits = logits_for(self.policy, input_ids, attention_mask, position_ids, logits_to_keep, keep)
        if self.critic is None:
            return logits, None
        return logits, token_values(self.critic, input_ids, attention_mask, position_ids)


def head_apart(model):
    """The transformers model whose backbone and LM head can be called one after the other, or
    None: under ZeRO-3/FSDP a sharded module's parameters are gathered in its own (or its root's)
    forward, and a head that scales or caps its logits is more than the linear layer."""
    from transformers import PreTrainedModel

    base = hf_model(model)  # a DeepSpeed engine (PPO_SHARD_FROZEN_MODELS) is none: its own forward is used
    if launched_with_sharded_weights() or not isinstance(base, PreTrainedModel) or base.get_output_embeddings() is None:
        return None
    return None if head_scales_logits(base) else base


def logits_for(model, input_ids, attention_mask, position_ids, logits_to_keep, keep=None):
    """A causal LM's logits: (B, logits_to_keep, V) as its forward gives them, or with `keep`
    (B, T) the (n, V) logits that predict its n True tokens among the last T (position t predicts
    token t + 1). Then only those positions go through the LM head: the padding after each
    response's end, a large share of a mini-batch's columns, never does."""
    base = head_apart(model) if keep is not None else None
    if base is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=logits_to_keep).logits
        return logits if keep is None else logits[:, -keep.shape[1] - 1:-1][keep]
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return base.get_output_embeddings()(hidden[:, -keep.shape[1] - 1:-1][keep])


def token_values(critic, input_ids, attention_mask, position_ids):
    """Per-token values (B, L): the reward model's scalar head applied at every position instead
    of only the last one (critic initialised from the RM: DeepSpeed-Chat, OpenRLHF, N+)."""
    base = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return critic.score(hidden).squeeze(-1).float()  # (B, L); peft routes `score` to its trained copy


def zero_value_head(critic):
    """Start the critic at V = 0 everywhere. Its head comes from the RM, whose raw scores (std 2.6 on
    the embedded default, and never trained on answer prefixes) are on another scale than the returns
    built from normalised scores; N+ subtracts the RM bias, OpenRLHF normalises the critic's output.
    With LoRA only the trained copy of the head is zeroed: the original stays the reward model's."""
    head = critic.score
    head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
    params = list(head.parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned it at load: gather, zero, re-partition
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered, torch.no_grad():
        for p in params:
            p.zero_()


def disable_dropout(model):
    """Dropout off in every model during RL: with it the ratio is not 1 at the first update and
    the KL is noise (N+ implementation details; TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def response_forward(model, query, query_mask, response, keep=None):
    """One forward over prompt + response -> (logits (B, T, V) that predict each response token,
    values (B, T) of the state before each response token, or None when `model` has no critic).
    `model` is the (prepared) PolicyAndCritic or a plain causal LM (the reference). Only the last
    T + 1 positions go through the LM head (logits_to_keep): prompt logits would be thrown away.
    With `keep` (B, T), the response's valid tokens: logits (n, V) of those n tokens only."""
    T = response.shape[1]
    ids = torch.cat([query, response], 1)  # (B, P + T)
    mask = torch.cat([query_mask, torch.ones_like(response)], 1)
    if not isinstance(getattr(model, "module", model), PolicyAndCritic):  # the reference: a causal LM
        logits = logits_for(model, ids, mask, positions(mask), T + 1, keep)
        return (logits[:, :-1] if keep is None else logits), None
    # through the prepared module's own forward (DDP synchronises gradients there)
    logits, values = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=T + 1,
                           **({} if keep is None else {"keep": keep}))
    # position P-1+t predicts response token t; V(s_t) is read at the same position
    return (logits[:, :-1] if keep is None else logits), None if values is None else values[:, -T - 1:-1]


def rollout_values(accelerator, model, query, query_mask, response):
    """The critic's values (B, T) of the state before each response token, without the policy's
    forward (no gradients: the prepared wrapper's forward, which DDP needs to synchronise
    gradients, is not needed). Used when the sampler gave the old logprobs, which happens only
    where the whole weights are on every process (not ZeRO-3/FSDP: generate() there)."""
    T = response.shape[1]
    ids = torch.cat([query, response], 1)  # (B, P + T)
    mask = torch.cat([query_mask, torch.ones_like(response)], 1)
    critic = accelerator.unwrap_model(model).critic
    return token_values(critic, ids, mask, positions(mask))[:, -T - 1:-1]


def valid_logprobs(logits, response, keep, with_entropy=False):
    """Logprobs (B, T) of the response tokens from response_forward(..., keep=keep)'s (n, V)
    logits, 0 where keep is False; with_entropy: (logprobs, entropy (n,) of the n valid tokens'
    distributions, no gradient)."""
    if not with_entropy:
        logp = logprobs_from_logits(logits, response[keep], C.PPO_TEMPERATURE)  # (n,)
        return logp.new_zeros(keep.shape).masked_scatter(keep, logp)
    logp, entropy = logprobs_and_entropy(logits, response[keep], C.PPO_TEMPERATURE)
    return logp.new_zeros(keep.shape).masked_scatter(keep, logp), entropy


def without_padding_columns(query, query_mask, response, mask):
    """A mini-batch cut to the columns some row uses: prompts are left-padded (leading columns),
    responses padded after their EOS (trailing). Every loss and statistic is a masked mean, so
    the figures are the same with fewer positions through the network. Returns (query,
    query_mask, response, T') with T' the longest valid response of the mini-batch."""
    start = int((query_mask.cumsum(1) == 0).all(0).sum())  # columns that are padding in every prompt
    T = max(1, int(mask.sum(1).max()))
    return query[:, start:], query_mask[:, start:], response[:, :T], T


@contextlib.contextmanager
def frozen(accelerator, model, copy, host):
    """The frozen reference ("policy") or reward model ("critic"): its own `copy` when it has one,
    else (LoRA) that network of the prepared model with its adapter disabled: four roles, two
    networks (TRL, LLaMA-Factory, verl)."""
    if copy is not None:
        yield copy
        return
    network = getattr(accelerator.unwrap_model(model), host)
    with network.disable_adapter():
        yield network


def sample(policy, query, query_mask, eos_ids, pad_id):
    """(responses (B, T), their logprobs (B, T) or None), T <= PPO_RESPONSE_LEN, sampled from plain
    softmax(logits / T): the distribution every logprob of the loop assumes (no top-k, top-p or
    repetition penalty, whatever the checkpoint's generation_config says). Rows that have ended
    leave the batch (rlhf.generation): generate() would keep computing them to the longest
    response. The logprobs are the sampler's own: PPO's "old" logprobs without a second forward
    over the answers, as TRL's PPOTrainer takes them from generate()'s scores (trl 1.10,
    experimental/ppo/ppo_trainer.py). Only in fp32, where the cached decoding and a whole forward
    agree to float rounding (tests/test_generation.py); in bf16 or fp16 they round apart, so there
    the loop reads the answers again (None)."""
    response, logp = generate(policy, query, query_mask, C.PPO_RESPONSE_LEN, eos_ids, pad_id,
                              temperature=C.PPO_TEMPERATURE, logprobs=True)
    return response, logp if precision() == "fp32" else None


# ---- data ----

def load_prompts(path, tokenizer):
    """PPO prompts: {"prompt": text or messages, ...}, or task rows with unit tests in any format
    (the project's, HumanEval, MBPP, APPS/TACO, CodeContests: rlhf.codeeval), which get an
    execution reward and ask what their format asks."""
    from rlhf.codeeval import prompt_and_problem

    rows = []
    for i, row in enumerate(load_rows(path)):
        messages, problem = prompt_and_problem(row, row_where(path, row, i), str(i))  # tests checked here
        rows.append({"messages": messages, "problem": problem})
    limit = C.MAX_LEN - C.PPO_RESPONSE_LEN
    lengths = template_lengths(tokenizer, [r["messages"] for r in rows], path, add_generation_prompt=True)
    kept = [r for r, n in zip(rows, lengths) if n <= limit]
    if not kept:
        raise UserError(f"{path}: every prompt is longer than MAX_LEN - PPO_RESPONSE_LEN = {limit} tokens")
    if len(kept) < len(rows):
        print(f"dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {limit} tokens")
    return kept


def step_prompts(prompts, step, rank, count):
    """The `count` prompts of one iteration on one process, each repeated PPO_SAMPLES_PER_PROMPT
    times (answers that pass and fail side by side are what the advantages learn from). A function
    of (seed, rank, step) only: a resumed run sees the prompts it would have seen, no sampler state."""
    rng = prompt_rng(C.SEED, rank, step)
    picked = [prompts[rng.randrange(len(prompts))] for _ in range(count)]
    return [row for row in picked for _ in range(C.PPO_SAMPLES_PER_PROMPT)]


def encode_prompts(tokenizer, batch, device):
    texts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in batch]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def keep_informative(roll, n_prompts):
    """Keep n_prompts of the oversampled prompts, those whose answers disagree in the tests first
    (informative_groups), and every per-answer field of the rollout `roll` with them; then drop the
    columns that were padding for every kept row."""
    keep = informative_groups(roll["passed"], C.PPO_SAMPLES_PER_PROMPT, n_prompts)
    for key in ("batch", "texts"):
        roll[key] = [roll[key][i] for i in keep]
    for key in ("passed", "query", "query_mask", "response", "last_index", "sampled_logp"):
        roll[key] = None if roll.get(key) is None else roll[key][keep]
    width = int(roll["query_mask"].sum(1).max())
    roll["query"], roll["query_mask"] = roll["query"][:, -width:], roll["query_mask"][:, -width:]
    answer_width = int(roll["last_index"].max()) + 1
    roll["response"] = roll["response"][:, :answer_width]
    if roll.get("sampled_logp") is not None:
        roll["sampled_logp"] = roll["sampled_logp"][:, :answer_width]
    return roll


# ---- evaluation, checkpoints ----

def evaluate(policy, tokenizer, rm, rm_tokenizer, norm, problems, device):
    """Greedy pass@1 on held-out tasks (sandboxed) and the mean normalised RM score of the answers;
    and each task's answer and verdict (rows as the SFT stage's eval_results.jsonl)."""
    from rlhf.codeeval import completion_for, generate_completions, pass_at_1_metrics, score_samples
    from rlhf.reward import normalize_rewards, score_responses

    texts = [t[0] for t in generate_completions(policy, tokenizer, [p.messages() for p in problems],
                                                C.GEN_MAX_NEW_TOKENS, progress=False)]
    summary, answers = score_samples(problems, [{"task_id": p.task_id, "completion": completion_for(p, t), "raw": t}
                                                for p, t in zip(problems, texts)], ks=(1,), progress=False)
    scores = score_responses(rm, rm_tokenizer, [p.messages() for p in problems], texts, device=device)
    return {**pass_at_1_metrics(summary), "rm_score": normalize_rewards(scores.float().mean().item(), norm)}, answers


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


# ---- set-up: settings, data, models, optimizer, resume ----

def check_settings():
    """Settings that only make sense together: one line each, before any model is loaded."""
    for name in ("PPO_MINI_BATCH_SIZE", "PPO_SAMPLES_PER_PROMPT"):
        if getattr(C, name) < 1 or C.PPO_BATCH_SIZE % getattr(C, name):
            raise UserError(f"PPO_BATCH_SIZE ({C.PPO_BATCH_SIZE}) must be a multiple of {name} ({getattr(C, name)})")
    if C.PPO_ADVANTAGE in ("grpo", "dr_grpo", "rloo") and C.PPO_SAMPLES_PER_PROMPT < 2:
        raise UserError(f"PPO_ADVANTAGE={C.PPO_ADVANTAGE} compares the answers to one prompt: set PPO_SAMPLES_PER_PROMPT >= 2")
    if C.PPO_KL_LOSS and C.PPO_KL_ESTIMATOR == "k1":
        raise UserError("PPO_KL_LOSS needs PPO_KL_ESTIMATOR k2 or k3: k1 as a loss term has no gradient in expectation")


def setup(accelerator):
    """Data, models, optimizer and scheduler (prepared), KL controller, and the resume point.
    Returns a namespace; the loop in main() reads it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from rlhf.reward import load_reward_model, load_reward_normalization

    s = SimpleNamespace(critic=C.PPO_ADVANTAGE == "gae")
    s.reward = RewardMix(rm_weight=C.PPO_RM_WEIGHT, exec_weight=C.PPO_EXEC_WEIGHT, exec_reward=C.PPO_EXEC_REWARD,
                         rm_on_tested=C.PPO_RM_ON_TESTED,
                         reward_fn=reward_function(C.PPO_REWARD_FN) if C.PPO_REWARD_FN else None,
                         missing_eos_penalty=C.PPO_MISSING_EOS_PENALTY if C.PPO_PENALIZE_MISSING_EOS else None)
    # data (before the models: a mistake in it is reported in seconds)
    s.tokenizer = load_tokenizer(C.SFT_DIR)
    s.prompts = load_prompts(C.PPO_PROMPTS_FILE, s.tokenizer)
    s.problems = load_problems(C.EVAL_TASKS_FILE)[: C.EVAL_MAX_TASKS or None] if C.EVAL_TASKS_FILE else []
    s.seed_problems = load_problems(C.SEED_PROMPTS_FILE) if C.SEED_PROMPT_SAMPLES and C.SEED_PROMPTS_FILE else []
    n_tested = sum(r["problem"] is not None for r in s.prompts)
    # oversampling picks prompts by their test results: without tests (or their reward) it would only cost time
    s.oversample = C.PPO_OVERSAMPLE if n_tested and C.PPO_EXEC_WEIGHT and C.PPO_SAMPLES_PER_PROMPT > 1 else 1
    if accelerator.is_main_process:
        if C.PPO_SAMPLES_PER_PROMPT == 1:  # no group of answers to one prompt whose test results could differ
            print("PPO_SAMPLES_PER_PROMPT=1: every answer trains the policy against the "
                  f"{'critic' if s.critic else 'batch mean'}; PPO_OVERSAMPLE and PPO_SIL_COEF (they compare "
                  "the answers to one prompt) are not used")
        elif s.oversample < C.PPO_OVERSAMPLE:
            print(f"PPO_OVERSAMPLE={C.PPO_OVERSAMPLE} is not used: no prompt has unit tests, or PPO_EXEC_WEIGHT is 0")
        print(f"data: {len(s.prompts)} prompts ({n_tested} with unit tests), {len(s.problems)} held-out tasks | "
              f"advantages: {C.PPO_ADVANTAGE}")
        if not C.EVAL_TASKS_FILE:
            print("no held-out evaluation: EVAL_TASKS_FILE is empty")

    # models: policy + reference from SFT; reward model from RM, and the critic (gae only) too
    s.rm_tokenizer, s.norm = load_tokenizer(C.RM_DIR), load_reward_normalization(C.RM_DIR)
    policy = load_causal_lm(C.SFT_DIR, dtype=torch.float32)  # trained: fp32 master weights (QLORA: 4-bit base)
    check_lora_targets(policy)
    s.eos_ids = end_of_turn_ids(s.tokenizer, policy)  # where an answer ends: sampling, masks, the missing-EOS penalty
    critic = load_reward_model(C.RM_DIR, dtype=torch.float32) if s.critic else None
    s.ref_policy = s.reward_model = None
    if C.USE_LORA:  # the reference is the policy with its adapter off; the RM is the critic's, when there is one
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config("CAUSAL_LM"))
        if critic is not None:  # its head `score` trained in full (modules_to_save)
            critic = get_peft_model(critic, lora_config("SEQ_CLS"))
    # frozen copies: whole on every process, or (PPO_SHARD_FROZEN_MODELS, ZeRO-3) partitioned as they load
    # and given inference engines after prepare
    with contextlib.nullcontext() if C.PPO_SHARD_FROZEN_MODELS else whole_models_loaded(accelerator):
        if not C.USE_LORA:  # in the policy's own precision (cast after prepare): at step 0 the KL is 0, not rounding
            s.ref_policy = AutoModelForCausalLM.from_pretrained(C.SFT_DIR, dtype=torch.float32).to(accelerator.device)
        if critic is None or not C.USE_LORA:
            s.reward_model = load_reward_model(C.RM_DIR, dtype=torch_dtype()).to(accelerator.device)
    for m in (policy, critic, s.ref_policy, s.reward_model):
        if m is not None:
            disable_dropout(m)
    for m in (s.ref_policy, s.reward_model):
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
    # fused: one kernel over all tensors (the embedded default on CPU: 1.4 ms a step instead of 9 ms,
    # bench/README.md); engines that shard or wrap the parameters keep torch's default
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
    s.model, s.optimizer, s.scheduler = accelerator.prepare(PolicyAndCritic(policy, critic), optimizer, scheduler)
    if s.ref_policy is not None:  # DeepSpeed holds the policy in bf16/fp16; elsewhere fp32 master weights, under autocast
        s.ref_policy.to(next(accelerator.unwrap_model(s.model).policy.parameters()).dtype)
    if C.PPO_SHARD_FROZEN_MODELS:  # after prepare: the DeepSpeed config is complete
        s.ref_policy, s.reward_model = (None if m is None else shard_frozen_model(accelerator, m)
                                        for m in (s.ref_policy, s.reward_model))
    # the RM's forwards are collectives under ZeRO-3/FSDP: then every process reads all its answers
    s.rm_every_row = sharded(accelerator) and (C.PPO_RM_ON_TESTED or n_tested < len(s.prompts))
    s.kl_ctl = KLController(C.PPO_KL_COEF, C.PPO_KL_TARGET or None, C.PPO_KL_HORIZON)
    accelerator.register_for_checkpointing(s.kl_ctl)

    s.ckpt_dir, s.start, s.history = os.path.join(C.RUNS_DIR, "ppo", "checkpoints"), 0, []
    last = resume_from(s.ckpt_dir, **CHECKPOINT)
    if last:
        accelerator.load_state(last)
        saved = json.load(open(os.path.join(last, CHECKPOINT["marker"])))
        s.start, s.history = saved["step"], saved["history"]
    return s


def optimizer_step(accelerator, model, optimizer, scheduler, loss):
    """Backward, clip, step. Clips the parameters of the PREPARED model: FSDP2 replaces the parameter
    objects in prepare, so a list collected before it would hold tensors that never get a gradient."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), C.PPO_MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


# ---- the loop ----

def main(argv):
    start_stage("ppo", argv)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    require_stage_output(C.SFT_DIR, "sft")
    require_stage_output(C.RM_DIR, "rm")
    check_output_dir(C.PPO_DIR)
    check_settings()
    # step_scheduler_with_optimizer=False: one scheduler step per optimizer step; otherwise accelerate
    # steps a prepared scheduler once per process each time (made for a dataloader it split), and on
    # N processes the learning rate would reach 0 after 1/N of the run
    accelerator = Accelerator(mixed_precision=mixed_precision(),
                              step_scheduler_with_optimizer=False,
                              log_with=report_to() or None, project_dir=os.path.join(C.RUNS_DIR, "ppo"))
    device, s = accelerator.device, setup(accelerator)
    model, tokenizer, kl_ctl, history = s.model, s.tokenizer, s.kl_ctl, s.history
    accelerator.init_trackers("ppo")

    def run_eval(step, final=False):
        """Held-out pass@1 and RM score: a subset (PPO_EVAL_TASKS) during training, all at the end
        (and pass@EVAL_SAMPLES of sampled answers after the last iteration)."""
        result = {}
        if (accelerator.is_main_process or sharded(accelerator)) and s.problems:  # sharded: forwards are collectives
            subset = s.problems if final else s.problems[: C.PPO_EVAL_TASKS or None]
            with frozen(accelerator, model, s.reward_model, "critic") as rm, accelerator.autocast(), \
                    full_weights_for_generation(accelerator, model, with_critic=s.critic) as policy_full:
                result, answers = evaluate(policy_full, tokenizer, rm, s.rm_tokenizer, s.norm, subset, device)
                if final:
                    final_answers[:] = answers
                if final and step == C.PPO_STEPS and C.EVAL_SAMPLES:  # the trained policy's pass@k, as SFT reports it
                    result.update(sampled_pass_at_k(policy_full, tokenizer, subset, C.EVAL_SAMPLES, C.GEN_MAX_NEW_TOKENS,
                                                    progress=False))
                if final and step == C.PPO_STEPS:  # the natural prompts, asked as a user asks
                    result.update(seed_prompt_passes(policy_full, tokenizer, s.seed_problems, C.SEED_PROMPT_SAMPLES,
                                                     C.GEN_MAX_NEW_TOKENS, progress=False))
        if accelerator.is_main_process and result:
            print(f"ppo eval step {step} | pass@1 {result['pass_at_1']:.3f} | rm score {result['rm_score']:.3f}")
            accelerator.log({f"ppo/eval_{k}": v for k, v in result.items() if not isinstance(v, dict)}, step=step)
        accelerator.wait_for_everyone()
        return result

    final_answers = []  # the final evaluation's answer and verdict per task (eval_results.jsonl)
    if s.start == 0 and (C.PPO_EVAL_EVERY or 0) > 0:
        before = run_eval(0, final=True)  # the SFT baseline, on the same tasks as the final evaluation
        if before:
            history.append({"step": 0, **{f"eval_{k}": v for k, v in before.items()}})

    bar = tqdm(total=C.PPO_STEPS, initial=s.start, desc="ppo", disable=not accelerator.is_main_process)
    t_start, episodes, eos_ids = time.time(), 0, s.eos_ids
    n_prompts = C.PPO_BATCH_SIZE // C.PPO_SAMPLES_PER_PROMPT
    for step in range(s.start + 1, C.PPO_STEPS + 1):
        t0 = time.time()
        # 1. rollout (no gradients): sample oversampled prompts, run their tests, keep the informative ones
        model.eval()
        with torch.no_grad(), accelerator.autocast():  # every forward of the rollout in the update's precision
            batch = step_prompts(s.prompts, step, accelerator.process_index, n_prompts * s.oversample)
            query, query_mask = encode_prompts(tokenizer, batch, device)
            t_gen = time.time()
            with full_weights_for_generation(accelerator, model) as policy_full:
                response, sampled_logp = sample(policy_full, query, query_mask, eos_ids, tokenizer.pad_token_id)
            gen_seconds = time.time() - t_gen
            # sampling stops when every row has ended: (B, T') with T' <= PPO_RESPONSE_LEN
            response = truncate_after_eos(response, eos_ids, tokenizer.pad_token_id)
            _, _, last_index = first_eos_mask(response, eos_ids)
            texts = tokenizer.batch_decode([row[: n + 1] for row, n in zip(response, last_index)], skip_special_tokens=True)
            roll = dict(batch=batch, texts=texts, passed=exec_rewards(batch, texts, device, s.reward), query=query,
                        query_mask=query_mask, response=response, last_index=last_index,
                        sampled_logp=sampled_logp)  # passed (B,): NaN without tests
            mixed = mixed_groups(roll["passed"], C.PPO_SAMPLES_PER_PROMPT)
            sampled = {"sampled_pass_rate": roll["passed"].nanmean(), "mixed_groups": mixed.float().mean()}
            if s.oversample > 1:
                roll = keep_informative(roll, n_prompts)
            batch, texts, passed, query, query_mask = (roll[k] for k in ("batch", "texts", "passed", "query", "query_mask"))
            # pad to the longest response of any process (not to PPO_RESPONSE_LEN: most answers are
            # far shorter), so every process runs the same number of identically shaped steps
            longest = accelerator.reduce(torch.tensor([roll["response"].shape[1]], device=device), "max").item()
            response = torch.nn.functional.pad(roll["response"], (0, longest - roll["response"].shape[1]),
                                               value=tokenizer.pad_token_id)  # (B, T)
            mask, ends_with_eos, last_index = first_eos_mask(response, eos_ids)  # (B, T), (B,), (B,)
            sampled_logp = roll["sampled_logp"]
            if sampled_logp is not None:  # the sampler's logprobs, to the same width; 0 after each response
                sampled_logp = torch.nn.functional.pad(sampled_logp, (0, response.shape[1] - sampled_logp.shape[1]))
                sampled_logp = torch.where(mask, sampled_logp, 0.0)

            # 2. logprobs of the sampled tokens now ("old") and under the reference, values; rows of
            # like length share a forward (less padding), results back in rollout order
            old_logp, ref_logp, values = [], [], []
            back = lambda x: torch.nn.functional.pad(x, (0, response.shape[1] - x.shape[1]))  # noqa: E731  to (B', T)
            lengths = query_mask.sum(1) + mask.sum(1)  # (B,) tokens of each row
            by_length = torch.argsort(lengths.cpu(), stable=True).to(device)
            for i in range(0, C.PPO_BATCH_SIZE, C.PPO_MINI_BATCH_SIZE):
                rows = by_length[i: i + C.PPO_MINI_BATCH_SIZE]
                q, qm, r, T = without_padding_columns(query[rows], query_mask[rows], response[rows], mask[rows])
                m = mask[rows, :T]  # logits only where a response token is
                if sampled_logp is None:
                    logits, v = response_forward(model, q, qm, r, keep=m)
                    old_logp.append(back(valid_logprobs(logits, r, m)))
                else:  # the sampler's logprobs; the critic (gae) still reads the answers for its values
                    old_logp.append(sampled_logp[rows])
                    v = rollout_values(accelerator, model, q, qm, r) if s.critic else None
                values.append(None if v is None else back(v))
                with frozen(accelerator, model, s.ref_policy, "policy") as ref:
                    ref_logp.append(back(valid_logprobs(response_forward(ref, q, qm, r, keep=m)[0], r, m)))
            unsort = torch.argsort(by_length)
            old_logp, ref_logp = torch.cat(old_logp)[unsort], torch.cat(ref_logp)[unsort]  # (B, T), 0 after each response
            values = torch.cat(values)[unsort] if s.critic else None

            # 3. scores, KL, advantages; answers of all-pass / all-fail groups do not train the policy
            with frozen(accelerator, model, s.reward_model, "critic") as rm:
                score, rm_score = sequence_scores(rm, s.rm_tokenizer, s.norm, batch, texts, ends_with_eos, passed, device,
                                                  s.reward, every_row=s.rm_every_row)
            trains_policy = policy_rows(passed, C.PPO_SAMPLES_PER_PROMPT)  # (B,)
            imitate = imitation_rows(passed, ends_with_eos, trains_policy, C.PPO_SAMPLES_PER_PROMPT)  # (B,) PPO_SIL_COEF
            kl = torch.where(mask, kl_estimate(old_logp, ref_logp, C.PPO_KL_ESTIMATOR), 0.0)  # (B, T)
            kl_reward_coef = 0.0 if C.PPO_KL_LOSS else kl_ctl.value  # KL paid in the reward, or as a loss term below
            advantages, returns = compute_advantages(C.PPO_ADVANTAGE, score, kl, values, mask, last_index, kl_reward_coef,
                                                     C.PPO_SAMPLES_PER_PROMPT, trains_policy, C.PPO_GAMMA, C.PPO_LAM)
            # each loss term's denominator (PPO_LOSS_NORM): the tokens it trains on in the batch, or None (per mini-batch)
            norm = dict.fromkeys(("policy", "value", "sil", "kl"))
            if C.PPO_LOSS_NORM == "batch":
                norm = loss_normalizers({"policy": mask & trains_policy.unsqueeze(1), "value": mask,
                                         "sil": mask & imitate.unsqueeze(1), "kl": mask},
                                        C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE, accelerator.num_processes,
                                        total=lambda n: accelerator.reduce(n.to(device), "sum"))

        # 4. update: PPO_EPOCHS passes over the batch in shuffled mini-batches
        t_update = time.time()
        model.train()
        stats = []
        shuffle = torch.Generator().manual_seed(C.SEED + 7919 * step + accelerator.process_index)
        for _ in range(C.PPO_EPOCHS):
            order = length_grouped_order(lengths, C.PPO_MINI_BATCH_SIZE, shuffle).to(device)
            for i in range(0, C.PPO_BATCH_SIZE, C.PPO_MINI_BATCH_SIZE):
                idx = order[i: i + C.PPO_MINI_BATCH_SIZE]
                q, qm, r, T = without_padding_columns(query[idx], query_mask[idx], response[idx], mask[idx])
                m = mask[idx, :T]
                logits, v = response_forward(model, q, qm, r, keep=m)  # (n, V) at the n valid tokens, (B', T)
                logp, entropy = valid_logprobs(logits, r, m, with_entropy=True)  # (B', T), 0 elsewhere; (n,)
                loss, step_stats = policy_loss(logp, old_logp[idx, :T], advantages[idx, :T], m, C.PPO_CLIP, norm["policy"])
                step_stats["policy_loss"] = loss.detach()
                if s.critic:
                    vf_loss, vf_stats = value_loss(v, values[idx, :T], returns[idx, :T], m, C.PPO_VF_CLIP, norm["value"])
                    loss = loss + C.PPO_VF_COEF * vf_loss
                    step_stats.update(value_loss=vf_loss.detach(), **vf_stats)
                if C.PPO_SIL_COEF:  # self-imitation: the passing answers of mixed groups, unclipped
                    sil_loss = self_imitation_loss(logp, m, imitate[idx], norm["sil"])
                    loss = loss + C.PPO_SIL_COEF * sil_loss
                    step_stats["sil_loss"] = sil_loss.detach()
                if C.PPO_KL_LOSS:  # GRPO's KL term (DeepSeekMath): in the loss, per token, instead of the reward
                    kl_loss = masked_total(kl_estimate(logp, ref_logp[idx, :T], C.PPO_KL_ESTIMATOR), m, norm["kl"])
                    loss = loss + kl_ctl.value * kl_loss
                    step_stats["kl_loss"] = kl_loss.detach()
                if not torch.isfinite(loss):
                    raise diverged("ppo", step, f"loss {loss.item()} ({ {k: float(v) for k, v in step_stats.items()} })",
                                   s.ckpt_dir, "PPO_LR (or PPO_CRITIC_LR, or check the reward scale)", **CHECKPOINT)
                lr = s.optimizer.param_groups[0]["lr"]  # the policy's rate in this update (logged: its last)
                optimizer_step(accelerator, model, s.optimizer, s.scheduler, loss)
                step_stats["entropy"] = entropy.mean()  # the n valid tokens
                stats.append(step_stats)
        update_seconds = time.time() - t_update

        # 5. metrics: means over this process's batch, then over processes
        tested = ~torch.isnan(passed)
        nan = torch.tensor(float("nan"), device=device)
        kl_per_response = kl.sum(1)  # (B,)
        local = {
            "score": score.mean(), "rm_score": rm_score.nanmean(), **sampled,
            "test_pass_rate": passed[tested].mean() if tested.any() else nan,
            "trained_share": trains_policy.float().mean(),
            "kl": kl_per_response.mean(), "non_score_reward": -kl_ctl.value * kl_per_response.mean(),
            "response_length": mask.sum(1).float().mean(), "eos_rate": ends_with_eos.float().mean(),
            **{k: torch.stack([s_[k] for s_ in stats]).float().mean() for k in stats[0]},
        }
        metrics = {k: accelerator.reduce(v.detach().float().reshape(1).to(device), "mean").item() for k, v in local.items()}
        kl_ctl.update(metrics["kl"], C.PPO_BATCH_SIZE * accelerator.num_processes)
        metrics.update(reward_mean=metrics["score"] + metrics["non_score_reward"], kl_coef=kl_ctl.value,
                       lr=lr, seconds=time.time() - t0,
                       generate_seconds=gen_seconds, update_seconds=update_seconds)  # this process's (bench/)
        episodes += C.PPO_BATCH_SIZE * accelerator.num_processes
        accelerator.log({f"ppo/{k}": v for k, v in metrics.items()}, step=step)
        if accelerator.is_main_process:
            bar.update(1)
            bar.write(f"ppo step {step}/{C.PPO_STEPS} | score {metrics['score']:.3f} | pass {metrics['test_pass_rate']:.2f} "
                      f"| kl {metrics['kl']:.3f} | entropy {metrics['entropy']:.2f} | len {metrics['response_length']:.0f} "
                      f"| eos {metrics['eos_rate']:.2f} | clip {metrics['clipfrac']:.2f} | lr {lr:.2g} | {metrics['seconds']:.1f} s")
        row = {"step": step, **metrics}
        if C.PPO_EVAL_EVERY and step % C.PPO_EVAL_EVERY == 0 and step != C.PPO_STEPS:
            row.update({f"eval_{k}": v for k, v in run_eval(step).items()})
        history.append(row)
        # every PPO_SAVE_EVERY iterations and after the last one: a kill in the final evaluation redoes no training
        if C.PPO_SAVE_EVERY and (step % C.PPO_SAVE_EVERY == 0 or step == C.PPO_STEPS):
            save_checkpoint(accelerator, s.ckpt_dir, step, history)
    bar.close()
    seconds = time.time() - t_start

    # 6. final evaluation and save ./ppo_model
    final = run_eval(C.PPO_STEPS, final=True)
    policy_out = plain_policy(accelerator, model, torch.float32)  # every process: gathers shards
    if accelerator.is_main_process:
        stop_at_end_of_turn(policy_out, tokenizer)
        last_rows = [h for h in history if "kl" in h][-5:] or [{}]
        metrics = {
            **final,
            **{k: sum(h.get(k, 0.0) for h in last_rows) / len(last_rows) for k in ("kl", "reward_mean", "response_length")},
            "advantage_estimator": C.PPO_ADVANTAGE,
            "train_seconds": seconds,
            "episodes_per_second": episodes / seconds if episodes else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "history": history,
        }
        save_stage("ppo", C.PPO_DIR, policy_out, tokenizer, metrics, s.ckpt_dir,
                   also=lambda tmp: write_jsonl(os.path.join(tmp, "eval_results.jsonl"), final_answers) if final_answers else None)
    accelerator.end_training()


if __name__ == "__main__":
    run_stage(main)
