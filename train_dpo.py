"""Optional stage: direct preference optimisation (DPO) with TRL's DPOTrainer, instead of RM + PPO.

Reads  ./sft_model (SFT_DIR: the SFT stage's output, with its tokenizer and chat template), the
       preference pairs in DPO_TRAIN_FILE / DPO_EVAL_FILE ("" = the RM's, RM_TRAIN_FILE /
       RM_EVAL_FILE; {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}),
       with DPO_ROUNDS > 0 the tasks with unit tests of PPO_PROMPTS_FILE, and EVAL_TASKS_FILE
       and SEED_PROMPTS_FILE for the final evaluation.
Writes ./dpo_model (DPO_DIR): a plain causal-LM folder (merged when LoRA is on) with tokenizer,
       chat template and generation config, eval_results.json (the implicit reward's held-out
       accuracy and margin, greedy pass@1, pass@EVAL_SAMPLES, seed prompts, each round's figures),
       eval_results.jsonl (each held-out task's greedy answer and verdict, as SFT and PPO save
       them), online_pairs.jsonl (the pairs of the online rounds, when made), the model card and
       rlhf_stage.json (hand-off metadata).

DPO (Rafailov et al. 2023) needs neither a reward model nor rollouts: with pi the policy and ref
the frozen reference, each pair's loss is -log sigmoid(beta * (log pi/ref (chosen) - log pi/ref
(rejected))), the log-ratios summed over the answer's tokens. DPO_LOSS_TYPE picks another of TRL's
losses on the same log-ratios (ipo: Azar et al. 2023; hinge: SLiC, Zhao et al. 2023; robust:
Chowdhury et al. 2024; ...).

Offline (DPO_ROUNDS = 0): DPO_EPOCHS over the fixed pairs, from and against the SFT model.
Online, or iterative, DPO (DPO_ROUNDS = N > 0; Xiong et al. 2024, Pang et al. 2024): N rounds.
Each round the current model (round 1: SFT; then the latest round's) answers each task of
PPO_PROMPTS_FILE DPO_ONLINE_SAMPLES times at temperature 1, the sandbox runs the unit tests, and a
passing and a failing answer to the same prompt make a pair (rlhf.reward.tested_pairs, which the
RM's on-policy pairs use too; a task whose answers all pass or all fail gives none). Round 1 trains
on the fixed pairs and those; each later round on its own new pairs only, so the fixed pairs are
seen as often as offline and the rounds add the model's own mistakes.

    python train_dpo.py                                   # offline, embedded default, CPU is fine
    python train_dpo.py --DPO_ROUNDS=2                    # online: 2 rounds of tested answers
    python train_dpo.py --USE_LORA=true --DPO_LR=5e-6     # LoRA (reference = adapter disabled), merged on save
    accelerate launch --config_file accelerate_configs/ddp.yaml train_dpo.py  # several GPUs

Any constant of config.py can be overridden as --NAME=value. An interrupted run resumes from its
last checkpoint (RESUME): finished rounds are kept, a round's pairs are not sampled again.
"""

import os
import time

import config as C
from rlhf.checkpoints import checkpoint_folder, rows_made_once, staging_folder, train_resumable
from rlhf.codeeval import load_problems, sandbox_limits, stage_evaluation
from rlhf.common import (
    check_lora_targets, load_causal_lm, load_tokenizer, lora_config, merge_lora_weights, run_stage, start_stage,
    stop_at_end_of_turn, torch_dtype, trainer_args, trainer_schedule, trainer_sizes, use_log_line,
)
from rlhf.data import drop_too_long, load_preference_pairs, pair_lengths, read_jsonl
from rlhf.handoff import (
    check_output_dir, read_stage_info, require_stage_output, save_stage, save_stage_output, save_tokenizer, write_jsonl,
)
from rlhf.reward import problems_with_tests, tested_pairs
from rlhf.settings import UserError, dpo_loss_types, scalar_settings

# the implicit reward's figures on the held-out pairs, as DPOTrainer logs them: (log key, our name)
EVAL_KEYS = (("eval_rewards/accuracies", "eval_reward_accuracy"), ("eval_rewards/margins", "eval_reward_margin"),
             ("eval_loss", "eval_loss"))


