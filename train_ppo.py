"""Stage 3 of 3: PPO, our own implementation on accelerate + transformers + peft.

Reads  ./sft_model (policy and frozen reference), ./rm_model (frozen reward model; the critic
       starts from it), PPO_PROMPTS_FILE (prompts, with unit tests where available) and
       EVAL_TASKS_FILE (held-out tasks for pass@1).
Writes ./ppo_model: a plain causal-LM folder (merged when LoRA is on) with tokenizer, chat
       template, eval_results.json and rlhf_stage.json; checkpoints and logs under RUNS_DIR/ppo.

One iteration of main()'s loop: 1. rollout: sample answers to a batch of prompts (PPO_OVERSAMPLE
x more prompts, keeping those whose answers disagree in the unit tests) and read their logprobs
under the policy and the frozen SFT reference, and the critic's values; 2. advantages: score the
answers (rlhf/reward.py: test reward or normalised RM score, a penalty when an answer never ends),
pay the KL to the reference, estimate advantages (GAE, or a critic-free estimator); 3. update:
PPO_EPOCHS of clipped policy (and value) updates over mini-batches; 4. log; 5. save. The math is
in rlhf/ppo_math.py, each trick with its source; the networks and their one forward in
rlhf/ppo_models.py, with the Rollout that holds one iteration's answers; set-up, the prompts,
evaluation and checkpoints in rlhf/ppo_setup.py.

    python train_ppo.py                                    # embedded default, CPU is fine
    python train_ppo.py --USE_LORA=true --PPO_LR=1e-5      # LoRA: reference = adapter disabled
    accelerate launch --config_file accelerate_configs/ddp.yaml train_ppo.py  # several GPUs (docs/DISTRIBUTED.md)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_ppo.py  # 2 CPU processes

Any constant of config.py can be overridden as --NAME=value. Interrupted runs resume from the
last checkpoint (RESUME, PPO_SAVE_EVERY).
"""

import os
import time

import torch

import config as C
from rlhf.checkpoints import diverged
from rlhf.common import lora_config, mixed_precision, precision, report_to, run_stage, start_stage
from rlhf.engines import full_weights_for_generation
from rlhf.generation import generate
from rlhf.handoff import check_output_dir, require_stage_output
from rlhf.ppo_math import (
    compute_advantages, first_eos_mask, imitation_rows, informative_groups, kl_estimate, length_grouped_order,
    loss_normalizers, masked_total, mixed_groups, policy_loss, policy_rows, self_imitation_loss, truncate_after_eos,
    value_loss,
)
from rlhf.ppo_models import Rollout, response_forward
from rlhf.ppo_setup import (
    CHECKPOINT, check_settings, encode_prompts, run_evaluation, save_checkpoint, save_policy, setup, step_prompts,
)
from rlhf.reward import exec_rewards, sequence_scores


def sample(policy, query, query_mask, eos_ids, pad_id, *, max_tokens, temperature, own_logprobs):
    """(responses (B, T), their logprobs (B, T) or None), T <= max_tokens, sampled from plain
    softmax(logits / temperature): the distribution every logprob of the loop assumes (no top-k,
    top-p or repetition penalty, whatever the checkpoint's generation_config says). Rows that have
    ended leave the batch (rlhf.generation): generate() would keep computing them to the longest
    response. With own_logprobs, the sampler's logprobs are PPO's "old" logprobs without a second
    forward over the answers, as TRL's PPOTrainer takes them from generate()'s scores (trl 1.10,
    experimental/ppo/ppo_trainer.py). Only in fp32, where the cached decoding and a whole forward
    agree to float rounding (tests/test_generation.py); in bf16 or fp16 they round apart, so there
    the loop reads the answers again (None)."""
    response, logp = generate(policy, query, query_mask, max_tokens, eos_ids, pad_id, temperature=temperature,
                              logprobs=True)
    return response, logp if own_logprobs else None