def round_folder(r):
    """Where round r keeps its pairs, Trainer checkpoints and (before the last round) its model;
    inside the stage's checkpoint folder, which is removed once DPO_DIR is saved."""
    return os.path.join(checkpoint_folder(C.RUNS_DIR, "dpo"), f"round_{r}")


def round_checkpoints(r):
    """Round r's Trainer checkpoints (train_resumable moves each complete one here)."""
    return os.path.join(round_folder(r), "checkpoints")


def pairs_that_fit(tokenizer, pairs, source):
    """The pairs whose longer side fits MAX_LEN, the others dropped with a count: DPOTrainer would
    cut the answer short and train on a truncated program."""
    return drop_too_long(pairs, pair_lengths(tokenizer, pairs, source), C.MAX_LEN, source)


def online_pairs(start, r, tokenizer, tasks, state):
    """(pairs, share of answers that passed): the model in `start` answers `tasks`, the tests label
    the answers, a passing and a failing answer to one prompt make a pair (tested_pairs). Only
    pairs of the model's own answers: a reference program as the chosen side, as the RM takes
    where no answer passed, is not an answer this policy gives, and DPO's log-ratios on it would
    be large and off-policy. Sampled once per round (rows_made_once: a resumed run reuses them)."""
    def sample():
        model = load_causal_lm(start, torch_dtype(C.PRECISION), for_training=False).to(state.device)
        rows, share = tested_pairs(model, tokenizer, tasks, C.DPO_ONLINE_SAMPLES, C.GEN_MAX_NEW_TOKENS,
                                   sandbox_limits(C), C.GEN_BATCH_SIZE, reference_fallback=False)
        return [dict(row, passed_share=share, round=r) for row in rows]

    rows = rows_made_once(os.path.join(round_folder(r), "pairs.jsonl"), sample, state, C.RESUME)
    share = rows[0]["passed_share"] if rows else None
    if state.is_main_process:
        passed = f"{share:.1%} of its {C.DPO_ONLINE_SAMPLES} answers per task passed" if rows else "no task had " \
                 "both a passing and a failing answer"
        print(f"dpo round {r}: {len(rows)} online pairs from {start} on {len(tasks)} tasks of {C.PPO_PROMPTS_FILE} "
              f"({passed})")
    return rows, share