def rollout(s, step, n_prompts, *, seed, samples_per_prompt, max_tokens, temperature, own_logprobs):
    """Answers to this iteration's prompts and their unit-test rewards; with oversampling, the
    n_prompts prompts whose answers disagree in the tests first (informative_groups). Returns the
    Rollout padded to the longest answer of any process, the sampled batch's pass rate and share of
    mixed groups, and the seconds spent generating and running the tests."""
    accelerator, tokenizer, device = s.accelerator, s.tokenizer, s.accelerator.device
    batch = step_prompts(s.prompts, step, accelerator.process_index, n_prompts * s.oversample, seed=seed,
                         samples_per_prompt=samples_per_prompt)
    query, query_mask = encode_prompts(tokenizer, batch, device)
    t_gen = time.time()
    with full_weights_for_generation(accelerator, s.model) as policy:
        response, sampled_logp = sample(policy, query, query_mask, s.eos_ids, tokenizer.pad_token_id,
                                        max_tokens=max_tokens, temperature=temperature, own_logprobs=own_logprobs)
    gen_seconds = time.time() - t_gen
    # sampling stops when every row has ended: (B, T') with T' <= max_tokens
    response = truncate_after_eos(response, s.eos_ids, tokenizer.pad_token_id)
    _, _, last_index = first_eos_mask(response, s.eos_ids)
    texts = tokenizer.batch_decode([row[: n + 1] for row, n in zip(response, last_index)], skip_special_tokens=True)
    t_reward = time.time()
    passed = exec_rewards(batch, texts, device, s.reward)
    seconds = {"generate_seconds": gen_seconds, "reward_seconds": time.time() - t_reward}
    roll = Rollout(batch, texts, passed, query, query_mask, response, last_index, sampled_logp)
    sampled = {"sampled_pass_rate": roll.passed.nanmean(),
               "mixed_groups": mixed_groups(roll.passed, samples_per_prompt).float().mean()}
    if s.oversample > 1:
        roll = roll.select(informative_groups(roll.passed, samples_per_prompt, n_prompts))
    # pad to the longest answer of any process (not to max_tokens: most answers are far shorter), so
    # every process runs the same number of identically shaped steps
    longest = accelerator.reduce(torch.tensor([roll.response.shape[1]], device=device), "max").item()
    return roll.padded(longest, tokenizer.pad_token_id, s.eos_ids), sampled, seconds


def rollout_forwards(s, roll, mini_batch, temperature):
    """The answers' logprobs under the policy that sampled them ("old": the sampler's own, or a
    forward), under the frozen reference, and the critic's values (None without one), (B, T) each.
    Rows of like length share a forward (less padding); the results come back in rollout order."""
    old_logp, ref_logp, values = [], [], []
    back = lambda x: torch.nn.functional.pad(x, (0, roll.response.shape[1] - x.shape[1]))  # noqa: E731  to (B', T)
    by_length = torch.argsort(roll.lengths().cpu(), stable=True).to(roll.response.device)
    for rows in by_length.split(mini_batch):
        mb = roll.minibatch(rows)
        if roll.sampled_logp is None:
            out = response_forward(s.model, mb.query, mb.query_mask, mb.response, mb.mask, temperature)
            old_logp.append(back(out.logp))
        else:  # the sampler's logprobs; the critic (gae) still reads the answers for its values
            old_logp.append(roll.sampled_logp[rows])
            out = response_forward(s.accelerator.unwrap_model(s.model), mb.query, mb.query_mask, mb.response, mb.mask,
                                   temperature, logprobs=False) if s.critic else None
        values.append(None if out is None or out.values is None else back(out.values))
        with s.reference() as ref:
            ref_out = response_forward(ref, mb.query, mb.query_mask, mb.response, mb.mask, temperature)
            ref_logp.append(back(ref_out.logp))
    unsort = torch.argsort(by_length)
    return torch.cat(old_logp)[unsort], torch.cat(ref_logp)[unsort], torch.cat(values)[unsort] if s.critic else None


def update(s, roll, normalizers, step, *, epochs, mini_batch, temperature, clip, vf_clip, vf_coef, sil_coef,
           kl_coef, kl_estimator, max_grad_norm, seed):
    """`epochs` passes over the rollout in shuffled mini-batches of like length, each one optimizer
    step on PPO's clipped policy loss, plus with a critic vf_coef x the clipped value loss, sil_coef
    x self-imitation, and kl_coef x the KL to the reference where it is a loss term (GRPO's; None:
    the reward paid it). normalizers: each term's denominator (loss_normalizers), or None per term.
    Returns each mini-batch's stats and the policy's learning rate of the last step."""
    stats = []
    shuffle = torch.Generator().manual_seed(seed + 7919 * step + s.accelerator.process_index)
    for _ in range(epochs):
        order = length_grouped_order(roll.lengths(), mini_batch, shuffle).to(roll.response.device)
        for rows in order.split(mini_batch):
            mb = roll.minibatch(rows)  # (B', T')
            out = response_forward(s.model, mb.query, mb.query_mask, mb.response, mb.mask, temperature, entropy=True)
            loss, step_stats = policy_loss(out.logp, mb.old_logp, mb.advantages, mb.mask, clip, normalizers["policy"])
            step_stats["policy_loss"] = loss.detach()
            if s.critic:
                vf_loss, vf_stats = value_loss(out.values, mb.values, mb.returns, mb.mask, vf_clip,
                                               normalizers["value"])
                loss = loss + vf_coef * vf_loss
                step_stats.update(value_loss=vf_loss.detach(), **vf_stats)
            if sil_coef:  # self-imitation: the passing answers of mixed groups, unclipped
                sil_loss = self_imitation_loss(out.logp, mb.mask, mb.imitate, normalizers["sil"])
                loss = loss + sil_coef * sil_loss
                step_stats["sil_loss"] = sil_loss.detach()
            if kl_coef is not None:  # GRPO's KL term (DeepSeekMath): in the loss, per token, instead of the reward
                kl_loss = masked_total(kl_estimate(out.logp, mb.ref_logp, kl_estimator), mb.mask, normalizers["kl"])
                loss = loss + kl_coef * kl_loss
                step_stats["kl_loss"] = kl_loss.detach()
            if not torch.isfinite(loss):
                raise diverged("ppo", step, f"loss {loss.item()} ({ {k: float(v) for k, v in step_stats.items()} })",
                               s.ckpt_dir, "PPO_LR (or PPO_CRITIC_LR, or check the reward scale)", **CHECKPOINT)
            lr = s.optimizer.param_groups[0]["lr"]  # the policy's rate in this update (logged: its last)
            optimizer_step(s.accelerator, s.model, s.optimizer, s.scheduler, loss, max_grad_norm)
            step_stats["entropy"] = out.entropy.mean()  # the n valid tokens
            stats.append(step_stats)
    return stats, lr


def optimizer_step(accelerator, model, optimizer, scheduler, loss, max_grad_norm):
    """Backward, clip, step. Clips the parameters of the PREPARED model: FSDP2 replaces the parameter
    objects in prepare, so a list collected before it would hold tensors that never get a gradient."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def local_metrics(roll, sampled, stats, kl_coef):
    """This process's means over its batch (main() then averages them over the processes)."""
    tested = ~torch.isnan(roll.passed)
    nan = torch.tensor(float("nan"), device=tested.device)
    kl_per_response = roll.kl.sum(1)  # (B,)
    return {
        "score": roll.score.mean(), "rm_score": roll.rm_score.nanmean(), **sampled,
        "test_pass_rate": roll.passed[tested].mean() if tested.any() else nan,
        "trained_share": roll.trains_policy.float().mean(),
        "kl": kl_per_response.mean(), "non_score_reward": -kl_coef * kl_per_response.mean(),
        "response_length": roll.mask.sum(1).float().mean(), "eos_rate": roll.ends_with_eos.float().mean(),
        **{k: torch.stack([x[k] for x in stats]).float().mean() for k in stats[0]},
    }