def dpo_trainer(start, tokenizer, train, evals, r, loss_types):
    """The DPOTrainer of round r: the policy loaded from `start`, its reference too. The reference
    is the round's starting model, not always SFT (iterative DPO as in Xiong et al. 2024 and Pang
    et al. 2024): the round's pairs are that model's own answers, so its log-probabilities are the
    baseline the margins are measured from and beta bounds each round's step away from the model
    that sampled; LoRA gets the same reference for free (adapter disabled = the merged start), and
    no second frozen copy of SFT is kept. In round 1 (and offline) the start is SFT."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # the stage's precision (fp32 on CPU, bf16 on capable GPUs); QLoRA: 4-bit
    model = load_causal_lm(start, torch_dtype(C.PRECISION), qlora=C.QLORA, gradient_checkpointing=C.GRADIENT_CHECKPOINTING)
    check_lora_targets(model, C.USE_LORA, C.LORA_TARGET_MODULES)
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(C.RUNS_DIR, "dpo", f"round_{r}")
    fields = dict(
        output_dir=staging_folder(round_checkpoints(r)),  # moved when complete (train_resumable)
        **trainer_sizes(C.DPO_BATCH_SIZE, C.DPO_GRAD_ACCUM, C.DPO_EPOCHS, C.DPO_LR),
        beta=C.DPO_BETA,
        loss_type=loss_types,
        label_smoothing=C.DPO_LABEL_SMOOTHING,
        max_length=C.MAX_LEN,  # nothing left to cut: longer pairs were dropped
        disable_dropout=True,
        **trainer_schedule(C.DPO_WARMUP_RATIO, C.EVAL_EVERY, C.LOG_EVERY),  # cosine after warm-up, as SFT and RM
        **trainer_args(DPOConfig, C),  # fp32 on CPU: TRL's bf16 default is ~20x slower there
    )
    keep = ("prompt", "chosen", "rejected")
    trainer = DPOTrainer(
        model=model, args=DPOConfig(**fields), processing_class=tokenizer,
        train_dataset=Dataset.from_list([{k: p[k] for k in keep} for p in train]),
        eval_dataset=Dataset.from_list([{k: p[k] for k in keep} for p in evals]),
        peft_config=lora_config("CAUSAL_LM", C) if C.USE_LORA else None,
    )
    use_log_line(trainer, f"dpo round {r}", [("loss", "loss"), ("rewards/accuracies", "acc"),
                                             ("rewards/margins", "margin"), ("eval_loss", "eval loss"),
                                             ("eval_rewards/accuracies", "eval acc"), ("learning_rate", "lr")])
    return trainer


def held_out_figures(trainer):
    """The implicit reward's figures on the held-out pairs for the weights training ended with (the
    evaluation at the last step, else a new one)."""
    scored = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    scored = scored[-1] if scored else trainer.evaluate()
    return {name: scored.get(key) for key, name in EVAL_KEYS}


def save_round_model(folder, model, tokenizer, metrics, run_settings):
    """A finished round's model, the next round's start, saved atomically (its rlhf_stage.json
    marks it complete: a resumed run continues after it)."""
    def save(tmp):
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)

    save_stage_output(folder, "dpo", save, metrics, run_settings)


def main(argv):
    state = start_stage("dpo", argv)
    check_output_dir(C.DPO_DIR, C.OVERWRITE)
    require_stage_output(C.SFT_DIR, "sft")
    # an unknown loss: one line now, not a ValueError at the first step
    loss_types = dpo_loss_types(C.DPO_LOSS_TYPE, C.DPO_LABEL_SMOOTHING)
    tokenizer = load_tokenizer(C.SFT_DIR)  # the SFT stage's tokenizer: same chat template, same ids
    run_settings = scalar_settings()  # recorded with each checkpoint, round model and the output

    # ---- data, all read before any training: a bad file stops the run with one line
    train_file, eval_file = C.DPO_TRAIN_FILE or C.RM_TRAIN_FILE, C.DPO_EVAL_FILE or C.RM_EVAL_FILE
    fixed = pairs_that_fit(tokenizer, load_preference_pairs(train_file), train_file)
    evals = pairs_that_fit(tokenizer, load_preference_pairs(eval_file), eval_file)
    tasks = problems_with_tests(C.PPO_PROMPTS_FILE) if C.DPO_ROUNDS else []
    if C.DPO_ROUNDS and not tasks:
        raise UserError(f"DPO_ROUNDS={C.DPO_ROUNDS} needs tasks with unit tests, and PPO_PROMPTS_FILE "
                        f"{C.PPO_PROMPTS_FILE} has none: give it such a file, or --DPO_ROUNDS=0 (offline)")
    problems = load_problems(C.EVAL_TASKS_FILE)[: C.EVAL_MAX_TASKS or None] if C.EVAL_TASKS_FILE else None
    seed_problems = load_problems(C.SEED_PROMPTS_FILE) if problems and C.SEED_PROMPT_SAMPLES and C.SEED_PROMPTS_FILE else []
    if state.is_main_process:
        mode = f"online, {C.DPO_ROUNDS} round(s)" if C.DPO_ROUNDS else "offline"
        print(f"data: {len(fixed)} train / {len(evals)} eval preference pairs | {mode} | loss {','.join(loss_types)} | "
              f"beta {C.DPO_BETA}")

    # ---- rounds: each trains from the model the last one made (round 1: SFT)
    rounds, start, history, online, log_history = max(1, C.DPO_ROUNDS), C.SFT_DIR, [], [], []
    t0 = time.time()
    for r in range(1, rounds + 1):
        saved = os.path.join(round_folder(r), "model")
        info = read_stage_info(saved) if C.RESUME and r < rounds else None
        if info:  # finished by an interrupted run: continue from its model
            if state.is_main_process:
                print(f"dpo round {r}/{rounds}: finished by the interrupted run, continuing from {saved}")
            history.append(info["metrics"]["round"])
            pairs_file = os.path.join(round_folder(r), "pairs.jsonl")
            online += read_jsonl(pairs_file) if os.path.exists(pairs_file) and os.path.getsize(pairs_file) else []
            start = saved
            continue
        pairs, share = online_pairs(start, r, tokenizer, tasks, state) if C.DPO_ROUNDS else ([], None)
        online += pairs
        pairs = pairs_that_fit(tokenizer, pairs, f"round {r}'s online pairs") if pairs else []
        train = (fixed if r == 1 else []) + pairs
        if not train:
            raise UserError(f"dpo round {r}: no pair to train on ({start} passed or failed every task's tests alike); "
                            f"raise DPO_ONLINE_SAMPLES or lower DPO_ROUNDS to {r - 1}")
        trainer = dpo_trainer(start, tokenizer, train, evals, r, loss_types)
        t1 = time.time()
        result = train_resumable(trainer, "dpo", "DPO_LR", round_checkpoints(r), run_settings)
        model = trainer.model
        if C.USE_LORA:  # a plain model: the next round and transformers load it as is (QLoRA: merged into full precision)
            model = (merge_lora_weights(start, model.state_dict(), lora_config("CAUSAL_LM", C), torch_dtype(C.PRECISION))
                     if C.QLORA else model.merge_and_unload())
        model.eval()
        stop_at_end_of_turn(model, tokenizer)
        figures = {"round": r, "start": start, "pairs": len(train), "online_pairs": len(pairs), "online_passed": share,
                   "train_loss": result.training_loss, "train_seconds": time.time() - t1, **held_out_figures(trainer)}
        history.append(figures)
        log_history += [dict(h, round=r) for h in trainer.state.log_history]
        if state.is_main_process:
            print(f"dpo round {r}/{rounds} | {figures['pairs']} pairs ({figures['online_pairs']} online) | "
                  f"eval reward accuracy {figures['eval_reward_accuracy']:.4f} | "
                  f"margin {figures['eval_reward_margin']:.4g} | {figures['train_seconds']:.0f} s")
        if r < rounds:
            if state.is_main_process:
                save_round_model(saved, model, tokenizer, {"round": figures}, run_settings)
            state.wait_for_everyone()
            start = saved
            del trainer, model

    # ---- the evaluation SFT and PPO run: pass@1, pass@EVAL_SAMPLES, seed prompts
    metrics = {**{k: v for k, v in history[-1].items() if k not in ("round", "start")},
               "rounds": C.DPO_ROUNDS, "train_seconds": time.time() - t0, "round_history": history}
    answers = []
    if problems and state.is_main_process:
        results, answers = stage_evaluation(model, tokenizer, problems, seed_problems, C.EVAL_SAMPLES,
                                            C.SEED_PROMPT_SAMPLES, C.GEN_MAX_NEW_TOKENS, sandbox_limits(C),
                                            C.GEN_BATCH_SIZE)
        metrics.update(results)
        print(f"dpo eval | pass@1 {metrics.get('pass_at_1', float('nan')):.3f} on {len(problems)} tasks of "
              f"{C.EVAL_TASKS_FILE}")

    # ---- save ./dpo_model (main process; atomic, with metadata)
    if state.is_main_process:
        metrics["log_history"] = log_history

        def also(tmp):
            if answers:
                write_jsonl(os.path.join(tmp, "eval_results.jsonl"), answers)
            if online:  # what the online rounds trained on, to read
                write_jsonl(os.path.join(tmp, "online_pairs.jsonl"), online)

        save_stage("dpo", C.DPO_DIR, model, tokenizer, metrics, checkpoint_folder(C.RUNS_DIR, "dpo"), run_settings, also=also,
                   extra={"sft_model": C.SFT_DIR},
                   show=("eval_reward_accuracy", "eval_reward_margin", "pass_at_1", "train_loss", "train_seconds"))
    state.wait_for_everyone()


if __name__ == "__main__":
    run_stage(main)