def main(argv):
    start_stage("ppo", argv)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    require_stage_output(C.SFT_DIR, "sft")
    require_stage_output(C.RM_DIR, "rm")
    check_output_dir(C.PPO_DIR, C.OVERWRITE)
    check_settings()
    # step_scheduler_with_optimizer=False: one scheduler step per optimizer step; otherwise accelerate
    # steps a prepared scheduler once per process each time (made for a dataloader it split), and on
    # N processes the learning rate would reach 0 after 1/N of the run
    accelerator = Accelerator(mixed_precision=mixed_precision(C.PRECISION), step_scheduler_with_optimizer=False,
                              log_with=report_to(C.REPORT_TO) or None, project_dir=os.path.join(C.RUNS_DIR, "ppo"))
    s = setup(accelerator)
    device, history, group = accelerator.device, s.history, C.PPO_SAMPLES_PER_PROMPT
    accelerator.init_trackers("ppo")

    def run_eval(step, final=False):  # held-out tasks: a subset (PPO_EVAL_TASKS) during training, all at the end
        last = final and step == C.PPO_STEPS  # after the last iteration: pass@EVAL_SAMPLES and the seed prompts too
        return run_evaluation(s, step, s.problems if final else s.problems[: C.PPO_EVAL_TASKS or None],
                              C.GEN_MAX_NEW_TOKENS, C.GEN_BATCH_SIZE, samples=C.EVAL_SAMPLES if last else 0,
                              seed_prompt_samples=C.SEED_PROMPT_SAMPLES if last else None)

    if s.start == 0 and (C.PPO_EVAL_EVERY or 0) > 0:
        before = run_eval(0, final=True)[0]  # the SFT baseline, on the same tasks as the final evaluation
        if before:
            history.append({"step": 0, **{f"eval_{k}": v for k, v in before.items()}})

    bar = tqdm(total=C.PPO_STEPS, initial=s.start, desc="ppo", disable=not accelerator.is_main_process)
    t_start, episodes, own_logprobs = time.time(), 0, precision(C.PRECISION) == "fp32"  # the sampler's logprobs (sample)
    for step in range(s.start + 1, C.PPO_STEPS + 1):
        t0 = time.time()
        # 1. rollout (no gradients): answers, their tests, their logprobs now and under the reference, values
        s.model.eval()
        with torch.no_grad(), accelerator.autocast():  # every forward of the rollout in the update's precision
            roll, sampled, rollout_seconds = rollout(s, step, C.PPO_BATCH_SIZE // group, seed=C.SEED,
                                                 samples_per_prompt=group, max_tokens=C.PPO_RESPONSE_LEN,
                                                 temperature=C.PPO_TEMPERATURE, own_logprobs=own_logprobs)
            roll.old_logp, roll.ref_logp, roll.values = rollout_forwards(s, roll, C.PPO_MINI_BATCH_SIZE,
                                                                         C.PPO_TEMPERATURE)

            # 2. scores, KL, advantages; answers of all-pass / all-fail groups do not train the policy
            with s.reward_model() as rm:
                roll.score, roll.rm_score = sequence_scores(rm, s.rm_tokenizer, s.norm, roll.batch, roll.texts,
                                                            roll.ends_with_eos, roll.passed, device, s.reward,
                                                            every_row=s.rm_every_row)
            roll.trains_policy = policy_rows(roll.passed, group)
            roll.imitate = imitation_rows(roll.passed, roll.ends_with_eos, roll.trains_policy, group)  # PPO_SIL_COEF
            roll.kl = torch.where(roll.mask, kl_estimate(roll.old_logp, roll.ref_logp, C.PPO_KL_ESTIMATOR), 0.0)
            kl_reward_coef = 0.0 if C.PPO_KL_LOSS else s.kl_ctl.value  # KL paid in the reward, or as a loss term
            roll.advantages, roll.returns = compute_advantages(
                C.PPO_ADVANTAGE, roll.score, roll.kl, roll.values, roll.mask, roll.last_index, kl_reward_coef, group,
                roll.trains_policy, C.PPO_GAMMA, C.PPO_LAM)
            # each loss term's denominator (PPO_LOSS_NORM): its tokens in the batch, or None (per mini-batch)
            normalizers = dict.fromkeys(("policy", "value", "sil", "kl"))
            if C.PPO_LOSS_NORM == "batch":
                normalizers = loss_normalizers(
                    {"policy": roll.mask & roll.trains_policy.unsqueeze(1), "value": roll.mask,
                     "sil": roll.mask & roll.imitate.unsqueeze(1), "kl": roll.mask},
                    C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE, accelerator.num_processes,
                    total=lambda n: accelerator.reduce(n.to(device), "sum"))

        # 3. update: PPO_EPOCHS passes over the batch in shuffled mini-batches
        t_update = time.time()
        s.model.train()
        stats, lr = update(s, roll, normalizers, step, epochs=C.PPO_EPOCHS, mini_batch=C.PPO_MINI_BATCH_SIZE,
                           temperature=C.PPO_TEMPERATURE, clip=C.PPO_CLIP, vf_clip=C.PPO_VF_CLIP, vf_coef=C.PPO_VF_COEF,
                           sil_coef=C.PPO_SIL_COEF, kl_coef=s.kl_ctl.value if C.PPO_KL_LOSS else None,
                           kl_estimator=C.PPO_KL_ESTIMATOR, max_grad_norm=C.PPO_MAX_GRAD_NORM, seed=C.SEED)
        update_seconds = time.time() - t_update

        # 4. log: means over this process's batch, then over processes
        metrics = {k: accelerator.reduce(v.detach().float().reshape(1).to(device), "mean").item()
                   for k, v in local_metrics(roll, sampled, stats, s.kl_ctl.value).items()}
        s.kl_ctl.update(metrics["kl"], C.PPO_BATCH_SIZE * accelerator.num_processes)
        metrics.update(reward_mean=metrics["score"] + metrics["non_score_reward"], kl_coef=s.kl_ctl.value,
                       lr=lr, seconds=time.time() - t0,
                       **rollout_seconds, update_seconds=update_seconds)  # this process's (bench/)
        episodes += C.PPO_BATCH_SIZE * accelerator.num_processes
        accelerator.log({f"ppo/{k}": v for k, v in metrics.items()}, step=step)
        if accelerator.is_main_process:
            bar.update(1)
            bar.write(f"ppo step {step}/{C.PPO_STEPS} | score {metrics['score']:.3f} | pass {metrics['test_pass_rate']:.2f} "
                      f"| kl {metrics['kl']:.3f} | entropy {metrics['entropy']:.2f} | len {metrics['response_length']:.0f} "
                      f"| eos {metrics['eos_rate']:.2f} | clip {metrics['clipfrac']:.2f} | lr {lr:.2g} | {metrics['seconds']:.1f} s")
        row = {"step": step, **metrics}
        if C.PPO_EVAL_EVERY and step % C.PPO_EVAL_EVERY == 0 and step != C.PPO_STEPS:
            row.update({f"eval_{k}": v for k, v in run_eval(step)[0].items()})
        history.append(row)

        # 5. save: every PPO_SAVE_EVERY iterations and after the last (a kill in the final evaluation then
        # redoes no training)
        if C.PPO_SAVE_EVERY and (step % C.PPO_SAVE_EVERY == 0 or step == C.PPO_STEPS):
            save_checkpoint(accelerator, s.ckpt_dir, step, history, s.run_settings)
    bar.close()
    seconds = time.time() - t_start

    # the final evaluation, and ./ppo_model
    final, answers = run_eval(C.PPO_STEPS, final=True)
    last_rows = [h for h in history if "kl" in h][-5:] or [{}]  # the last 5 iterations' means
    save_policy(s, C.PPO_DIR, {
        **final, **{k: sum(h.get(k, 0.0) for h in last_rows) / len(last_rows) for k in ("kl", "reward_mean",
                                                                                        "response_length")},
        "advantage_estimator": C.PPO_ADVANTAGE, "train_seconds": seconds,
        "episodes_per_second": episodes / seconds if episodes else None}, answers, C.SFT_DIR,
        lora_config("CAUSAL_LM", C) if C.USE_LORA else None)
    accelerator.end_training()


if __name__ == "__main__":
    run_stage(main)
